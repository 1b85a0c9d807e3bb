//! Stale-entry cleanup against affinity and UDP-socket entries written as the kernel writes
//! them (proxy-ebpf/src/lb.rs `select`: the id comes from the master of the scope the lookup
//! used): every valid entry stays, and only entries whose backend left their backend set go.

use std::{collections::HashMap, net::Ipv4Addr};

use proxy_common::{
    addr,
    affinity::{AffinityKey, AffinityValue},
    backend::BackendId,
    proto::TCP,
    service::{SCOPE_INTERNAL, SVC_F_TWO_SCOPES, ServiceKey},
    sock::{SockBackendKey, SockBackendValue},
};
use serde_json::json;

use super::{
    Writer,
    fixture::{Condition, NODE, NODE_IP, OTHER_NODE, PORT, Svc, program, programmed},
    recorder::{Maps, Recorder},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);

/// The attach point that picked (`lb::Origin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Path {
    /// connect/sendmsg on this node: `Origin::Node`, keyed by netns cookie.
    Socket,
    /// A packet from outside at TC: `Origin::External`, keyed by client address.
    Packet,
}

/// An eTP=Local NodePort with ClientIP affinity, one endpoint here and one on another node,
/// or (`remote_left`) the local one only.
fn web(remote_left: bool) -> Svc {
    let svc = Svc::cluster_ip("web", CLUSTER_IP)
        .node_port(NODE_PORT)
        .spec("externalTrafficPolicy", json!("Local"))
        .spec("sessionAffinity", json!("ClientIP"))
        .endpoint(LOCAL, NODE, Condition::Ready);
    if remote_left { svc } else { svc.endpoint(REMOTE, OTHER_NODE, Condition::Ready) }
}

/// The (service id, backend id) pairs `lb::select` can write for a pick at `frontend` through
/// `path`: it switches to the internal scope for traffic from this node when the master has two
/// scopes, then copies that scope's master `service_id` into the entry.
fn kernel_picks(maps: &Maps, frontend: ServiceKey, path: Path) -> Vec<(u32, BackendId)> {
    let mut key = frontend;
    if path == Path::Socket && maps.services[&key].flags & SVC_F_TWO_SCOPES != 0 {
        key = key.with_scope(SCOPE_INTERNAL);
    }
    let master = maps.services[&key];
    (1..=master.count).map(|slot| (master.service_id, maps.services[&key.with_slot(slot)].backend_id)).collect()
}

/// Fills the affinity map (and, for the socket path, `sock_backend`) with one client per pick
/// the kernel can make at either frontend through either path; returns the picks per
/// (frontend, path) with the backend's address.
fn fill_as_the_kernel(writer: &mut Writer<Recorder>) -> HashMap<(Ipv4Addr, Path), Vec<Ipv4Addr>> {
    let frontends = [(CLUSTER_IP, PORT), (NODE_IP, NODE_PORT)];
    let mut picks = HashMap::new();
    let mut client = 0u32;
    for (address, port) in frontends {
        for path in [Path::Socket, Path::Packet] {
            let key = ServiceKey::master(addr::from_ip(address), port, TCP);
            for (service_id, backend_id) in kernel_picks(&writer.store.maps, key, path) {
                client += 1;
                let value = AffinityValue { last_used_ns: 1, backend_id, _pad: 0 };
                let key = match path {
                    Path::Socket => AffinityKey { netns_cookie: client.into(), service_id, ..AffinityKey::default() },
                    Path::Packet => AffinityKey {
                        client: addr::from_v4(client.to_be_bytes()),
                        service_id,
                        ..AffinityKey::default()
                    },
                };
                writer.store.affinity.insert(key, value);
                if path == Path::Socket {
                    let address = addr::from_ip(address);
                    let key = SockBackendKey { cookie: client.into(), address, port, proto: TCP, _pad: [0; 5] };
                    writer.store.sock_backend.insert(key, SockBackendValue { backend_id, service_id });
                }
                let backend = addr::to_v4(&writer.store.maps.backends[&backend_id].address).expect("IPv4").into();
                picks.entry((address, path)).or_insert_with(Vec::new).push(backend);
            }
        }
    }
    picks
}

/// The backend id of the endpoint at `address`.
fn backend_id(writer: &Writer<Recorder>, address: Ipv4Addr) -> BackendId {
    let backends = &writer.store.maps.backends;
    *backends.iter().find(|(_, b)| b.address == addr::from_ip(address)).expect("the endpoint is programmed").0
}

/// The backend ids the affinity and UDP-socket entries name, each sorted.
fn remembered(writer: &Writer<Recorder>) -> (Vec<BackendId>, Vec<BackendId>) {
    let mut affinity: Vec<BackendId> = writer.store.affinity.values().map(|v| v.backend_id).collect();
    let mut sockets: Vec<BackendId> = writer.store.sock_backend.values().map(|v| v.backend_id).collect();
    affinity.sort();
    sockets.sort();
    (affinity, sockets)
}

#[test]
fn the_periodic_check_keeps_every_entry_the_kernel_can_write() {
    let mut writer = programmed(&[web(false)]);
    let picks = fill_as_the_kernel(&mut writer);
    // The sets the service asks for: from outside, eTP Local keeps a NodePort to this node's
    // endpoint; from this node every endpoint serves (kube-proxy's short-circuit), and the
    // ClusterIP serves every endpoint on both paths.
    let sorted = |mut v: Vec<Ipv4Addr>| {
        v.sort();
        v
    };
    assert_eq!(sorted(picks[&(NODE_IP, Path::Packet)].clone()), [LOCAL]);
    assert_eq!(sorted(picks[&(NODE_IP, Path::Socket)].clone()), [LOCAL, REMOTE]);
    assert_eq!(sorted(picks[&(CLUSTER_IP, Path::Socket)].clone()), [LOCAL, REMOTE]);
    assert_eq!(sorted(picks[&(CLUSTER_IP, Path::Packet)].clone()), [LOCAL, REMOTE]);
    let (affinity, sockets) = (writer.store.affinity.clone(), writer.store.sock_backend.clone());

    let departed = writer.forget_stale().unwrap();
    assert_eq!(departed.entries, 0, "no valid entry is deleted: {departed:?}");
    assert_eq!(writer.store.affinity, affinity, "affinity entries after the periodic check");
    assert_eq!(writer.store.sock_backend, sockets, "UDP-socket entries after the periodic check");
}

#[test]
fn the_periodic_check_removes_an_entry_whose_backend_is_outside_its_set() {
    let mut writer = programmed(&[web(false)]);
    fill_as_the_kernel(&mut writer);
    // The packet path's NodePort set is local only: an entry under its id naming the remote
    // endpoint (left from before the policy became Local) must go, the valid ones stay.
    let node_port = ServiceKey::master(addr::from_ip(NODE_IP), NODE_PORT, TCP);
    let local_set_id = writer.store.maps.services[&node_port].service_id;
    let remote_id = backend_id(&writer, REMOTE);
    let stale =
        AffinityKey { client: addr::from_v4([192, 0, 2, 1]), service_id: local_set_id, ..AffinityKey::default() };
    writer.store.affinity.insert(stale, AffinityValue { last_used_ns: 1, backend_id: remote_id, _pad: 0 });
    let valid = writer.store.affinity.len() - 1;

    let departed = writer.forget_stale().unwrap();
    assert_eq!(departed.entries, 1, "{departed:?}");
    assert!(!writer.store.affinity.contains_key(&stale), "the out-of-set entry is gone");
    assert_eq!(writer.store.affinity.len(), valid, "every valid entry stays");
}

#[test]
fn a_departed_backend_takes_its_entries_with_it_and_no_others() {
    let mut writer = programmed(&[web(false)]);
    fill_as_the_kernel(&mut writer);
    let local = backend_id(&writer, LOCAL);
    program(&mut writer, &[web(true)]);
    // Deleted by the event-driven cleanup, not left for the periodic check: the remote
    // endpoint's picks (the ClusterIP on both paths, the NodePort from this node; a socket
    // pick each at the two frontends).
    let departed = writer.forget_departed().unwrap();
    assert_eq!(departed.entries, 3 + 2, "{departed:?}");
    // The local endpoint's picks stay: both frontends, both paths; a socket pick at each.
    let want = (vec![local; 4], vec![local; 2]);
    assert_eq!(remembered(&writer), want, "entries naming the remote endpoint went, no others");
    assert_eq!(writer.forget_stale().unwrap().entries, 0, "the periodic check finds nothing more");
    assert_eq!(remembered(&writer), want);
}
