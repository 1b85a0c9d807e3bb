//! The syncer over in-memory maps, as kube-proxy's change-tracker tests: what a change writes,
//! and what it must not.

use std::{net::Ipv4Addr, sync::Arc};

use super::{
    testing::{MemMaps, NODE, node, service, slice, with_external_ip},
    *,
};
use crate::datapath::writer::Writer;

fn sourced<T>(object: T) -> Sourced<T> {
    Sourced { object: Arc::new(object), origin: None }
}

fn syncer(maps: MemMaps) -> Syncer<MemMaps> {
    let config = SyncConfig { node_name: NODE.into(), ..SyncConfig::default() };
    Syncer::new(Writer::new(maps), config, Metrics::new())
}

fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, last)
}

fn pod(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, last)
}

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);

/// Lists every kind once: `services` with one slice each (`(name, last octet, endpoints)`),
/// and this node.
fn list_all(syncer: &mut Syncer<MemMaps>, services: &[(&str, u8, &[u8])]) {
    let svcs = services.iter().map(|(name, last, _)| sourced(service(name, *last))).collect();
    let slices = services.iter().map(|(name, _, eps)| sourced(slice(name, "a", eps))).collect();
    syncer.apply(Update::Services(Change::Replace(svcs)));
    syncer.apply(Update::Slices(Change::Replace(slices)));
    syncer.apply(Update::Nodes(Change::Replace(vec![sourced(node(NODE, NODE_IP))])));
}

fn maps(syncer: &Syncer<MemMaps>) -> &MemMaps {
    syncer.writer().store()
}

#[test]
fn nothing_is_deleted_before_every_kind_is_listed() {
    // An earlier agent programmed `web`; the maps keep it.
    let mut first = syncer(MemMaps::with_room(64));
    list_all(&mut first, &[("web", 10, &[2, 3])]);
    first.sync();
    let left = maps(&first).clone();
    assert_eq!(left.backends_of(vip(10), 80), Some(vec![pod(2), pod(3)]));

    // The next agent hears "no services" and its node before any slice list.
    let mut next = syncer(left);
    next.apply(Update::Services(Change::Replace(Vec::new())));
    next.apply(Update::Nodes(Change::Replace(vec![sourced(node(NODE, NODE_IP))])));
    next.apply(Update::Slices(Change::Apply(sourced(slice("other", "a", &[4])))));
    let report = next.sync();
    assert_eq!(report, SyncReport::default(), "no sync before the slices are listed");
    assert_eq!(maps(&next).backends_of(vip(10), 80), Some(vec![pod(2), pod(3)]), "web still served");

    next.apply(Update::Slices(Change::Replace(Vec::new())));
    next.sync();
    assert_eq!(maps(&next).backends_of(vip(10), 80), None, "listed everything: web is really gone");
    assert!(maps(&next).services.is_empty() && maps(&next).backends.is_empty(), "{:?}", maps(&next));
}

#[test]
fn a_no_op_update_writes_nothing() {
    let mut syncer = syncer(MemMaps::with_room(64));
    list_all(&mut syncer, &[("web", 10, &[2, 3])]);
    syncer.sync();
    let writes = maps(&syncer).writes;
    syncer.apply(Update::Services(Change::Apply(sourced(service("web", 10)))));
    syncer.apply(Update::Slices(Change::Apply(sourced(slice("web", "a", &[2, 3])))));
    syncer.apply(Update::Nodes(Change::Apply(sourced(node(NODE, NODE_IP)))));
    syncer.apply(Update::Nodes(Change::Apply(sourced(node("node-2", Ipv4Addr::new(172, 18, 0, 3))))));
    assert!(!syncer.pending(), "the same objects again are no change");
    let report = syncer.sync();
    assert_eq!((report.services, report.writes), (0, WriteStats::default()));
    assert_eq!(maps(&syncer).writes, writes);
}

#[test]
fn one_endpoint_change_recomputes_its_service_only() {
    let mut syncer = syncer(MemMaps::with_room(64));
    list_all(&mut syncer, &[("a", 1, &[2]), ("b", 2, &[3])]);
    syncer.sync();
    syncer.apply(Update::Slices(Change::Apply(sourced(slice("b", "a", &[3, 4])))));
    let report = syncer.sync();
    assert_eq!(report.services, 1);
    assert_eq!(maps(&syncer).backends_of(vip(2), 80), Some(vec![pod(3), pod(4)]));
}

#[test]
fn a_node_change_re_dirties_everything() {
    let mut syncer = syncer(MemMaps::with_room(64));
    list_all(&mut syncer, &[("a", 1, &[2]), ("b", 2, &[3])]);
    syncer.sync();
    syncer.apply(Update::Nodes(Change::Apply(sourced(node(NODE, Ipv4Addr::new(172, 18, 0, 9))))));
    assert!(syncer.pending());
    let report = syncer.sync();
    assert_eq!(report.services, 2, "every service is recomputed: {report:?}");
    assert_eq!(syncer.node_updates().borrow().nodeport_addresses, [std::net::IpAddr::from([172, 18, 0, 9])]);
}

#[test]
fn a_dual_stack_node_gives_each_family_its_snat_address() {
    let mut syncer = syncer(MemMaps::with_room(64));
    let mut dual = node(NODE, NODE_IP);
    let v6: std::net::Ipv6Addr = "fd00:172:18::2".parse().unwrap();
    let addresses = dual.status.as_mut().and_then(|s| s.addresses.as_mut()).unwrap();
    addresses.push(k8s_openapi::api::core::v1::NodeAddress { type_: "InternalIP".into(), address: v6.to_string() });
    syncer.apply(Update::Nodes(Change::Apply(sourced(dual))));
    let config = syncer.writer().store().config.expect("the node's settings are written");
    assert_eq!(config.snat_v4, addr::from_ip(NODE_IP));
    assert_eq!(config.snat_v6, addr::from_ip(v6), "IPv6 nodePort traffic is SNATed to the IPv6 address");
    assert_eq!(syncer.node_updates().borrow().nodeport_addresses, [std::net::IpAddr::from(NODE_IP), v6.into()]);
}

#[test]
fn a_contested_frontend_is_handed_over_when_its_owner_releases_it() {
    const EXTERNAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    let mut syncer = syncer(MemMaps::with_room(64));
    let a = with_external_ip(service("a", 1), EXTERNAL);
    let b = with_external_ip(service("b", 2), EXTERNAL);
    syncer.apply(Update::Services(Change::Replace(vec![sourced(a), sourced(b)])));
    let slices = vec![sourced(slice("a", "a", &[2])), sourced(slice("b", "a", &[3]))];
    syncer.apply(Update::Slices(Change::Replace(slices)));
    syncer.apply(Update::Nodes(Change::Replace(vec![sourced(node(NODE, NODE_IP))])));
    syncer.sync();
    assert_eq!(maps(&syncer).backends_of(EXTERNAL, 80), Some(vec![pod(2)]), "a came first and holds it");
    assert_eq!(maps(&syncer).backends_of(vip(2), 80), Some(vec![pod(3)]), "b keeps what is its own");

    syncer.apply(Update::Services(Change::Delete("default/a".into())));
    let report = syncer.sync();
    assert_eq!(maps(&syncer).backends_of(EXTERNAL, 80), Some(vec![pod(3)]), "handed to b: {report:?}");
    assert_eq!(maps(&syncer).backends_of(vip(1), 80), None);
}

#[test]
fn a_refused_service_is_retried_once_there_is_room() {
    // A ClusterIP with one endpoint takes two entries (master and slot): room for two services.
    let mut syncer = syncer(MemMaps::with_room(4));
    list_all(&mut syncer, &[("a", 1, &[2]), ("b", 2, &[3]), ("c", 3, &[4])]);
    let report = syncer.sync();
    assert_eq!(report.refused, 1, "{report:?}");
    assert_eq!(maps(&syncer).backends_of(vip(3), 80), None, "c does not fit");
    assert_eq!(syncer.refusals.services(), BTreeSet::from(["default/c".to_owned()]));

    // Retried on the periodic check, still without room: still refused, counted again.
    let report = syncer.resync();
    assert_eq!(report.refused, 1, "{report:?}");
    assert_eq!(maps(&syncer).backends_of(vip(3), 80), None);

    // a goes: the same sync lets c in.
    syncer.apply(Update::Services(Change::Delete("default/a".into())));
    let report = syncer.sync();
    assert_eq!(report.refused, 0, "{report:?}");
    assert_eq!(maps(&syncer).backends_of(vip(3), 80), Some(vec![pod(4)]), "c is in");
    assert_eq!(maps(&syncer).backends_of(vip(2), 80), Some(vec![pod(3)]), "b untouched");
    assert!(syncer.refusals.is_empty());
}

/// Issue 15: the refusal says how large the services map must be for the refused service, and
/// a map of that size holds every service.
#[test]
fn a_refusal_says_which_services_map_size_holds_the_service() {
    let services = [("a", 1, &[2][..]), ("b", 2, &[3, 5]), ("c", 3, &[4, 6, 7])];
    let notes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut syncer = syncer(MemMaps::with_room(6));
    let seen = Arc::clone(&notes);
    syncer.on_refused(Box::new(move |key, note| seen.lock().unwrap().push((key.to_owned(), note.to_owned()))));
    list_all(&mut syncer, &services);
    assert_eq!(syncer.sync().refused, 1);
    let notes = notes.lock().unwrap().clone();
    let [(key, note)] = &notes[..] else { panic!("one refusal: {notes:?}") };
    assert_eq!(key, "default/c");
    assert!(note.contains("raise --services-map-size, which sizes the services map"), "{note}");
    let size = note
        .split_once("; --services-map-size ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("a size in: {note}"));
    assert!(size > 6, "{note}");

    let mut syncer = self::syncer(MemMaps::with_room(size));
    list_all(&mut syncer, &services);
    assert_eq!(syncer.sync().refused, 0, "{size} entries hold every service");
}

#[test]
fn a_refused_service_that_is_deleted_is_no_longer_retried() {
    let mut syncer = syncer(MemMaps::with_room(2));
    list_all(&mut syncer, &[("a", 1, &[2]), ("b", 2, &[3])]);
    syncer.sync();
    assert!(!syncer.refusals.is_empty());
    syncer.apply(Update::Services(Change::Delete("default/b".into())));
    syncer.apply(Update::Slices(Change::Delete("default/b-a".into())));
    syncer.sync();
    assert!(syncer.refusals.is_empty());
    assert_eq!(syncer.resync().refused, 0);
}

/// Issue 15: a full map's refusal names the map, its size and the flag that sizes it (a full
/// `service_names` is lifted by --services-map-size: no flag of its own).
#[test]
fn a_full_map_names_the_flag_that_sizes_it() {
    let full = |map, errno| crate::datapath::WriteError {
        map,
        max_entries: Some(12),
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        }),
    };
    let text = error_chain(&full(proxy_common::maps::SERVICE_NAMES, libc::E2BIG));
    assert!(text.starts_with("writing map service_names (max_entries 12): "), "{text}");
    assert!(text.ends_with("raise --services-map-size, which sizes the service_names map; proxy_map_entries{map=\"service_names\"} and proxy_map_max_entries show its use)"), "{text}");
    let text = error_chain(&full(proxy_common::maps::SOURCE_RANGES, libc::ENOSPC));
    assert!(text.contains("raise --services-map-size, which sizes the source_ranges map"), "{text}");
    let text = error_chain(&full(proxy_common::maps::BACKENDS, libc::EPERM));
    assert!(!text.contains("the map is full"), "not full: {text}");
    // The kernel failing to allocate an element of a map with room is no reason to raise a size
    // (the bench at 100 000 services once printed a bogus `--services-map-size` hint for it).
    assert_eq!(full_map(&full(proxy_common::maps::SERVICES, libc::ENOMEM)), None);
    assert_eq!(full_map(&full(proxy_common::maps::SERVICES, libc::E2BIG)), Some(proxy_common::maps::SERVICES));
}

/// The log lines `f` writes, at debug level and above.
fn logged(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
}

/// Issue 15: a refused service retried inside a batch (a sync of many changes) has one outcome
/// in that sync: still refused (no "no longer refused" then "refused" again), or programmed.
#[test]
fn a_refused_service_retried_in_a_batch_is_logged_once_per_outcome() {
    // 70 services of one endpoint each (two entries), room for 69: one is refused.
    let names: Vec<String> = (0..70).map(|i| format!("s{i:02}")).collect();
    let services: Vec<(&str, u8, &[u8])> =
        names.iter().zip(1..).map(|(n, last)| (n.as_str(), last, &[2][..])).collect();
    let mut syncer = syncer(MemMaps::with_room(138));
    list_all(&mut syncer, &services);
    assert_eq!(syncer.sync().refused, 1);
    let [refused] = &syncer.refusals.services().into_iter().collect::<Vec<_>>()[..] else { panic!("one refusal") };

    // A node change re-dirties all 70: one batch, and the refused service still does not fit.
    syncer.apply(Update::Nodes(Change::Apply(sourced(node(NODE, Ipv4Addr::new(172, 18, 0, 9))))));
    let mut report = SyncReport::default();
    let log = logged(|| report = syncer.sync());
    assert_eq!(report.refused, 1, "{report:?}");
    assert!(!log.contains("no longer refused"), "still refused, never programmed:\n{log}");
    assert!(!log.contains("service refused as a whole"), "the same refusal, not a new one:\n{log}");
    assert_eq!(log.matches("service still refused").count(), 1, "{log}");

    // Another batch in which one service goes: the refused one fits now, and only that is logged.
    syncer.apply(Update::Services(Change::Delete("default/s00".into())));
    syncer.apply(Update::Nodes(Change::Apply(sourced(node(NODE, Ipv4Addr::new(172, 18, 0, 10))))));
    let log = logged(|| report = syncer.sync());
    assert_eq!(report.refused, 0, "{report:?}");
    assert!(syncer.refusals.is_empty());
    assert_eq!(log.matches("no longer refused").count(), 1, "{log}");
    assert!(log.contains(refused.as_str()), "{log}");
    assert!(!log.contains("refused as a whole") && !log.contains("still refused"), "{log}");
}

/// Issue 16: a Node gaining or losing the DSR annotation re-flags the backends on it, whichever
/// node it is; the Node of another node changes nothing else (no node hook, no address change).
#[test]
fn a_node_gaining_or_losing_the_dsr_annotation_re_flags_its_backends() {
    use proxy_common::backend::BACKEND_F_DSR;
    let annotated = |name: &str, address: Ipv4Addr, on: bool| {
        let mut node = node(name, address);
        if on {
            node.metadata.annotations =
                Some([(dsr::DSR_ANNOTATION.to_owned(), dsr::DSR_ANNOTATION_VALUE.to_owned())].into());
        }
        sourced(node)
    };
    let flagged =
        |syncer: &Syncer<MemMaps>| maps(syncer).backends.values().filter(|b| b.flags & BACKEND_F_DSR != 0).count();
    let config = SyncConfig { node_name: NODE.into(), lb_mode: dsr::LbMode::Dsr, ..SyncConfig::default() };
    let mut syncer = Syncer::new(Writer::new(MemMaps::with_room(64)), config, Metrics::new());
    list_all(&mut syncer, &[("web", 10, &[2, 3])]);
    syncer.sync();
    assert_eq!(flagged(&syncer), 0, "no Node says it takes DSR");

    let node_2 = Ipv4Addr::new(172, 18, 0, 3);
    syncer.apply(Update::Nodes(Change::Apply(annotated("node-2", node_2, true))));
    syncer.sync();
    assert_eq!(flagged(&syncer), 0, "node-2 holds none of the endpoints");

    syncer.apply(Update::Nodes(Change::Apply(annotated(NODE, NODE_IP, true))));
    syncer.sync();
    assert_eq!(flagged(&syncer), 2, "both endpoints are on {NODE}");
    assert_eq!(maps(&syncer).backends_of(vip(10), 80), Some(vec![pod(2), pod(3)]), "still served");

    syncer.apply(Update::Nodes(Change::Apply(annotated(NODE, NODE_IP, false))));
    syncer.sync();
    assert_eq!(flagged(&syncer), 0, "the annotation is gone");

    syncer.apply(Update::Nodes(Change::Replace(vec![
        annotated(NODE, NODE_IP, true),
        annotated("node-2", node_2, false),
    ])));
    syncer.sync();
    assert_eq!(flagged(&syncer), 2, "a relist says it too");
}
