//! The writer's Maglev tables, from Services through the real model into a [`Recorder`].

use std::net::Ipv4Addr;

use proxy_common::{
    addr,
    maglev::TABLE_SIZE_INDEX,
    service::{SVC_F_MAGLEV, ServiceKey},
};

use super::{
    Writer,
    fixture::{Condition::Ready, NODE, NODE_IP, OTHER_NODE, Svc, node, program, programmed},
    recorder::Recorder,
};
use crate::{
    inspect::{
        explain::{Query, Verdict, explain, snapshot_of},
        view,
    },
    maglev::{self, LB_ALGORITHM_ANNOTATION, LbAlgorithm, MaglevSettings},
    model::service_frontends,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 50);
const NODE_PORT: u16 = 30080;

fn pod(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, last)
}

/// A LoadBalancer service (ClusterIP, nodePort, LB IP) over pods `lasts`, Maglev by annotation.
fn maglev_service(lasts: &[u8]) -> Svc {
    let svc =
        Svc::cluster_ip("web", CLUSTER_IP).load_balancer(NODE_PORT, LB_IP).annotate(LB_ALGORITHM_ANNOTATION, "maglev");
    lasts.iter().fold(svc, |svc, &last| svc.endpoint(pod(last), if last % 2 == 0 { NODE } else { OTHER_NODE }, Ready))
}

fn master(writer: &Writer<Recorder>, address: Ipv4Addr, port: u16) -> proxy_common::service::ServiceValue {
    writer.store().maps.services[&ServiceKey::master(addr::from_ip(address), port, proxy_common::proto::TCP)]
}

/// The table the pure builder makes for pods `lasts` (named by address and target port),
/// translated to the ids the writer gave them.
fn expected_table(writer: &Writer<Recorder>, lasts: &[u8]) -> Vec<u32> {
    let id_of = |address: Ipv4Addr| {
        let backends = &writer.store().maps.backends;
        *backends.iter().find(|(_, b)| b.address == addr::from_ip(address)).expect("the pod is a backend").0
    };
    let named: Vec<(u32, Vec<u8>)> = lasts
        .iter()
        .map(|&l| (id_of(pod(l)), maglev::backend_name(addr::from_ip(pod(l)), super::fixture::TARGET_PORT)))
        .collect();
    let settings = MaglevSettings::default();
    std::iter::once(settings.table_size).chain(maglev::build(&named, settings.table_size, &settings.seed)).collect()
}

#[test]
fn a_maglev_service_has_one_table_for_its_external_frontends_and_its_cluster_ip_stays_random() {
    let writer = programmed(&[maglev_service(&[2, 3, 4])]);
    let node_port = master(&writer, NODE_IP, NODE_PORT);
    let lb = master(&writer, LB_IP, 80);
    let cluster = master(&writer, CLUSTER_IP, 80);
    assert!(node_port.flags & SVC_F_MAGLEV != 0 && lb.flags & SVC_F_MAGLEV != 0, "external frontends hash");
    assert_eq!(cluster.flags & SVC_F_MAGLEV, 0, "the socket path stays random");
    let tables = &writer.store().maglev.tables;
    assert_eq!(tables.keys().copied().collect::<Vec<_>>(), [node_port.service_id], "one table, the set's id");
    assert_eq!(lb.service_id, node_port.service_id, "shared by the frontends of the port");
    assert_eq!(tables[&node_port.service_id], expected_table(&writer, &[2, 3, 4]));
    assert_eq!(tables[&node_port.service_id][TABLE_SIZE_INDEX as usize], 16_381, "the size comes first");
}

#[test]
fn the_table_follows_the_backend_set_and_goes_with_its_last_frontend() {
    let mut writer = programmed(&[maglev_service(&[2, 3, 4])]);
    program(&mut writer, &[maglev_service(&[2, 4])]);
    let id = master(&writer, NODE_IP, NODE_PORT).service_id;
    assert_eq!(
        writer.store().maglev.tables[&id],
        expected_table(&writer, &[2, 4]),
        "rebuilt without the pod that left"
    );
    let frontends: Vec<_> = writer.programmed().copied().collect();
    for frontend in frontends {
        writer.remove(frontend).expect("removing");
    }
    assert!(writer.store().maglev.tables.is_empty(), "no frontend, no table");
}

#[test]
fn external_traffic_policy_local_hashes_over_the_local_set_in_a_table_of_its_own_id() {
    let writer = programmed(&[maglev_service(&[2, 3, 4]).spec("externalTrafficPolicy", "Local".into())]);
    let node_port = master(&writer, NODE_IP, NODE_PORT);
    let cluster = master(&writer, CLUSTER_IP, 80);
    assert_ne!(node_port.service_id, cluster.service_id, "the local set has its own id");
    assert_eq!(
        writer.store().maglev.tables[&node_port.service_id],
        expected_table(&writer, &[2, 4]),
        "local pods only"
    );
}

#[test]
fn tables_nobody_programmed_are_swept_and_deleted_ones_restored() {
    let mut writer = programmed(&[maglev_service(&[2, 3])]);
    let id = master(&writer, NODE_IP, NODE_PORT).service_id;
    writer.store_mut().maglev.tables.insert(999, vec![251; 252]);
    writer.sweep().expect("sweeping");
    assert_eq!(
        writer.store().maglev.tables.keys().copied().collect::<Vec<_>>(),
        [id],
        "the earlier agent's table went"
    );
    writer.store_mut().maglev.tables.clear();
    writer.restore().expect("restoring");
    assert_eq!(writer.store().maglev.tables[&id], expected_table(&writer, &[2, 3]));
}

#[test]
fn the_flag_chooses_maglev_unless_the_annotation_says_otherwise() {
    let maglev_node = node().with_lb_algorithm(LbAlgorithm::Maglev);
    let cases = [
        ("--lb-algorithm random, no annotation", node(), None, false),
        ("--lb-algorithm maglev, no annotation", maglev_node.clone(), None, true),
        ("the annotation turns it on", node(), Some("maglev"), true),
        ("the annotation turns it off", maglev_node.clone(), Some("random"), false),
        ("an unknown value leaves the flag's choice", maglev_node, Some("round-robin"), true),
    ];
    for (rule, node, annotation, want) in cases {
        let mut svc = Svc::cluster_ip("web", CLUSTER_IP).node_port(NODE_PORT).endpoint(pod(2), NODE, Ready);
        if let Some(value) = annotation {
            svc = svc.annotate(LB_ALGORITHM_ANNOTATION, value);
        }
        let (service, slice) = svc.objects();
        let desired = service_frontends(&service, &[&slice], &node);
        let maglev = |address: Ipv4Addr| {
            desired.frontends.iter().find(|(f, _)| f.address == address).map(|(_, e)| e.flags & SVC_F_MAGLEV != 0)
        };
        assert_eq!(maglev(NODE_IP), Some(want), "{rule}");
        assert_eq!(maglev(CLUSTER_IP), Some(false), "{rule}: a ClusterIP never");
        let reported = desired.skipped.iter().any(|s| s.field.contains(LB_ALGORITHM_ANNOTATION));
        assert_eq!(reported, annotation == Some("round-robin"), "{rule}: only a bad value is reported");
    }
}

/// `inspect services` says which frontends hash and with which table; `explain` names the slot
/// and backend of a flow from outside, as the kernel computes it, and keeps the socket path
/// random.
#[test]
fn inspect_shows_the_algorithm_and_explain_names_the_maglev_slot() {
    let writer = programmed(&[maglev_service(&[2, 3, 4])]);
    let mut snapshot = snapshot_of(writer.store());
    let settings = MaglevSettings::default();
    snapshot.maglev_seed = Some(settings.flow_seed());
    let frontends = view::services(&snapshot);
    let by_address = |address: Ipv4Addr| frontends.iter().find(|f| f.address == address).expect("a frontend");
    let node_port = by_address(NODE_IP);
    assert_eq!((node_port.algorithm, node_port.maglev_table_size), ("maglev", Some(16_381)));
    assert!(node_port.policies.contains(&"maglev M=16381".to_owned()), "{:?}", node_port.policies);
    assert_eq!((by_address(CLUSTER_IP).algorithm, by_address(CLUSTER_IP).maglev_table_size), ("random", None));

    let client = Ipv4Addr::new(172, 18, 0, 100);
    let to = std::net::SocketAddrV4::new(NODE_IP, NODE_PORT);
    let answer = explain(
        &snapshot,
        &Query { from: client.into(), from_port: Some(40_000), to: to.into(), proto: proxy_common::proto::TCP },
    );
    let outside = answer.paths.iter().find(|p| p.origins.contains(&crate::inspect::explain::Origin::Outside)).unwrap();
    let flow = proxy_common::conntrack::CtKey {
        src: addr::from_ip(client),
        dst: addr::from_ip(NODE_IP),
        sport: 40_000,
        dport: NODE_PORT,
        proto: proxy_common::proto::TCP,
        _pad: [0; 3],
    };
    let slot = proxy_common::maglev::slot(proxy_common::maglev::flow_hash(&flow, settings.flow_seed()), 16_381);
    let backend_id = expected_table(&writer, &[2, 3, 4])[slot as usize];
    let backend = writer.store().maps.backends[&backend_id];
    assert_eq!((outside.verdict, outside.maglev_slot), (Verdict::Maglev, Some(slot)));
    let named = format!("{}:{}", addr::to_ip(&backend.address), backend.port);
    assert!(
        outside.summary.contains(&named) && outside.summary.contains(&format!("slot {slot} of 16381")),
        "{}",
        outside.summary
    );
    let node = answer.paths.iter().find(|p| p.origins.contains(&crate::inspect::explain::Origin::Node)).unwrap();
    assert_eq!(node.verdict, Verdict::Random, "the socket path stays random");
}
