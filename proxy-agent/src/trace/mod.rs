//! `proxy-agent trace`: every translation and drop of both datapaths, live, until Ctrl-C or
//! SIGTERM.
//!
//! The programs write a [`TraceEvent`] to the `trace_events` ring buffer only while `trace_on`
//! holds a time in the future (`proxy_common::trace`). This client sets it [`HOLD_NS`] ahead and
//! refreshes it every [`REFRESH_NS`], so a client killed without clearing it leaves tracing on
//! for at most [`HOLD_NS`]; on exit it clears it. Two clients at once: the first to exit clears
//! the flag and the other sets it again within [`REFRESH_NS`] (its events of that moment are
//! lost), and both read from the one ring, so each sees a share of the events: run one.
//!
//! - [`event`]: an event → a [`Line`] (pure), the filters, table and JSON output;
//! - this module: the pins, the clocks, names looked up on demand, and the loop.

pub mod event;

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, RingBuf};
use proxy_common::{
    addr::Addr,
    maps,
    service::{ServiceKey, ServiceName, ServiceValue},
    trace::{HOLD_NS, REFRESH_NS, TraceEvent, TraceUntil},
};
use tokio::signal::unix::{SignalKind, signal};

pub use self::event::{Filter, Line, Names};
use crate::inspect::{Format, pins, view::text};

/// How often the ring buffer is drained: short enough that lines appear at once to a person,
/// long enough to cost nothing while idle.
const POLL: Duration = Duration::from_millis(20);

/// Arguments of `proxy-agent trace`.
#[derive(Clone, Debug, clap::Args)]
pub struct TraceArgs {
    /// Only this service: `namespace/name` (any port) or `namespace/name:port`.
    #[arg(long, value_name = "NS/NAME")]
    pub service: Option<String>,
    /// Only this client: its address (TC), or an address of its network namespace (socket path);
    /// either family, an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) meaning its IPv4 address.
    #[arg(long, value_name = "IP")]
    pub from: Option<IpAddr>,
    /// Output format: one line per event, as a table row or a JSON object.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// Errors of `trace`. Each names the pin and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A map `trace` needs does not open.
    #[error(
        "opening map `{name}` at {}: {source} (is an agent of this version running with \
         --bpf-root {}? It pins the map at start-up; run trace as root)",
        path.display(),
        path.parent().unwrap_or(path).display()
    )]
    Open {
        /// The map's name.
        name: &'static str,
        /// Its pin.
        path: PathBuf,
        /// What aya reported.
        source: MapError,
    },
    /// Setting or clearing `trace_on` failed.
    #[error("writing map `trace_on` under {}: {source}", root.display())]
    Flag {
        /// What aya reported.
        source: MapError,
        /// The `--bpf-root`.
        root: PathBuf,
    },
    /// The clock could not be read.
    #[error("reading CLOCK_MONOTONIC: {0}")]
    Clock(io::Error),
    /// Signals could not be set up.
    #[error("installing the SIGINT/SIGTERM handlers: {0}")]
    Signals(io::Error),
    /// Writing the output failed (not a closed pipe: that ends the trace quietly).
    #[error("writing the output: {0}")]
    Output(io::Error),
}

fn open(root: &Path, name: &'static str) -> Result<Map, TraceError> {
    let path = root.join(name);
    let data = MapData::from_pin(&path).map_err(|source| TraceError::Open { name, path: path.clone(), source })?;
    // The kind of map the pin holds; a wrong kind fails in the typed conversion below.
    Map::from_map_data(data).map_err(|source| TraceError::Open { name, path, source })
}

fn typed<T: TryFrom<Map, Error = MapError>>(root: &Path, name: &'static str) -> Result<T, TraceError> {
    T::try_from(open(root, name)?).map_err(|source| TraceError::Open { name, path: root.join(name), source })
}

/// The `trace_on` flag, held while the trace runs and cleared when it is dropped (also on an
/// error or a signal).
struct Flag {
    map: Array<MapData, TraceUntil>,
    root: PathBuf,
}

impl Flag {
    fn open(root: &Path) -> Result<Self, TraceError> {
        Ok(Self { map: typed(root, maps::TRACE_ON)?, root: root.to_owned() })
    }

    /// Keeps tracing on until [`HOLD_NS`] from now.
    fn hold(&mut self) -> Result<(), TraceError> {
        let now = crate::sys::fs::monotonic_ns().map_err(TraceError::Clock)?;
        self.map.set(0, now + HOLD_NS, 0).map_err(|source| TraceError::Flag { source, root: self.root.clone() })
    }
}

impl Drop for Flag {
    fn drop(&mut self) {
        if let Err(e) = self.map.set(0, 0, 0) {
            tracing::warn!("clearing trace_on under {}: {e}; tracing stops by itself within 3s", self.root.display());
        }
    }
}

/// Service and namespace names, looked up in the pinned maps when an event needs them.
struct PinnedNames {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    names: HashMap<MapData, u32, ServiceName>,
    cache: BTreeMap<u32, String>,
    netns: Vec<pins::NetnsInfo>,
    /// When the namespaces were last listed: an unknown cookie lists them again, once a second
    /// at most.
    netns_read: Option<std::time::Instant>,
}

impl PinnedNames {
    fn open(root: &Path) -> Result<Self, TraceError> {
        Ok(Self {
            services: typed(root, maps::SERVICES)?,
            names: typed(root, maps::SERVICE_NAMES)?,
            cache: BTreeMap::new(),
            netns: Vec::new(),
            netns_read: None,
        })
    }

    fn netns_info(&mut self, cookie: u64) -> Option<&pins::NetnsInfo> {
        let stale = self.netns_read.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if !self.netns.iter().any(|n| n.cookie == cookie) && stale {
            self.netns = pins::netns();
            self.netns_read = Some(std::time::Instant::now());
        }
        self.netns.iter().find(|n| n.cookie == cookie)
    }
}

impl Names for PinnedNames {
    fn service(&mut self, service_id: u32) -> Option<String> {
        if let Some(name) = self.cache.get(&service_id) {
            return Some(name.clone());
        }
        let name = self.names.get(&service_id, 0).ok()?;
        let port = text(&name.port);
        let mut label = format!("{}/{}", text(&name.namespace), text(&name.name));
        if !port.is_empty() {
            label = format!("{label}:{port}");
        }
        self.cache.insert(service_id, label.clone());
        Some(label)
    }

    fn frontend_service(&mut self, address: Addr, port: u16, proto: u8) -> Option<u32> {
        let master = self.services.get(&ServiceKey::master(address, port, proto), 0).ok()?;
        Some(master.service_id)
    }

    fn netns(&mut self, cookie: u64) -> Option<String> {
        self.netns_info(cookie).map(|n| n.name.clone())
    }

    fn netns_has(&mut self, cookie: u64, address: IpAddr) -> bool {
        self.netns_info(cookie).is_some_and(|n| n.addresses.contains(&address))
    }
}

/// Wall-clock time of a CLOCK_MONOTONIC reading, from the two clocks read once at start.
struct Clocks {
    wall: SystemTime,
    monotonic_ns: u64,
}

impl Clocks {
    fn now() -> Result<Self, TraceError> {
        let monotonic_ns = crate::sys::fs::monotonic_ns().map_err(TraceError::Clock)?;
        Ok(Self { wall: SystemTime::now(), monotonic_ns })
    }

    fn wall(&self, monotonic_ns: u64) -> String {
        let at = if monotonic_ns >= self.monotonic_ns {
            self.wall + Duration::from_nanos(monotonic_ns - self.monotonic_ns)
        } else {
            self.wall - Duration::from_nanos(self.monotonic_ns - monotonic_ns)
        };
        humantime::format_rfc3339_millis(at).to_string()
    }
}

/// Runs `trace` on the maps pinned under `root` until SIGINT or SIGTERM (or the output closes).
pub async fn run(root: &Path, args: &TraceArgs) -> Result<(), TraceError> {
    let mut ring: RingBuf<MapData> = typed(root, maps::TRACE_EVENTS)?;
    let mut names = PinnedNames::open(root)?;
    let mut flag = Flag::open(root)?;
    let filter = Filter { service: args.service.clone(), from: args.from.map(|ip| ip.to_canonical()) };
    let mut interrupt = signal(SignalKind::interrupt()).map_err(TraceError::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(TraceError::Signals)?;
    let clocks = Clocks::now()?;
    // Events left in the ring by an earlier trace are older than this: skipped.
    let started = clocks.monotonic_ns;
    flag.hold()?;
    // Said once tracing is on: what comes after this line is traced (tests wait for it).
    tracing::info!(root = %root.display(), "tracing: one line per translation or drop, until Ctrl-C");
    let mut held_at = started;
    let mut tick = tokio::time::interval(POLL);
    let mut out = io::stdout().lock();
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = tick.tick() => {}
        }
        while let Some(item) = ring.next() {
            let Some(event) = decode(&item) else { continue };
            drop(item);
            if event.time_ns < started {
                continue;
            }
            let line = event::line(&event, clocks.wall(event.time_ns), &mut names);
            if !filter.admits(&event, &line, &mut names) {
                continue;
            }
            let text = match args.output {
                Format::Table => event::table_line(&line),
                Format::Json => serde_json::to_string(&line).unwrap_or_default(),
            };
            match writeln!(out, "{text}").and_then(|()| out.flush()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(TraceError::Output(e)),
            }
        }
        let now = crate::sys::fs::monotonic_ns().map_err(TraceError::Clock)?;
        if now.saturating_sub(held_at) >= REFRESH_NS {
            flag.hold()?;
            held_at = now;
        }
    }
    Ok(())
}

/// The event in a ring buffer record; `None` for a record of another size (another version's).
fn decode(bytes: &[u8]) -> Option<TraceEvent> {
    (bytes.len() == size_of::<TraceEvent>())
        // SAFETY: exactly `size_of::<TraceEvent>()` readable bytes; every bit pattern is a
        // valid `TraceEvent` (integers only, `aya::Pod`); the read is unaligned-safe.
        .then(|| unsafe { bytes.as_ptr().cast::<TraceEvent>().read_unaligned() })
}
