//! Moving off kube-proxy: its configuration file (`--config`), and its rules on the node
//! (found at start, removed by `--cleanup-kube-proxy`).

pub mod config;
pub mod rules;

use tracing::{debug, info, warn};

/// What to do about kube-proxy's rules, said wherever they are found.
pub const WHAT_TO_DO: &str = "stop kube-proxy (kubectl -n kube-system delete daemonset kube-proxy), then run \
     `proxy-agent --cleanup-kube-proxy` on each node (see README, Replacing kube-proxy)";

/// Looks for kube-proxy's rules and says so in one warning: while they are there, packets
/// leaving pods for a ClusterIP the socket programs missed, and nodePort traffic, meet two
/// proxies. Tools that are not installed are said at debug level.
pub fn warn_if_present() {
    let findings = rules::detect();
    if !findings.unchecked.is_empty() {
        debug!(unchecked = findings.unchecked.join("; "), "could not check all of kube-proxy's rules");
    }
    if !findings.found.is_empty() {
        warn!(
            found = findings.found.join(", "),
            what_to_do = WHAT_TO_DO,
            "kube-proxy's rules are on this node: kube-proxy is running or was not cleaned up"
        );
    }
}

/// `--cleanup-kube-proxy`: removes kube-proxy's rules and says what went.
pub fn cleanup() -> Result<(), rules::RulesError> {
    let report = rules::cleanup()?;
    if !report.unchecked.is_empty() {
        info!(unchecked = report.unchecked.join("; "), "could not check all of kube-proxy's rules");
    }
    if report.found.is_empty() {
        info!("no kube-proxy rules on this node");
    } else {
        info!(removed = report.found.join(", "), "removed kube-proxy's rules");
    }
    Ok(())
}
