//! The pure rooms of inspect/explain on hand-built snapshots: one case per rule of the kernel's
//! selection (proxy-ebpf/src/lb.rs) and its attach points, plus the formatting.

use std::net::{IpAddr, SocketAddr};

use proxy_common::{
    addr,
    affinity::{AffinityKey, AffinityValue},
    backend::{BACKEND_F_DSR, BACKEND_F_LOCAL, BACKEND_F_TERMINATING, Backend},
    proto::{TCP, UDP},
    service::*,
};

use super::{
    explain::{Origin, Query, Verdict, explain},
    pins::{NetnsInfo, Snapshot},
    render,
    view::{self, AffinityState},
};

const SECOND: u64 = 1_000_000_000;
const NOW: u64 = 5_000 * SECOND;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test addresses parse")
}

/// A snapshot under construction.
struct Build(Snapshot);

fn snapshot() -> Build {
    Build(Snapshot { root: "/sys/fs/bpf/test".into(), now_ns: NOW, affinity: Some(Vec::new()), ..Snapshot::default() })
}

fn padded<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0; N];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out
}

impl Build {
    fn name(mut self, id: u32, namespace: &str, name: &str, port: &str) -> Self {
        let value = ServiceName {
            namespace: padded(namespace),
            name: padded(name),
            port: padded(port),
            proto: TCP,
            _pad: [0; 7],
        };
        self.0.names.insert(id, value);
        self
    }

    fn backend(mut self, id: u32, address: &str, port: u16, flags: u8) -> Self {
        self.0.backends.insert(id, Backend { address: addr::from_ip(ip(address)), port, proto: TCP, flags });
        self
    }

    /// A master in `scope` with `flags`, and one slot per id, in order.
    #[expect(clippy::too_many_arguments, reason = "one call states a whole frontend")]
    fn frontend(
        mut self,
        address: &str,
        port: u16,
        scope: u8,
        flags: u16,
        service_id: u32,
        timeout: u32,
        ids: &[u32],
    ) -> Self {
        let key = ServiceKey::master(addr::from_ip(ip(address)), port, TCP).with_scope(scope);
        let master =
            ServiceValue { backend_id: 0, count: ids.len() as u16, flags, service_id, affinity_timeout: timeout };
        self.0.services.insert(key, master);
        for (i, id) in ids.iter().enumerate() {
            let slot = ServiceValue { backend_id: *id, ..ServiceValue::default() };
            self.0.services.insert(key.with_slot(i as u16 + 1), slot);
        }
        self
    }

    fn affinity(mut self, cookie: u64, client: &str, service_id: u32, backend_id: u32, age_s: u64) -> Self {
        // The socket path keys by netns and leaves the address zero, as the kernel does.
        let client = if cookie == 0 { addr::from_ip(ip(client)) } else { addr::UNSPECIFIED };
        let key = AffinityKey { netns_cookie: cookie, client, service_id, _pad: 0 };
        let value = AffinityValue { last_used_ns: NOW - age_s * SECOND, backend_id, _pad: 0 };
        self.0.affinity.get_or_insert_with(Vec::new).push((key, value));
        self
    }

    fn netns(mut self, cookie: u64, name: &str, addresses: &[&str]) -> Self {
        let addresses = addresses.iter().map(|a| ip(a)).collect();
        self.0.netns.push(NetnsInfo { cookie, name: name.into(), addresses });
        self
    }

    fn build(self) -> Snapshot {
        self.0
    }
}

const LOCAL: u8 = BACKEND_F_LOCAL;

/// default/apigw-test1 at 10.96.0.10:6666 with pods .2 and .3 on this node.
fn cluster_ip() -> Build {
    snapshot()
        .name(1, "default", "apigw-test1", "")
        .backend(1, "10.244.1.2", 80, LOCAL)
        .backend(2, "10.244.1.3", 80, LOCAL)
        .frontend("10.96.0.10", 6666, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP, 1, 0, &[1, 2])
}

/// shop/web:http on NodePort 172.18.0.2:30080 with eTP=Local: one local pod (.5) and one on
/// node-2; `local` lists the external scope's backends.
fn etp_local(local: &[u32]) -> Build {
    let flags = SVC_F_NODE_PORT | SVC_F_EXT_LOCAL | SVC_F_TWO_SCOPES;
    snapshot()
        .name(4, "shop", "web", "http")
        .backend(5, "10.244.1.5", 8080, LOCAL)
        .backend(6, "10.244.2.7", 8080, 0)
        .frontend("172.18.0.2", 30080, SCOPE_EXTERNAL, flags, 4, 0, local)
        .frontend("172.18.0.2", 30080, SCOPE_INTERNAL, flags, 4, 0, &[5, 6])
}

fn query(from: &str, to: &str, port: u16) -> Query {
    Query { from: ip(from), from_port: None, to: SocketAddr::new(ip(to), port), proto: TCP }
}

/// default/web dual stack: 10.96.0.10:80 → 10.244.1.2:8080 and [fd00:10:96::a]:80 →
/// [fd00:10:244:1::2]:8080.
fn dual_stack() -> Build {
    snapshot()
        .name(1, "default", "web", "")
        .name(2, "default", "web", "")
        .backend(1, "10.244.1.2", 8080, LOCAL)
        .backend(2, "fd00:10:244:1::2", 8080, LOCAL)
        .frontend("10.96.0.10", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP, 1, 0, &[1])
        .frontend("fd00:10:96::a", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP, 2, 0, &[2])
}

// ---- view: services ----

#[test]
fn ipv6_frontends_and_backends_are_written_with_brackets_and_json_keeps_each_family() {
    let views = view::services(&dual_stack().build());
    let texts: Vec<(&str, Vec<String>)> = views
        .iter()
        .map(|f| (f.frontend.as_str(), f.scopes[0].backends.iter().map(|b| b.endpoint.clone().unwrap()).collect()))
        .collect();
    assert_eq!(
        texts,
        [
            ("10.96.0.10:80/TCP", vec!["10.244.1.2:8080".to_owned()]),
            ("[fd00:10:96::a]:80/TCP", vec!["[fd00:10:244:1::2]:8080".to_owned()])
        ]
    );
    let json: serde_json::Value = serde_json::from_str(&render::json(&views)).unwrap();
    let addresses: Vec<&str> = json.as_array().unwrap().iter().map(|f| f["address"].as_str().unwrap()).collect();
    assert_eq!(addresses, ["10.96.0.10", "fd00:10:96::a"], "IPv4 as IPv4 text, never ::ffff:");
}

#[test]
fn explain_accepts_ipv6_and_reads_ipv4_mapped_input_as_the_ipv4_frontend() {
    let s = dual_stack().build();
    let v6 = explain(&s, &query("fd00:10:244:1::9", "fd00:10:96::a", 80));
    assert!(v6.service_frontend, "{v6:?}");
    assert_eq!(v6.to, "[fd00:10:96::a]:80/TCP");
    assert_eq!(v6.paths[0].candidates[0].endpoint.as_deref(), Some("[fd00:10:244:1::2]:8080/TCP"));

    let args = super::ExplainArgs {
        from: ip("::ffff:10.244.1.9"),
        to: "[::ffff:10.96.0.10]:80".parse().unwrap(),
        from_port: None,
        proto: super::Protocol::Tcp,
        output: super::Format::Table,
    };
    let mapped = super::explain_query(&s, &args);
    assert!(mapped.service_frontend, "{mapped:?}");
    assert_eq!(mapped.to, "10.96.0.10:80/TCP");
    assert_eq!(mapped.from, ip("10.244.1.9"));
    assert_eq!(mapped.paths[0].candidates[0].endpoint.as_deref(), Some("10.244.1.2:8080/TCP"));
    assert!(mapped.notes[0].contains("::ffff:10.96.0.10 is IPv4-mapped"), "{:?}", mapped.notes);
}

#[test]
fn nul_padded_names_are_read_up_to_the_first_nul() {
    assert_eq!(view::text(&padded::<16>("http")), "http");
    assert_eq!(view::text(b"full"), "full");
    assert_eq!(view::text(&[0; 8]), "");
}

#[test]
fn a_frontend_shows_its_service_kind_and_backends_as_addresses_in_slot_order() {
    let s = snapshot()
        .name(1, "default", "apigw-test1", "")
        .backend(1, "10.244.1.2", 80, LOCAL)
        .backend(2, "10.244.1.3", 80, LOCAL)
        // Slot order is the map's, not the id order.
        .frontend("10.96.0.10", 6666, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP, 1, 0, &[2, 1])
        .build();
    let views = view::services(&s);
    assert_eq!(views.len(), 1);
    let f = &views[0];
    assert_eq!(f.frontend, "10.96.0.10:6666/TCP");
    assert_eq!(f.service.as_deref(), Some("default/apigw-test1"));
    assert_eq!(f.kinds, ["ClusterIP"]);
    assert!(f.policies.is_empty());
    assert_eq!(f.scopes.len(), 1);
    assert_eq!(f.scopes[0].traffic, "all");
    let endpoints: Vec<_> = f.scopes[0].backends.iter().map(|b| b.endpoint.clone().unwrap()).collect();
    assert_eq!(endpoints, ["10.244.1.3:80", "10.244.1.2:80"]);
    assert!(f.problems.is_empty(), "{:?}", f.problems);
}

#[test]
fn every_flag_has_its_words() {
    let all = SVC_F_EXT_LOCAL | SVC_F_INT_LOCAL | SVC_F_AFFINITY | SVC_F_TERMINATING_FALLBACK | SVC_F_TWO_SCOPES;
    assert_eq!(
        view::policies(all, 600),
        ["eTP Local", "iTP Local", "affinity ClientIP 600s", "terminating fallback", "two scopes"]
    );
    let kinds = SVC_F_CLUSTER_IP | SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER;
    assert_eq!(view::kinds(kinds), ["ClusterIP", "NodePort", "ExternalIP", "LoadBalancer"]);
}

#[test]
fn session_affinity_is_shown_with_its_timeout() {
    let s = snapshot()
        .name(2, "shop", "cart", "")
        .backend(3, "10.244.1.8", 8080, LOCAL)
        .frontend("10.96.0.30", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP | SVC_F_AFFINITY, 2, 600, &[3])
        .build();
    let f = &view::services(&s)[0];
    assert_eq!(f.affinity_timeout_seconds, Some(600));
    assert_eq!(f.policies, ["affinity ClientIP 600s"]);
}

#[test]
fn two_scopes_show_the_external_set_then_the_internal_one() {
    let s = etp_local(&[5]).build();
    let f = &view::services(&s)[0];
    assert!(f.two_scopes);
    assert_eq!(f.external_traffic_policy, "Local");
    let scopes: Vec<_> = f.scopes.iter().map(|s| (s.scope, s.traffic, s.count)).collect();
    assert_eq!(scopes, [("external", "from outside the node", 1), ("internal", "from this node", 2)]);
    assert!(f.scopes[0].backends[0].local);
    assert!(!f.scopes[1].backends[1].local);
}

#[test]
fn missing_slots_backends_names_and_internal_masters_are_reported() {
    let mut s = cluster_ip().build();
    let key = ServiceKey::master(addr::from_ip(ip("10.96.0.10")), 6666, TCP);
    s.services.remove(&key.with_slot(2));
    s.backends.remove(&1);
    s.names.clear();
    let problems = view::services(&s)[0].problems.join("\n");
    assert!(problems.contains("slot 2 of 2 is missing"), "{problems}");
    assert!(problems.contains("names backend 1, which the backends map lacks"), "{problems}");
    assert!(problems.contains("service id 1 has no service_names entry"), "{problems}");

    let mut s = etp_local(&[5]).build();
    s.services.remove(&ServiceKey::master(addr::from_ip(ip("172.18.0.2")), 30080, TCP).with_scope(SCOPE_INTERNAL));
    let problems = view::services(&s)[0].problems.join("\n");
    assert!(problems.contains("internal-scope master is missing"), "{problems}");
}

// ---- view: backends ----

#[test]
fn backends_show_their_endpoint_node_and_users() {
    let s = cluster_ip()
        .backend(9, "10.244.2.9", 80, BACKEND_F_TERMINATING)
        .name(2, "shop", "cart", "")
        .frontend("10.96.0.30", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP, 2, 0, &[2])
        .build();
    let rows = view::backends(&s);
    let row = |id| rows.iter().find(|b| b.id == id).unwrap();
    assert_eq!(row(1).endpoint, "10.244.1.2:80/TCP");
    assert_eq!(row(1).used_by, ["default/apigw-test1"]);
    assert_eq!(row(2).used_by, ["default/apigw-test1", "shop/cart"]);
    assert_eq!(row(2).slots, 2);
    assert!(row(9).used_by.is_empty());
    assert!(row(9).terminating && !row(9).local);
}

// ---- view: affinity, in the kernel's order of checks ----

fn sticky_service() -> Build {
    cluster_ip().frontend("10.96.0.30", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP | SVC_F_AFFINITY, 7, 600, &[1, 2])
}

fn state_of(s: &Snapshot) -> AffinityState {
    view::affinity(s)[0].state
}

#[test]
fn an_entry_within_the_timeout_with_an_existing_backend_sticks() {
    let s = sticky_service().affinity(4099, "0.0.0.0", 7, 2, 30).build();
    let row = &view::affinity(&s)[0];
    assert_eq!(row.state, AffinityState::Fresh);
    assert_eq!(row.age_seconds, 30.0);
    assert_eq!(row.timeout_seconds, Some(600));
    assert_eq!(row.backend.as_deref(), Some("10.244.1.3:80/TCP"));
    assert_eq!(row.path, "socket");
    assert_eq!(row.netns_cookie, Some(4099));
    assert!(!row.backend_left_service);
}

#[test]
fn an_entry_exactly_at_the_timeout_still_sticks_one_past_it_expires() {
    // lb.rs: expired when now - last_used > timeout (strictly).
    assert_eq!(state_of(&sticky_service().affinity(1, "0.0.0.0", 7, 2, 600).build()), AffinityState::Fresh);
    assert_eq!(state_of(&sticky_service().affinity(1, "0.0.0.0", 7, 2, 601).build()), AffinityState::Expired);
}

#[test]
fn an_entry_whose_backend_is_gone_picks_anew() {
    assert_eq!(state_of(&sticky_service().affinity(1, "0.0.0.0", 7, 42, 1).build()), AffinityState::BackendGone);
}

#[test]
fn entries_of_services_without_affinity_or_gone_are_ignored() {
    assert_eq!(state_of(&cluster_ip().affinity(1, "0.0.0.0", 1, 1, 1).build()), AffinityState::AffinityOff);
    assert_eq!(state_of(&cluster_ip().affinity(1, "0.0.0.0", 99, 1, 1).build()), AffinityState::ServiceGone);
}

#[test]
fn a_fresh_entry_to_a_backend_that_left_the_service_is_flagged() {
    // The kernel only checks that the backend id exists; another service still uses it.
    let s = sticky_service()
        .backend(8, "10.244.1.9", 80, LOCAL)
        .frontend("10.96.0.50", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP, 9, 0, &[8])
        .affinity(1, "0.0.0.0", 7, 8, 1)
        .build();
    let row = &view::affinity(&s)[0];
    assert_eq!(row.state, AffinityState::Fresh);
    assert!(row.backend_left_service);
    let s = Snapshot {
        netns: vec![NetnsInfo { cookie: 1, name: "pod-a".into(), addresses: vec![ip("10.244.1.200")] }],
        ..s
    };
    let e = explain(&s, &query("10.244.1.200", "10.96.0.30", 80));
    let node = e.paths.iter().find(|p| p.origins == [Origin::Node]).unwrap();
    assert_eq!(node.sticky_to.as_deref(), Some("10.244.1.9:80/TCP"));
    assert!(node.reasons.iter().any(|r| r.contains("no longer a backend of this service")), "{node:?}");
}

#[test]
fn clients_are_named_by_netns_or_address() {
    let s = sticky_service()
        .affinity(4099, "0.0.0.0", 7, 1, 1)
        .affinity(0, "172.18.0.100", 7, 2, 1)
        .netns(4099, "pod-a", &["10.244.1.200"])
        .build();
    let rows = view::affinity(&s);
    let clients: Vec<_> = rows.iter().map(|r| (r.path, r.client.as_str())).collect();
    assert_eq!(clients, [("packet", "172.18.0.100"), ("socket", "netns pod-a (cookie 4099)")]);
    assert_eq!(rows[1].netns.as_deref(), Some("pod-a"));
    assert_eq!(rows[0].client_address, Some(ip("172.18.0.100")));
}

// ---- explain ----

#[test]
fn an_address_that_is_no_frontend_is_left_alone_with_hints() {
    let s = cluster_ip().build();
    let e = explain(&s, &query("10.244.1.200", "10.96.0.10", 80));
    assert!(!e.service_frontend);
    assert!(e.paths.is_empty());
    assert!(e.notes[0].contains("serves 6666/TCP (default/apigw-test1)"), "{:?}", e.notes);
    let direct = explain(&s, &query("10.244.1.200", "10.244.1.3", 80));
    assert!(direct.notes[0].contains("is backend 2 (an endpoint of default/apigw-test1)"), "{:?}", direct.notes);
    let udp = explain(&s, &Query { proto: UDP, ..query("10.244.1.200", "10.96.0.10", 6666) });
    assert!(!udp.service_frontend, "the protocol is part of the frontend");
    let text = render::explanation(&e);
    assert!(text.contains("not a service frontend: the datapath leaves it alone"), "{text}");
}

#[test]
fn a_cluster_ip_picks_each_backend_with_one_over_count() {
    let s = cluster_ip().build();
    let e = explain(&s, &query("10.244.1.200", "10.96.0.10", 6666));
    assert_eq!(e.frontend.as_ref().unwrap().service.as_deref(), Some("default/apigw-test1"));
    // One backend set for both kinds of traffic: one path.
    assert_eq!(e.paths.len(), 1);
    let path = &e.paths[0];
    assert_eq!(path.origins, [Origin::Node, Origin::Outside]);
    assert_eq!(path.verdict, Verdict::Random);
    let odds: Vec<_> = path.candidates.iter().map(|c| (c.endpoint.clone().unwrap(), c.probability)).collect();
    assert_eq!(odds, [("10.244.1.2:80/TCP".to_owned(), 0.5), ("10.244.1.3:80/TCP".to_owned(), 0.5)]);
    assert!(e.affinity.is_none());
}

#[test]
fn a_backend_in_several_slots_has_their_share() {
    let s = cluster_ip().frontend("10.96.0.11", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP, 1, 0, &[1, 2, 1]).build();
    let e = explain(&s, &query("10.244.1.200", "10.96.0.11", 80));
    let c = &e.paths[0].candidates;
    assert_eq!((c[0].slots.clone(), c[0].probability), (vec![1, 3], 2.0 / 3.0));
}

#[test]
fn a_service_without_endpoints_refuses() {
    let s = snapshot()
        .name(3, "shop", "db", "")
        .frontend("10.96.0.40", 5432, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP, 3, 0, &[])
        .build();
    let e = explain(&s, &query("10.244.1.200", "10.96.0.40", 5432));
    assert_eq!(e.paths.len(), 1);
    assert_eq!(e.paths[0].verdict, Verdict::Refused);
    assert!(e.paths[0].summary.contains("ECONNREFUSED"), "{}", e.paths[0].summary);
    assert!(e.paths[0].candidates.is_empty());
}

#[test]
fn etp_local_shows_both_scopes_outside_first() {
    let s = etp_local(&[5]).build();
    let e = explain(&s, &query("172.18.0.100", "172.18.0.2", 30080));
    let paths: Vec<_> = e.paths.iter().map(|p| (p.origins.clone(), p.scope, p.candidates.len())).collect();
    assert_eq!(paths, [(vec![Origin::Outside], "external", 1), (vec![Origin::Node], "internal", 2)]);
    assert!(e.paths[0].reasons.iter().any(|r| r.contains("keeps the client's source address")), "{:?}", e.paths[0]);
    assert!(e.paths[1].reasons.iter().any(|r| r.contains("every endpoint")), "{:?}", e.paths[1]);
}

#[test]
fn etp_local_without_a_local_endpoint_drops_outside_traffic_only() {
    let s = etp_local(&[]).build();
    let e = explain(&s, &query("172.18.0.100", "172.18.0.2", 30080));
    assert_eq!(e.paths[0].origins, [Origin::Outside]);
    assert_eq!(e.paths[0].verdict, Verdict::Dropped);
    assert_eq!(e.paths[1].verdict, Verdict::Random);
    let text = render::services(&view::services(&s), &s.root);
    assert!(text.contains("none: dropped"), "{text}");
}

#[test]
fn etp_cluster_nodeport_is_snated_from_outside() {
    let s = cluster_ip().frontend("172.18.0.2", 30066, SCOPE_EXTERNAL, SVC_F_NODE_PORT, 1, 0, &[1, 2]).build();
    let e = explain(&s, &query("172.18.0.100", "172.18.0.2", 30066));
    assert_eq!(e.paths.len(), 1);
    assert!(e.paths[0].reasons.iter().any(|r| r.contains("from outside: a new flow is SNATed")), "{:?}", e.paths);
}

#[test]
fn a_dsr_nodeport_says_dsr_in_explain_and_inspect() {
    let flags = SVC_F_NODE_PORT | SVC_F_DSR;
    let s = cluster_ip().frontend("172.18.0.2", 30066, SCOPE_EXTERNAL, flags, 1, 0, &[1, 2]).build();
    let e = explain(&s, &query("172.18.0.100", "172.18.0.2", 30066));
    assert_eq!(e.paths[0].lb_mode, Some("dsr"));
    assert!(e.paths[0].reasons.iter().any(|r| r.contains("direct server return")), "{:?}", e.paths);
    let views = view::services(&s);
    let modes: Vec<_> = views.iter().map(|f| (f.port, f.lb_mode)).collect();
    assert_eq!(modes, [(6666, None), (30066, Some("dsr"))], "the ClusterIP has no mode");
    assert!(render::services(&views, &s.root).contains("dsr"));
}

/// Issue 16: at a DSR frontend, a backend on a node that takes DSR is `dsr`, a local one too
/// (the client is kept), and one on a node that does not is `snat`, in `inspect services` and
/// `explain` alike.
#[test]
fn a_dsr_frontends_backend_on_a_node_without_dsr_shows_as_snat() {
    let flags = SVC_F_NODE_PORT | SVC_F_DSR;
    let s = cluster_ip()
        .backend(3, "10.244.2.3", 80, BACKEND_F_DSR)
        .backend(4, "10.244.3.4", 80, 0)
        .frontend("172.18.0.2", 30066, SCOPE_EXTERNAL, flags, 1, 0, &[1, 3, 4])
        .build();
    let views = view::services(&s);
    let node_port = views.iter().find(|f| f.port == 30066).expect("the nodePort");
    let modes: Vec<_> = node_port.scopes[0].backends.iter().map(|b| (b.backend_id, b.lb_mode)).collect();
    assert_eq!(modes, [(1, Some("dsr")), (3, Some("dsr")), (4, Some("snat"))]);
    assert!(render::services(&views, &s.root).contains("10.244.3.4:80(snat)"));
    let e = explain(&s, &query("172.18.0.100", "172.18.0.2", 30066));
    let outside = e.paths.iter().find(|p| p.origins.contains(&Origin::Outside)).expect("a path from outside");
    let modes: Vec<_> = outside.candidates.iter().map(|c| (c.backend_id, c.lb_mode)).collect();
    assert_eq!(modes, [(1, Some("dsr")), (3, Some("dsr")), (4, Some("snat"))]);
    assert!(render::explanation(&e).contains("snat: its node takes no DSR"), "{}", render::explanation(&e));
}

#[test]
fn an_etp_cluster_nodeport_without_dsr_is_snat_and_etp_local_is_local() {
    let s = cluster_ip().frontend("172.18.0.2", 30066, SCOPE_EXTERNAL, SVC_F_NODE_PORT, 1, 0, &[1, 2]).build();
    assert_eq!(explain(&s, &query("172.18.0.100", "172.18.0.2", 30066)).paths[0].lb_mode, Some("snat"));
    assert_eq!(view::lb_mode(SVC_F_NODE_PORT | SVC_F_EXT_LOCAL), Some("local"));
    assert_eq!(view::lb_mode(SVC_F_CLUSTER_IP), None);
}

#[test]
fn a_missing_internal_master_refuses_node_traffic() {
    let mut s = etp_local(&[5]).build();
    s.services.remove(&ServiceKey::master(addr::from_ip(ip("172.18.0.2")), 30080, TCP).with_scope(SCOPE_INTERNAL));
    let e = explain(&s, &query("10.244.1.200", "172.18.0.2", 30080));
    let node = e.paths.iter().find(|p| p.origins == [Origin::Node]).unwrap();
    assert_eq!(node.verdict, Verdict::Refused);
}

#[test]
fn a_cluster_ip_with_the_etp_local_flag_and_no_endpoint_is_refused_from_outside_too() {
    // tc/mod.rs drops a NoBackend under SVC_F_EXT_LOCAL only while the cluster-wide set (the
    // internal scope) has backends (`lb::cluster_has_backends`); a ClusterIP has one scope, so
    // with no endpoint the node's stack rejects, as kube-proxy does.
    let s =
        snapshot().frontend("10.96.0.20", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP | SVC_F_EXT_LOCAL, 4, 0, &[]).build();
    let e = explain(&s, &query("10.244.1.200", "10.96.0.20", 80));
    let verdicts: Vec<_> = e.paths.iter().map(|p| (p.origins.clone(), p.verdict)).collect();
    assert_eq!(verdicts, [(vec![Origin::Node, Origin::Outside], Verdict::Refused)]);
}

#[test]
fn itp_local_says_why_the_set_is_local_only() {
    let s =
        cluster_ip().frontend("10.96.0.12", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP | SVC_F_INT_LOCAL, 1, 0, &[1]).build();
    let e = explain(&s, &query("10.244.1.200", "10.96.0.12", 80));
    assert!(e.paths[0].reasons[0].starts_with("internalTrafficPolicy Local"), "{:?}", e.paths[0].reasons);
}

#[test]
fn the_terminating_fallback_is_explained() {
    let s = snapshot()
        .backend(1, "10.244.1.2", 80, LOCAL | BACKEND_F_TERMINATING)
        .frontend("10.96.0.10", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP | SVC_F_TERMINATING_FALLBACK, 1, 0, &[1])
        .build();
    let e = explain(&s, &query("10.244.1.200", "10.96.0.10", 80));
    assert!(e.paths[0].reasons.iter().any(|r| r.contains("graceful termination")), "{:?}", e.paths[0].reasons);
}

#[test]
fn a_fresh_address_entry_makes_the_packet_path_sticky() {
    let s = sticky_service().affinity(0, "172.18.0.100", 7, 2, 10).build();
    let e = explain(&s, &query("172.18.0.100", "10.96.0.30", 80));
    let outside = e.paths.iter().find(|p| p.origins == [Origin::Outside]).unwrap();
    assert_eq!(outside.verdict, Verdict::Sticky);
    assert_eq!(outside.sticky_to.as_deref(), Some("10.244.1.3:80/TCP"));
    // The socket path does not key by address: it stays random.
    let node = e.paths.iter().find(|p| p.origins == [Origin::Node]).unwrap();
    assert_eq!(node.verdict, Verdict::Random);
    let affinity = e.affinity.unwrap();
    assert_eq!(affinity.timeout_seconds, Some(600));
    assert_eq!(affinity.by_address.unwrap().backend_id, 2);
}

#[test]
fn a_fresh_netns_entry_of_the_clients_namespace_makes_the_socket_path_sticky() {
    let s = sticky_service()
        .affinity(4099, "0.0.0.0", 7, 1, 10)
        .affinity(5000, "0.0.0.0", 7, 2, 10)
        .netns(4099, "pod-a", &["127.0.0.1", "10.244.1.200"])
        .netns(5000, "pod-b", &["10.244.1.201"])
        .build();
    let e = explain(&s, &query("10.244.1.200", "10.96.0.30", 80));
    let node = e.paths.iter().find(|p| p.origins == [Origin::Node]).unwrap();
    assert_eq!(node.verdict, Verdict::Sticky);
    assert_eq!(node.sticky_to.as_deref(), Some("10.244.1.2:80/TCP"));
    let affinity = e.affinity.as_ref().unwrap();
    assert_eq!(affinity.by_netns.len(), 2, "every netns entry of the service is listed");
    assert_eq!(affinity.client_netns.as_deref(), Some("pod-a"));
    assert_eq!(e.client, ["in network namespace pod-a (cookie 4099)"]);
    let text = render::explanation(&e);
    assert!(text.contains("← 10.244.1.200's namespace"), "{text}");
}

#[test]
fn an_expired_entry_does_not_stick() {
    let s = sticky_service().affinity(0, "172.18.0.100", 7, 2, 601).build();
    let e = explain(&s, &query("172.18.0.100", "10.96.0.30", 80));
    assert!(e.paths.iter().all(|p| p.verdict == Verdict::Random), "{:?}", e.paths);
    assert_eq!(e.affinity.unwrap().by_address.unwrap().state, AffinityState::Expired);
}

#[test]
fn an_ambiguous_client_address_is_said_so_and_not_guessed() {
    let s = sticky_service()
        .affinity(4099, "0.0.0.0", 7, 1, 10)
        .netns(4099, "pod-a", &["10.244.1.200"])
        .netns(5000, "pod-b", &["10.244.1.200"])
        .build();
    let e = explain(&s, &query("10.244.1.200", "10.96.0.30", 80));
    assert!(e.paths.iter().all(|p| p.verdict == Verdict::Random));
    assert!(e.client[0].contains("ambiguous"), "{:?}", e.client);
}

// ---- render ----

#[test]
fn tables_align_columns_and_show_both_scopes() {
    let s = etp_local(&[5]).merge(cluster_ip()).build();
    let text = render::services(&view::services(&s), &s.root);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("FRONTEND"), "{text}");
    let column = lines[0].find("BACKENDS").unwrap();
    for line in &lines[1..] {
        assert!(line.len() > column, "{text}");
    }
    assert!(text.contains("eTP Local, two scopes"), "{text}");
    assert!(lines.iter().any(|l| l.trim_start().starts_with("this node") && l.contains("10.244.2.7:8080")), "{text}");
}

#[test]
fn long_backend_sets_are_cut_in_tables_but_not_in_json() {
    let mut b = snapshot().name(1, "default", "big", "");
    let ids: Vec<u32> = (1..=20).collect();
    for id in &ids {
        b = b.backend(*id, &format!("10.244.100.{id}"), 80, 0);
    }
    let s = b.frontend("10.96.0.99", 80, SCOPE_EXTERNAL, SVC_F_CLUSTER_IP, 1, 0, &ids).build();
    let text = render::services(&view::services(&s), &s.root);
    assert!(text.contains("… +12 more"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&render::json(&view::services(&s))).unwrap();
    assert_eq!(json[0]["scopes"][0]["backends"].as_array().unwrap().len(), 20);
}

#[test]
fn json_has_addresses_as_text() {
    let s = cluster_ip().build();
    let json: serde_json::Value = serde_json::from_str(&render::json(&view::backends(&s))).unwrap();
    assert_eq!(json[0]["address"], "10.244.1.2");
    assert_eq!(json[0]["endpoint"], "10.244.1.2:80/TCP");
    let e: serde_json::Value =
        serde_json::from_str(&render::json(&explain(&s, &query("10.244.1.200", "10.96.0.10", 6666)))).unwrap();
    assert_eq!(e["paths"][0]["verdict"], "random");
    assert_eq!(e["paths"][0]["origins"], serde_json::json!(["node", "outside"]));
}

#[test]
fn empty_maps_say_so() {
    let s = snapshot().build();
    assert!(render::services(&view::services(&s), &s.root).starts_with("no service frontends in /sys/fs/bpf/test"));
    assert!(render::affinity(&view::affinity(&s), &s).starts_with("no affinity entries"));
    let no_map = Snapshot { affinity: None, ..s };
    assert!(render::affinity(&[], &no_map).starts_with("no affinity map pinned under"));
}

impl Build {
    /// Adds every entry of `other`.
    fn merge(mut self, other: Build) -> Self {
        self.0.services.extend(other.0.services);
        self.0.backends.extend(other.0.backends);
        self.0.names.extend(other.0.names);
        self
    }
}

#[test]
fn explain_names_the_maglev_slot_of_an_ipv6_flow_by_the_hash_of_its_16_byte_addresses() {
    const SIZE: u32 = 251;
    let pods = ["fd00:10:244:1::2", "fd00:10:244:1::3", "fd00:10:244:2::2"];
    let named: Vec<(u32, Vec<u8>)> =
        (1..).zip(pods).map(|(id, pod)| (id, crate::maglev::backend_name(addr::from_ip(ip(pod)), 8080))).collect();
    let table = crate::maglev::build(&named, SIZE, crate::maglev::DEFAULT_SEED);
    let mut s = pods
        .iter()
        .zip(1..)
        .fold(snapshot().name(7, "default", "web", ""), |b, (pod, id)| b.backend(id, pod, 8080, 0))
        .frontend("fd00:172:18::2", 30080, SCOPE_EXTERNAL, SVC_F_NODE_PORT | SVC_F_MAGLEV, 7, 0, &[1, 2, 3])
        .build();
    let seed = 0x5eed;
    (s.maglev_seed, s.maglev_sizes, s.maglev_slots) = (Some(seed), [(7, SIZE)].into(), [(7, table.clone())].into());

    let answer =
        explain(&s, &Query { from_port: Some(40_000), ..query("fc00:f853:ccd:e793::64", "fd00:172:18::2", 30080) });
    let outside = answer.paths.iter().find(|p| p.origins.contains(&Origin::Outside)).expect("a path from outside");
    let flow = proxy_common::conntrack::CtKey {
        src: addr::from_ip(ip("fc00:f853:ccd:e793::64")),
        dst: addr::from_ip(ip("fd00:172:18::2")),
        sport: 40_000,
        dport: 30080,
        proto: TCP,
        _pad: [0; 3],
    };
    let slot = proxy_common::maglev::slot(proxy_common::maglev::flow_hash(&flow, seed), SIZE);
    assert_eq!((outside.verdict, outside.maglev_slot), (Verdict::Maglev, Some(slot)));
    let pod = pods[table[slot as usize - 1] as usize - 1];
    assert!(outside.summary.contains(&format!("to [{pod}]:8080/TCP")), "{}", outside.summary);
}
