//! Which interfaces should carry the TC programs, and the ones that should and do not.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use crate::{model::Cidr, sys::net};

/// The interfaces of this network namespace that hold one of `addresses` or carry a route into
/// one of `cidrs` (either family: an IPv6 pod range is routed through `/proc/net/ipv6_route`).
pub(super) fn node_interfaces(addresses: &[IpAddr], cidrs: &[Cidr]) -> io::Result<BTreeSet<String>> {
    let mut names: BTreeSet<String> =
        net::addresses()?.into_iter().filter(|(_, ip)| addresses.contains(ip)).map(|(name, _)| name).collect();
    if !cidrs.is_empty() {
        let routes = net::routes()?.into_iter();
        names.extend(
            routes
                .filter(|(iface, dest)| {
                    // A default route (`0.0.0.0`, `::`) is inside `0.0.0.0/0`, not a pod route.
                    iface != "lo" && !dest.is_unspecified() && cidrs.iter().any(|c| c.contains(*dest))
                })
                .map(|(iface, _)| iface),
        );
    }
    Ok(names)
}

/// The interfaces pods' traffic enters the node through: those routing into one of `cidrs`
/// (kind's per-pod veths, or a pod bridge) and the ports of such a bridge (its pods' veths).
pub(super) fn pod_interfaces(cidrs: &[Cidr]) -> io::Result<BTreeSet<String>> {
    let routed = node_interfaces(&[], cidrs)?;
    let bridges: Vec<String> = routed.iter().cloned().collect();
    let mut names = routed;
    names.extend(net::bridge_ports(&bridges)?);
    Ok(names)
}

/// One interface that should carry a TC program and does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnattachedInterface {
    /// The program (`tc_ingress`, `tc_egress`).
    pub program: String,
    /// The interface.
    pub interface: String,
    /// Why the last attach failed.
    pub error: String,
}

/// The interfaces that should carry a TC program and do not, with the last error: kept by the
/// datapath (an entry lives from a failed attach until one succeeds, the interface goes, or it
/// is no longer wanted) and read by `/healthz` and `/metrics`. Cheap to clone; clones share.
#[derive(Clone, Debug, Default)]
pub struct Unattached(Arc<Mutex<BTreeMap<(String, String), String>>>);

impl Unattached {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<(String, String), String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that attaching `program` to `interface` failed with `error`; whether this is news
    /// (it did not fail before, or failed otherwise), which is worth a warning.
    pub(super) fn failed(&self, program: &str, interface: &str, error: &str) -> bool {
        let previous = self.lock().insert((program.to_owned(), interface.to_owned()), error.to_owned());
        previous.as_deref() != Some(error)
    }

    /// Forgets `interface` for `program` (attached now, or gone); whether it was there.
    pub(super) fn forget(&self, program: &str, interface: &str) -> bool {
        self.lock().remove(&(program.to_owned(), interface.to_owned())).is_some()
    }

    /// Keeps only the interfaces of `program` for which `wanted` holds (and every other
    /// program's).
    pub(super) fn retain(&self, program: &str, wanted: impl Fn(&str) -> bool) {
        self.lock().retain(|(p, interface), _| p != program || wanted(interface));
    }

    /// Every interface that should carry a program and does not, by program and interface.
    pub fn list(&self) -> Vec<UnattachedInterface> {
        self.lock()
            .iter()
            .map(|((program, interface), error)| UnattachedInterface {
                program: program.clone(),
                interface: interface.clone(),
                error: error.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn a_failure_is_news_once_and_lasts_until_an_attach_succeeds_or_the_interface_is_unwanted() {
        let unattached = Unattached::default();
        let shared = unattached.clone();
        assert!(unattached.failed("tc_ingress", "eth0", "ERANGE"), "the first failure is news");
        assert!(!unattached.failed("tc_ingress", "eth0", "ERANGE"), "the same failure again is not");
        assert!(unattached.failed("tc_ingress", "eth0", "EBUSY"), "another failure is");
        assert!(unattached.failed("tc_egress", "eth0", "EBUSY"));
        let listed: Vec<(String, String)> = shared.list().into_iter().map(|u| (u.program, u.interface)).collect();
        assert_eq!(listed, [("tc_egress".into(), "eth0".into()), ("tc_ingress".into(), "eth0".into())]);
        assert!(unattached.forget("tc_ingress", "eth0"), "an attach that succeeds ends it");
        assert!(!unattached.forget("tc_ingress", "eth0"));
        unattached.retain("tc_egress", |interface| interface != "eth0");
        assert!(shared.list().is_empty(), "an interface no longer wanted is not missing a program");
    }

    #[test]
    fn loopback_holds_both_localhosts_and_routes_into_no_pod_range() {
        let lo = node_interfaces(&[Ipv4Addr::LOCALHOST.into()], &[]).unwrap();
        assert!(lo.contains("lo"), "{lo:?}");
        let lo6 = node_interfaces(&[std::net::Ipv6Addr::LOCALHOST.into()], &[]).unwrap();
        assert!(lo6.contains("lo"), "an IPv6 address finds its interface too: {lo6:?}");
        let cidr: Cidr = "127.0.0.0/8".parse().unwrap();
        let none = node_interfaces(&[], &[cidr]).unwrap();
        assert!(!none.contains("lo"), "loopback routes are not pod routes: {none:?}");
    }
}
