//! Packet-flow tables for the socket and packet paths without root, in the style of
//! kube-proxy's nftables `runPacketFlowTests`: services as a cluster states them go through the
//! real model and map writer into the writer's in-memory store; `explain` (which decides as
//! proxy-ebpf/src/lb.rs and its attach points do) then answers "client, destination → verdict"
//! from those maps. Every expected value comes from the service definitions below.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use proxy_common::{
    addr,
    affinity::{AffinityKey, AffinityValue},
    proto::TCP,
    service::{SCOPE_INTERNAL, SVC_F_TWO_SCOPES, ServiceKey},
};
use serde_json::json;

use super::{
    Snapshot,
    explain::{Origin, Query, Verdict, explain, snapshot_of},
    pins::NetnsInfo,
    view::{self, AffinityState},
};
use crate::datapath::writer::{
    fixture::{Condition, NODE, NODE_IP, OTHER_NODE, PORT, Svc, TARGET_PORT, programmed},
    recorder::Recorder,
};

const SECOND: u64 = 1_000_000_000;
const NOW: u64 = 10_000 * SECOND;

fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// A client outside the cluster.
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// Another one, with no affinity entry anywhere.
const EXTERNAL_2: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 101);
/// Inside the load balancer's source range.
const ADMITTED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
/// Outside it.
const DENIED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// A pod on this node, in network namespace `pod-a`.
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 50);
const POD_NETNS: u64 = 4242;
/// The load balancer's ingress address.
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// An endpoint here (node-1's pod range) or on node-2, numbered after its service.
fn here(n: u8) -> Ipv4Addr {
    ip(10, 244, 1, n)
}
fn there(n: u8) -> Ipv4Addr {
    ip(10, 244, 2, n)
}

fn cluster_ip(n: u8) -> Ipv4Addr {
    ip(10, 96, 0, n)
}

/// The services of the tables. Service `n` has ClusterIP 10.96.0.n, nodePort 300n and
/// endpoints 10.244.{1,2}.n.
fn services() -> Vec<Svc> {
    let svc = |name: &str, n: u8| Svc::cluster_ip(name, cluster_ip(n));
    let local = json!("Local");
    vec![
        svc("plain", 10).endpoint(here(10), NODE, Condition::Ready).endpoint(there(10), OTHER_NODE, Condition::Ready),
        svc("etp-local", 11)
            .node_port(30011)
            .spec("externalTrafficPolicy", local.clone())
            .endpoint(here(11), NODE, Condition::Ready)
            .endpoint(there(11), OTHER_NODE, Condition::Ready),
        svc("etp-local-elsewhere", 12).node_port(30012).spec("externalTrafficPolicy", local.clone()).endpoint(
            there(12),
            OTHER_NODE,
            Condition::Ready,
        ),
        svc("itp-local", 13)
            .node_port(30013)
            .spec("internalTrafficPolicy", local.clone())
            .endpoint(here(13), NODE, Condition::Ready)
            .endpoint(there(13), OTHER_NODE, Condition::Ready),
        svc("sticky", 14)
            .node_port(30014)
            .spec("sessionAffinity", json!("ClientIP"))
            .endpoint(here(14), NODE, Condition::Ready)
            .endpoint(there(14), OTHER_NODE, Condition::Ready),
        svc("sticky-etp-local", 15)
            .node_port(30015)
            .spec("externalTrafficPolicy", local.clone())
            .spec("sessionAffinity", json!("ClientIP"))
            .endpoint(here(15), NODE, Condition::Ready)
            .endpoint(there(15), OTHER_NODE, Condition::Ready),
        svc("empty", 16).node_port(30016).spec("externalTrafficPolicy", local),
        svc("draining", 17).endpoint(here(17), NODE, Condition::Terminating).endpoint(
            there(17),
            OTHER_NODE,
            Condition::Terminating,
        ),
        svc("half-draining", 18).endpoint(here(18), NODE, Condition::Ready).endpoint(
            there(18),
            OTHER_NODE,
            Condition::Terminating,
        ),
        svc("firewalled", 19)
            .load_balancer(30019, LB_IP)
            .spec("loadBalancerSourceRanges", json!(["192.0.2.0/24"]))
            .endpoint(here(19), NODE, Condition::Ready)
            .endpoint(there(19), OTHER_NODE, Condition::Ready),
    ]
}

/// Which client the kernel remembers where: (path, client, frontend, backend).
fn remembered() -> [(Origin, Ipv4Addr, SocketAddrV4, Ipv4Addr); 3] {
    [
        // The packet path keys by the client's address, the socket path by its netns.
        (Origin::Outside, EXTERNAL, SocketAddrV4::new(NODE_IP, 30014), there(14)),
        (Origin::Node, POD, SocketAddrV4::new(cluster_ip(14), PORT), here(14)),
        // From this node an eTP=Local nodePort uses the cluster-wide set: the remote endpoint.
        (Origin::Node, POD, SocketAddrV4::new(NODE_IP, 30015), there(15)),
    ]
}

/// Writes the affinity entry `lb::select` writes when it picks `backend` for `client` at
/// `frontend`: keyed by netns (socket path) or address (packet path), under the `service_id`
/// of the master of the scope it used.
fn remember(recorder: &mut Recorder, origin: Origin, frontend: SocketAddrV4, backend: Ipv4Addr, client: Ipv4Addr) {
    let mut key = ServiceKey::master(addr::from_ip(*frontend.ip()), frontend.port(), TCP);
    let maps = &recorder.maps;
    if origin == Origin::Node && maps.services[&key].flags & SVC_F_TWO_SCOPES != 0 {
        key = key.with_scope(SCOPE_INTERNAL);
    }
    let master = maps.services[&key];
    let backend_id = (1..=master.count)
        .map(|slot| maps.services[&key.with_slot(slot)].backend_id)
        .find(|id| maps.backends[id].address == addr::from_ip(backend))
        .expect("the remembered backend is in the set the path uses");
    let key = match origin {
        Origin::Node => AffinityKey { netns_cookie: POD_NETNS, service_id: master.service_id, ..Default::default() },
        Origin::Outside => {
            AffinityKey { client: addr::from_ip(client), service_id: master.service_id, ..Default::default() }
        }
    };
    recorder.affinity.insert(key, AffinityValue { last_used_ns: NOW - 10 * SECOND, backend_id, _pad: 0 });
}

/// The maps after programming [`services`], with the affinity entries of [`remembered`].
fn maps() -> Snapshot {
    let mut writer = programmed(&services());
    for (origin, client, frontend, backend) in remembered() {
        remember(writer.store_mut(), origin, frontend, backend, client);
    }
    let recorder = writer.store();
    let mut snapshot = snapshot_of(recorder);
    snapshot.now_ns = NOW;
    snapshot.affinity = Some(recorder.affinity.iter().map(|(k, v)| (*k, *v)).collect());
    snapshot.source_ranges = Some(recorder.source_range_entries());
    snapshot.netns = vec![NetnsInfo { cookie: POD_NETNS, name: "pod-a".into(), addresses: vec![POD.into()] }];
    snapshot
}

/// What happens to a new connection.
#[derive(Clone, Debug, PartialEq)]
enum Want {
    /// To one of these endpoints, with these probabilities.
    Spread(Vec<(Ipv4Addr, f64)>),
    /// To the endpoint the client's affinity entry names.
    Sticky(Ipv4Addr),
    Refused,
    Dropped,
    NotAFrontend,
}

/// Each of `endpoints` with the same share.
fn even(endpoints: &[Ipv4Addr]) -> Want {
    let share = 1.0 / endpoints.len() as f64;
    Want::Spread(endpoints.iter().map(|e| (*e, share)).collect())
}

/// What `explain` says for `origin`'s traffic from `from` to `to`, as a [`Want`].
fn verdict(snapshot: &Snapshot, origin: Origin, from: Ipv4Addr, to: SocketAddrV4) -> Want {
    let e = explain(snapshot, &Query { from: from.into(), from_port: None, to: to.into(), proto: TCP });
    if !e.service_frontend {
        return Want::NotAFrontend;
    }
    let path = e.paths.iter().find(|p| p.origins.contains(&origin)).expect("explain covers every origin");
    match path.verdict {
        Verdict::Refused => Want::Refused,
        Verdict::Dropped => Want::Dropped,
        Verdict::Sticky => {
            let to = path.sticky_to.as_deref().expect("a sticky verdict names its backend");
            let address = to.split(':').next().and_then(|a| a.parse().ok()).expect("address:port/PROTO");
            Want::Sticky(address)
        }
        // No service of these tables uses Maglev.
        Verdict::Maglev => unreachable!("a Maglev verdict in tables without Maglev services: {path:?}"),
        Verdict::Random => {
            let mut spread: Vec<(Ipv4Addr, f64)> = path
                .candidates
                .iter()
                .map(|c| {
                    assert_eq!(c.port, Some(TARGET_PORT), "{c:?}");
                    let address = c.address.expect("every slot names a backend");
                    let IpAddr::V4(address) = address else { panic!("an IPv4 backend: {address}") };
                    (address, c.probability)
                })
                .collect();
            spread.sort_by_key(|(a, _)| *a);
            Want::Spread(spread)
        }
    }
}

#[test]
fn packet_flows() {
    use Origin::{Node, Outside};
    let at = SocketAddrV4::new;
    let node_port = |port| SocketAddrV4::new(NODE_IP, port);
    let svc = |n| SocketAddrV4::new(cluster_ip(n), PORT);
    // (rule, path, client, destination, verdict)
    let table: Vec<(&str, Origin, Ipv4Addr, SocketAddrV4, Want)> = vec![
        ("a ClusterIP spreads over every endpoint", Node, POD, svc(10), even(&[here(10), there(10)])),
        ("another port of a service address is not a frontend", Node, POD, at(cluster_ip(10), 81), Want::NotAFrontend),
        ("an unused service address is not a frontend", Node, POD, svc(99), Want::NotAFrontend),
        ("an endpoint addressed directly is not a frontend", Node, POD, at(here(10), TARGET_PORT), Want::NotAFrontend),
        ("eTP Local from outside: this node's endpoint only", Outside, EXTERNAL, node_port(30011), even(&[here(11)])),
        (
            "eTP Local from this node: every endpoint (kube-proxy's short-circuit)",
            Node,
            POD,
            node_port(30011),
            even(&[here(11), there(11)]),
        ),
        ("eTP Local leaves the ClusterIP alone", Node, POD, svc(11), even(&[here(11), there(11)])),
        (
            "eTP Local, endpoints elsewhere only: dropped from outside",
            Outside,
            EXTERNAL,
            node_port(30012),
            Want::Dropped,
        ),
        ("eTP Local, endpoints elsewhere only: served from this node", Node, POD, node_port(30012), even(&[there(12)])),
        ("iTP Local: the ClusterIP from this node uses this node's endpoint", Node, POD, svc(13), even(&[here(13)])),
        ("iTP Local leaves the nodePort alone", Outside, EXTERNAL, node_port(30013), even(&[here(13), there(13)])),
        (
            "ClientIP: a remembered client (by address) goes back",
            Outside,
            EXTERNAL,
            node_port(30014),
            Want::Sticky(there(14)),
        ),
        ("ClientIP: a remembered pod (by netns) goes back", Node, POD, svc(14), Want::Sticky(here(14))),
        ("ClientIP: a new client is spread", Outside, EXTERNAL_2, node_port(30014), even(&[here(14), there(14)])),
        (
            "ClientIP under eTP Local: a pod's pick from the cluster-wide set is remembered",
            Node,
            POD,
            node_port(30015),
            Want::Sticky(there(15)),
        ),
        (
            "ClientIP under eTP Local: outside uses the local set",
            Outside,
            EXTERNAL_2,
            node_port(30015),
            even(&[here(15)]),
        ),
        ("no endpoints: refused from this node", Node, POD, svc(16), Want::Refused),
        (
            "no endpoints anywhere under eTP Local: refused from outside",
            Outside,
            EXTERNAL,
            node_port(30016),
            Want::Refused,
        ),
        ("only terminating endpoints: they serve", Node, POD, svc(17), even(&[here(17), there(17)])),
        ("a ready endpoint left: terminating ones do not serve", Node, POD, svc(18), even(&[here(18)])),
        ("a source range admits its clients", Outside, ADMITTED, at(LB_IP, PORT), even(&[here(19), there(19)])),
        ("a source range drops other clients", Outside, DENIED, at(LB_IP, PORT), Want::Dropped),
        (
            "source ranges bind the LoadBalancer address only",
            Outside,
            DENIED,
            node_port(30019),
            even(&[here(19), there(19)]),
        ),
        ("source ranges do not apply from this node", Node, POD, at(LB_IP, PORT), even(&[here(19), there(19)])),
    ];
    let snapshot = maps();
    let mut failures = Vec::new();
    for (rule, origin, from, to, want) in table {
        let got = verdict(&snapshot, origin, from, to);
        if got != want {
            failures.push(format!("{rule}: {origin:?} {from} → {to}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{} rows differ:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn inspect_sees_every_remembered_pick_as_fresh_and_inside_its_set() {
    let snapshot = maps();
    let rows = view::affinity(&snapshot);
    assert_eq!(rows.len(), remembered().len(), "{rows:?}");
    for row in rows {
        assert_eq!(row.state, AffinityState::Fresh, "{row:?}");
        assert!(!row.backend_left_service, "{row:?}");
    }
}
