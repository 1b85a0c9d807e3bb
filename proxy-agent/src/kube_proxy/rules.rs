//! kube-proxy's rules on this node: found at start (they would translate service traffic
//! alongside the agent), and removed by `--cleanup-kube-proxy` as `kube-proxy --cleanup` removes
//! them. Everything goes through the node's own tools (`iptables-save`/`-restore` for both
//! backends and both families, `nft`, `ip`, `ipvsadm`): a missing tool means "not checked",
//! never a failure.

use std::{
    io::Write as _,
    process::{Command, Output, Stdio},
};

use crate::sys;

/// The iptables front ends to look through: each backend and family kube-proxy may have used.
/// Plain `iptables` is an alternatives link to one of these, so it is asked only when neither
/// backend of its family is installed.
const IPTABLES: &[(&str, &[&str])] =
    &[("iptables", &["iptables-nft", "iptables-legacy"]), ("ip6tables", &["ip6tables-nft", "ip6tables-legacy"])];

/// The tables kube-proxy writes to.
const TABLES: &[&str] = &["nat", "filter", "mangle"];

/// The nftables tables of kube-proxy's nftables mode.
const NFT_TABLES: &[&str] = &["ip kube-proxy", "ip6 kube-proxy"];

/// The dummy interface of kube-proxy's IPVS mode, holding every service address.
pub const IPVS_INTERFACE: &str = "kube-ipvs0";

/// What went wrong removing the rules.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// A tool ran and failed.
    #[error("{command}: {message} - remove the rest by hand or with `kube-proxy --cleanup`")]
    Tool {
        /// The command line.
        command: String,
        /// Its stderr, or why it could not run.
        message: String,
    },
}

/// What a look at the node found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// kube-proxy's rules present, one phrase each (`iptables-nft nat KUBE-SERVICES`).
    pub found: Vec<String>,
    /// What could not be checked, one phrase each (a tool not installed).
    pub unchecked: Vec<String>,
}

/// Looks for kube-proxy's rules: the nat `KUBE-SERVICES` chain of each iptables backend and
/// family, its nftables tables, and the IPVS interface.
pub fn detect() -> Findings {
    let mut findings = Findings::default();
    for tool in iptables_tools(&mut findings.unchecked) {
        match save(tool, "nat") {
            Ok(Some(text)) if chains(&text).any(|c| c == "KUBE-SERVICES") => {
                findings.found.push(format!("{tool} nat KUBE-SERVICES"));
            }
            Ok(_) => {}
            Err(e) => findings.unchecked.push(e.to_string()),
        }
    }
    match nft_tables() {
        Ok(Some(tables)) => findings.found.extend(tables.into_iter().map(|t| format!("nftables table {t}"))),
        Ok(None) => findings.unchecked.push("nftables: nft is not installed".into()),
        Err(e) => findings.unchecked.push(e.to_string()),
    }
    if sys::net::interface_index(IPVS_INTERFACE).is_some() {
        findings.found.push(format!("IPVS interface {IPVS_INTERFACE}"));
    }
    findings
}

/// Removes kube-proxy's rules as `kube-proxy --cleanup` does: in each iptables backend and
/// family its chains in the nat, filter and mangle tables (flushed, unlinked from the chains
/// that jump to them, deleted) in one `iptables-restore --noflush` per table; its nftables
/// tables; the IPVS interface and, if `ipvsadm` is installed and that interface was there, the
/// IPVS virtual servers. Nothing found is nothing done, so a second run changes nothing.
/// Returns what was removed and what could not be checked.
pub fn cleanup() -> Result<Findings, RulesError> {
    let mut report = Findings::default();
    for tool in iptables_tools(&mut report.unchecked) {
        for table in TABLES {
            let Some(text) = save(tool, table)? else { continue };
            let plan = Plan::of(table, &text);
            if plan.chains.is_empty() {
                continue;
            }
            restore(tool, &plan.script(table))?;
            report.found.push(format!("{tool} {table}: {}", plan.chains.join(" ")));
        }
    }
    match nft_tables()? {
        Some(tables) => {
            for table in tables {
                let mut args: Vec<&str> = vec!["delete", "table"];
                args.extend(table.split(' '));
                required("nft", &args, None)?;
                report.found.push(format!("nftables table {table}"));
            }
        }
        None => report.unchecked.push("nftables: nft is not installed".into()),
    }
    if sys::net::interface_index(IPVS_INTERFACE).is_some() {
        // kube-proxy's IPVS mode owns the node's virtual servers (its cleanup flushes them).
        match run("ipvsadm", &["--clear"], None) {
            Ok(_) => report.found.push("IPVS virtual servers".into()),
            Err(Missing) => report.unchecked.push("IPVS virtual servers: ipvsadm is not installed".into()),
            Err(Failed(e)) => return Err(e),
        }
        required("ip", &["link", "delete", IPVS_INTERFACE], None)?;
        report.found.push(format!("IPVS interface {IPVS_INTERFACE}"));
    }
    Ok(report)
}

/// Whether kube-proxy owns `chain` of `table` (its `CleanupLeftovers` list, both the iptables
/// and the IPVS mode's, and its canaries). kubelet's own chains (`KUBE-FIREWALL`,
/// `KUBE-KUBELET-CANARY`, `KUBE-MARK-DROP`) stay, as kube-proxy leaves them.
pub fn is_kube_proxy_chain(table: &str, chain: &str) -> bool {
    const SERVICE_PREFIXES: &[&str] = &["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-", "KUBE-XLB-"];
    match table {
        "nat" => {
            matches!(
                chain,
                "KUBE-SERVICES"
                    | "KUBE-NODEPORTS"
                    | "KUBE-POSTROUTING"
                    | "KUBE-MARK-MASQ"
                    | "KUBE-NODE-PORT"
                    | "KUBE-LOAD-BALANCER"
                    | "KUBE-PROXY-CANARY"
            ) || SERVICE_PREFIXES.iter().any(|p| chain.starts_with(p))
        }
        "filter" => matches!(
            chain,
            "KUBE-SERVICES"
                | "KUBE-EXTERNAL-SERVICES"
                | "KUBE-FORWARD"
                | "KUBE-NODEPORTS"
                | "KUBE-NODE-PORT"
                | "KUBE-PROXY-FIREWALL"
                | "KUBE-SOURCE-RANGES-FIREWALL"
                | "KUBE-IPVS-FILTER"
                | "KUBE-IPVS-OUT-FILTER"
                | "KUBE-PROXY-CANARY"
        ),
        "mangle" => chain == "KUBE-PROXY-CANARY",
        _ => false,
    }
}

/// The user chains an `iptables-save` of one table declares.
fn chains(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter_map(|l| l.strip_prefix(':')).filter_map(|l| l.split_whitespace().next())
}

/// The removal of kube-proxy's chains from one table, from its `iptables-save`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// kube-proxy's chains, in the order saved.
    chains: Vec<String>,
    /// The rules of other chains (built-in or not) that jump to them, as saved (`-A ...`).
    jumps: Vec<String>,
}

impl Plan {
    fn of(table: &str, text: &str) -> Self {
        let chains: Vec<String> = chains(text).filter(|c| is_kube_proxy_chain(table, c)).map(str::to_owned).collect();
        let jumps = text
            .lines()
            .filter(|line| {
                let mut words = line.split_whitespace();
                let (Some("-A"), Some(from)) = (words.next(), words.next()) else { return false };
                let target = words.skip_while(|w| !matches!(*w, "-j" | "-g")).nth(1);
                !chains.iter().any(|c| c == from) && target.is_some_and(|t| chains.iter().any(|c| c == t))
            })
            .map(str::to_owned)
            .collect();
        Self { chains, jumps }
    }

    /// One `iptables-restore --noflush` transaction: flush the chains, unlink them, delete them.
    fn script(&self, table: &str) -> String {
        let mut out = format!("*{table}\n");
        for chain in &self.chains {
            out += &format!(":{chain} - [0:0]\n");
        }
        for jump in &self.jumps {
            out += &format!("-D{}\n", &jump["-A".len()..]);
        }
        for chain in &self.chains {
            out += &format!("-X {chain}\n");
        }
        out + "COMMIT\n"
    }
}

/// The iptables front ends installed (see [`IPTABLES`]); families with none are noted.
fn iptables_tools(unchecked: &mut Vec<String>) -> Vec<&'static str> {
    let mut tools = Vec::new();
    for (plain, backends) in IPTABLES {
        let present: Vec<&'static str> =
            backends.iter().copied().filter(|tool| installed(&format!("{tool}-save"))).collect();
        if !present.is_empty() {
            tools.extend(present);
        } else if installed(&format!("{plain}-save")) {
            tools.push(plain);
        } else {
            unchecked.push(format!("{plain}: {plain}-save is not installed"));
        }
    }
    tools
}

/// Whether `program` is on PATH.
fn installed(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else { return false };
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// `<tool>-save -t <table>`; `None` when the table does not exist for that backend. A legacy
/// table the kernel does not list is not asked for: asking would load its module and create it.
fn save(tool: &str, table: &str) -> Result<Option<String>, RulesError> {
    if let Some(names) = legacy_tables_file(tool) {
        let listed = std::fs::read_to_string(names).unwrap_or_default();
        if !listed.lines().any(|l| l.trim() == table) {
            return Ok(None);
        }
    }
    match run(&format!("{tool}-save"), &["-t", table], None) {
        Ok(out) => Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())),
        Err(Missing) => Ok(None),
        // legacy: "Table does not exist (do you need to insmod?)"; nothing of kube-proxy's there.
        Err(Failed(RulesError::Tool { message, .. })) if message.contains("does not exist") => Ok(None),
        Err(Failed(e)) => Err(e),
    }
}

/// Where the kernel lists the legacy tables of this network namespace, for a legacy tool.
fn legacy_tables_file(tool: &str) -> Option<&'static str> {
    match tool {
        "iptables-legacy" => Some("/proc/net/ip_tables_names"),
        "ip6tables-legacy" => Some("/proc/net/ip6_tables_names"),
        _ => None,
    }
}

fn restore(tool: &str, script: &str) -> Result<(), RulesError> {
    required(&format!("{tool}-restore"), &["--noflush"], Some(script)).map(drop)
}

/// kube-proxy's nftables tables present; `None` when `nft` is not installed.
fn nft_tables() -> Result<Option<Vec<&'static str>>, RulesError> {
    let out = match run("nft", &["list", "tables"], None) {
        Ok(out) => out,
        Err(Missing) => return Ok(None),
        Err(Failed(e)) => return Err(e),
    };
    let listed = String::from_utf8_lossy(&out.stdout);
    let present = |table: &str| listed.lines().any(|l| l.trim() == format!("table {table}"));
    Ok(Some(NFT_TABLES.iter().copied().filter(|t| present(t)).collect()))
}

/// How running a tool ended, when not well.
enum Ran {
    /// Not installed.
    Missing,
    /// Ran and failed, or could not start for another reason.
    Failed(RulesError),
}
use Ran::{Failed, Missing};

/// [`run`] for a tool that must be there.
fn required(program: &str, args: &[&str], input: Option<&str>) -> Result<Output, RulesError> {
    run(program, args, input).map_err(|ran| match ran {
        Missing => RulesError::Tool { command: program.into(), message: "not installed (not on PATH)".into() },
        Failed(e) => e,
    })
}

/// Runs `program args`, feeding `input` on stdin.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<Output, Ran> {
    let command = format!("{program} {}", args.join(" "));
    let failed = |message: String| Failed(RulesError::Tool { command: command.clone(), message });
    let mut child = match Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Missing),
        Err(e) => return Err(failed(e.to_string())),
    };
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(|e| failed(format!("writing its input: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `iptables-save -t nat` prints on a node with kube-proxy (iptables mode) and kubelet.
    const NAT: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables) on Fri Dec  4 23:00:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-BBBBBBBBBBBBBBBB - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE
-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8080 -g KUBE-MARK-MASQ
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-BBBBBBBBBBBBBBBB
-A KUBE-SVC-BBBBBBBBBBBBBBBB -j KUBE-SEP-AAAAAAAAAAAAAAAA
COMMIT
"#;

    #[test]
    fn the_plan_removes_kube_proxys_chains_and_every_jump_to_them_and_nothing_else() {
        let plan = Plan::of("nat", NAT);
        assert_eq!(
            plan.chains,
            [
                "KUBE-MARK-MASQ",
                "KUBE-NODEPORTS",
                "KUBE-POSTROUTING",
                "KUBE-PROXY-CANARY",
                "KUBE-SEP-AAAAAAAAAAAAAAAA",
                "KUBE-SERVICES",
                "KUBE-SVC-BBBBBBBBBBBBBBBB"
            ]
        );
        assert_eq!(
            plan.jumps,
            [
                "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
                "-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8080 -g KUBE-MARK-MASQ",
            ]
        );
        let script = plan.script("nat");
        assert!(script.starts_with("*nat\n:KUBE-MARK-MASQ - [0:0]\n"), "{script}");
        assert!(
            script.contains("\n-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n")
        );
        assert!(script.ends_with("-X KUBE-SVC-BBBBBBBBBBBBBBBB\nCOMMIT\n"), "{script}");
        assert!(!script.contains("KUBE-KUBELET-CANARY"), "kubelet's chain stays: {script}");
    }

    #[test]
    fn a_table_without_kube_proxys_chains_needs_nothing() {
        let text = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        assert_eq!(Plan::of("filter", text), Plan::default());
    }

    #[test]
    fn kubelets_chains_are_not_kube_proxys() {
        for (table, chain) in [("nat", "KUBE-KUBELET-CANARY"), ("filter", "KUBE-FIREWALL"), ("nat", "KUBE-MARK-DROP")] {
            assert!(!is_kube_proxy_chain(table, chain), "{table} {chain}");
        }
        for (table, chain) in
            [("filter", "KUBE-PROXY-FIREWALL"), ("nat", "KUBE-EXT-X"), ("mangle", "KUBE-PROXY-CANARY")]
        {
            assert!(is_kube_proxy_chain(table, chain), "{table} {chain}");
        }
    }
}
