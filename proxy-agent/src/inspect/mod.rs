//! `proxy-agent inspect` and `proxy-agent explain`: what the pinned maps hold, and where a
//! connection goes and why. Both read the maps pinned under `--bpf-root`, so they work whether
//! or not the agent runs, and never write anything.
//!
//! Three rooms, so that everything but the first is pure and unit-tested:
//!
//! - [`pins`]: the only I/O: reads the pinned maps, the monotonic clock and the names of network
//!   namespaces into a [`Snapshot`];
//! - [`view`] and [`explain`]: a snapshot → rows per map, and the answer to "from C to
//!   address:port/proto", decided exactly as `proxy-ebpf/src/lb.rs` (and the attach points that
//!   call it) decide;
//! - [`render`]: tables for people, JSON (`-o json`) for scripts and tests.
//!
//! Adding a table: read its map in [`pins`] into the snapshot, add its rows in [`view`] and a
//! renderer in [`render`], and a [`Table`] variant.

pub mod drops;
pub mod explain;
#[cfg(test)]
mod flows;
pub mod pins;
pub mod render;
#[cfg(test)]
mod tests;
pub mod view;

use std::{
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use proxy_common::{
    addr, proto,
    service::{SVC_F_MAGLEV, ServiceKey},
};

pub use self::{explain::Explanation, pins::Snapshot};

/// Errors of reading the pinned maps. Each names the map or path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Nothing pinned under the root.
    #[error(
        "no maps pinned under {}: is the agent running (or has it run) with --bpf-root {}? \
         Its maps stay pinned after it exits, until `--cleanup`",
        root.display(),
        root.display()
    )]
    NoMaps {
        /// The `--bpf-root` directory.
        root: PathBuf,
    },
    /// One map is missing while others are there.
    #[error(
        "map `{name}` is not pinned at {}: the agent pins it at start-up; restart the agent \
         (a current version) with --bpf-root {}",
        path.display(),
        path.parent().unwrap_or(path).display()
    )]
    MissingMap {
        /// The map's name.
        name: &'static str,
        /// Where it should be.
        path: PathBuf,
    },
    /// Not allowed to open pins.
    #[error("opening {} needs root (CAP_BPF and CAP_SYS_ADMIN): run inspect/explain as root", path.display())]
    Permission {
        /// The pin (or the directory above it).
        path: PathBuf,
    },
    /// A map that does not open or read as this build expects.
    #[error(
        "map `{name}` at {}: {source} (was it pinned by another version of proxy-agent? \
         `bpftool map show pinned {}` shows its key and value sizes)",
        path.display(),
        path.display()
    )]
    Map {
        /// The map's name.
        name: &'static str,
        /// Its pin.
        path: PathBuf,
        /// What the kernel reported.
        source: crate::sys::bpf::BpfError,
    },
    /// The drop counters do not read as this build expects (the error names the pin).
    #[error("{0}")]
    Drops(crate::observe::drops::DropsError),
    /// The monotonic clock could not be read.
    #[error("reading CLOCK_MONOTONIC: {0}")]
    Clock(io::Error),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(io::Error),
}

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

/// The map `inspect` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Table {
    /// Frontends with their service, kind, policies and backends in slot order.
    Services,
    /// Backend ids with their endpoint and who uses them.
    Backends,
    /// ClientIP affinity entries with their age.
    Affinity,
    /// Per-flow NAT state of the packet path.
    Conntrack,
    /// Packets and socket calls the datapath dropped or refused, per reason.
    Drops,
}

/// A transport protocol as `--proto` takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Sctp => proto::SCTP,
        }
    }
}

/// `proxy-agent inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The map to show.
    #[arg(value_enum)]
    pub table: Table,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// `proxy-agent explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The client's address: a pod's, this node's or an external client's. It selects the
    /// client's affinity entry (by address, or by the named network namespace holding it).
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is its IPv4 address.
    #[arg(long, value_name = "IP")]
    pub from: IpAddr,
    /// The destination the client connects or sends to: `a.b.c.d:port` or `[ipv6]:port`. An
    /// IPv4-mapped IPv6 address (`[::ffff:10.96.0.10]:80`, what an AF_INET6 socket connects to)
    /// is explained as the IPv4 frontend it reaches.
    #[arg(long, value_name = "IP:PORT")]
    pub to: SocketAddr,
    /// The client's source port (packet path): with it, a Maglev frontend's answer names the
    /// table slot and backend the flow's 5-tuple hashes to.
    #[arg(long, value_name = "PORT")]
    pub from_port: Option<u16>,
    /// The transport protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Tcp)]
    pub proto: Protocol,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// Renders `inspect <table>` for the maps under `root`.
pub fn inspect(root: &Path, args: &InspectArgs) -> Result<String, InspectError> {
    if args.table == Table::Drops {
        // Counters, not entries: read on their own.
        return drops::inspect(root, args.output);
    }
    let mut snapshot = pins::read(root)?;
    if snapshot.affinity.iter().flatten().any(|(k, _)| k.netns_cookie != 0) {
        snapshot.netns = pins::netns();
    }
    Ok(match (args.table, args.output) {
        (Table::Services, Format::Table) => render::services(&view::services(&snapshot), &snapshot.root),
        (Table::Services, Format::Json) => render::json(&view::services(&snapshot)),
        (Table::Backends, Format::Table) => render::backends(&view::backends(&snapshot), &snapshot.root),
        (Table::Backends, Format::Json) => render::json(&view::backends(&snapshot)),
        (Table::Affinity, Format::Table) => render::affinity(&view::affinity(&snapshot), &snapshot),
        (Table::Affinity, Format::Json) => render::json(&view::affinity(&snapshot)),
        (Table::Conntrack, Format::Table) => render::conntrack(&view::conntrack(&snapshot), &snapshot),
        (Table::Conntrack, Format::Json) => render::json(&view::conntrack(&snapshot)),
        // Returned above without a snapshot; correct here too.
        (Table::Drops, format) => drops::inspect(root, format)?,
    })
}

/// Renders `explain` for the maps under `root`.
pub fn explain(root: &Path, args: &ExplainArgs) -> Result<String, InspectError> {
    let mut snapshot = pins::read(root)?;
    // To name netns-keyed affinity entries and find the client's namespace by its address.
    snapshot.netns = pins::netns();
    // The one Maglev table the answer may need, read whole (a lookup per slot).
    let to = args.to.ip().to_canonical();
    let master = ServiceKey::master(addr::from_ip(to), args.to.port(), args.proto.number());
    if let Some(m) = snapshot.services.get(&master).filter(|m| m.flags & SVC_F_MAGLEV != 0)
        && let Some(slots) = pins::maglev_slots(root, m.service_id)
    {
        snapshot.maglev_slots.insert(m.service_id, slots);
    }
    let explanation = explain_query(&snapshot, args);
    Ok(match args.output {
        Format::Table => render::explanation(&explanation),
        Format::Json => render::json(&explanation),
    })
}

/// Explains `args` over `snapshot`, IPv4-mapped addresses as the IPv4 ones they stand for (the
/// maps hold IPv4 in that very form, so an AF_INET6 socket reaches the IPv4 frontend).
fn explain_query(snapshot: &Snapshot, args: &ExplainArgs) -> Explanation {
    let to = SocketAddr::new(args.to.ip().to_canonical(), args.to.port());
    let query =
        explain::Query { from: args.from.to_canonical(), from_port: args.from_port, to, proto: args.proto.number() };
    let mut explanation = explain::explain(snapshot, &query);
    if to.ip() != args.to.ip() {
        explanation
            .notes
            .insert(0, format!("{} is IPv4-mapped: an AF_INET6 socket connecting there reaches {to}", args.to.ip()));
    }
    explanation
}

/// `proxy-agent inspect`: prints to stdout.
pub fn run_inspect(root: &Path, args: &InspectArgs) -> Result<(), InspectError> {
    print(&inspect(root, args)?)
}

/// `proxy-agent explain`: prints to stdout.
pub fn run_explain(root: &Path, args: &ExplainArgs) -> Result<(), InspectError> {
    print(&explain(root, args)?)
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
fn print(text: &str) -> Result<(), InspectError> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(InspectError::Output(e)),
        _ => Ok(()),
    }
}
