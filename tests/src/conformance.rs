//! The conformance table: every row of `docs/behaviours.md` (the upstream
//! Kubernetes e2e tests that exercise the service datapath), whether it can be reproduced
//! without a cluster, and the end-to-end tests that prove it here, as `suite::test` (a file of
//! `tests/tests/` and a test in it). Rows proven by earlier suites point there; the others are
//! in `tests/tests/conformance.rs`.
//!
//! `cargo xtask conformance` runs the tests the table names, reads libtest's report
//! ([`parse_libtest`]), judges every row ([`judge`]) and writes the table to `CONFORMANCE.md`
//! ([`render`]). This file uses `std` alone: the xtask includes it by path, so the table and
//! its reading live in one place.

use std::collections::{BTreeMap, BTreeSet};

/// Set (to anything) by `cargo xtask conformance --quick`: the affinity-timeout rows use a short
/// timeout instead of upstream's 125 s.
pub const QUICK_ENV: &str = "PROXY_CONFORMANCE_QUICK";

/// Rows that can be reproduced without a cluster (`yes` and `yes*`): the denominator of "N of 101".
pub const REPRODUCIBLE_ROWS: usize = 101;

/// Whether a row can be reproduced with network namespaces, a test API server (or manifest
/// directory) and the agent, as `docs/behaviours.md` classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reproducible {
    /// The harness publishes a Service and plain EndpointSlices.
    Yes,
    /// The harness also stands in for a controller (the test's doc comment says how).
    YesStar,
    /// Only the proxy side can be reproduced; the trigger is kubelet's or a controller's.
    Partial,
    /// Needs DNS, kubelet or a container runtime.
    No,
}

impl Reproducible {
    /// Whether the row counts among the [`REPRODUCIBLE_ROWS`].
    pub fn counts(self) -> bool {
        matches!(self, Self::Yes | Self::YesStar)
    }

    fn label(self) -> &'static str {
        match self {
            Self::Yes => "yes",
            Self::YesStar => "yes*",
            Self::Partial => "partial",
            Self::No => "no",
        }
    }
}

/// One upstream e2e test.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    /// The row's number in `docs/behaviours.md`.
    pub number: u8,
    /// The upstream test's title (abbreviated as there).
    pub title: &'static str,
    /// Tagged `[Conformance]` upstream.
    pub conformance: bool,
    /// Whether it can be reproduced here.
    pub reproducible: Reproducible,
    /// The tests that prove it, `suite::test`; the row passes when every one of them passes.
    /// A ClusterIP row also names the `mesh` suite's `NAME::<family>::mesh` tests: the same
    /// behaviour under `--bpf-lb-sock-hostns-only`, so the row holds in both modes.
    pub tests: &'static [&'static str],
    /// What is missing for the row to pass (the part its tests, if any, do not prove), or why it
    /// cannot be reproduced; empty otherwise.
    pub gap: &'static str,
}

/// The 106 rows, in order.
pub const ROWS: &[Row] = &[
    Row {
        number: 1,
        title: "Services: should serve a basic endpoint from pods",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &[
            "control_plane::e2e_01_serve_a_basic_endpoint_from_pods",
            "mesh::uniform_pick_without_snat::ipv4::mesh",
            "mesh::uniform_pick_without_snat::ipv6::mesh",
            "mesh::endpoints_on_both_nodes::ipv4::mesh",
            "mesh::endpoints_on_both_nodes::ipv6::mesh",
        ],
        gap: "",
    },
    Row {
        number: 2,
        title: "Services: should serve multiport endpoints from pods",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_02_multiport_named_target_ports_on_different_pods"],
        gap: "",
    },
    Row {
        number: 3,
        title: "Services: should be updated after adding or deleting ports",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_03_ports_added_and_removed_live"],
        gap: "",
    },
    Row {
        number: 4,
        title: "Services: should preserve source pod IP for traffic thru service cluster IP [LinuxOnly]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[
            "semantics::e2e_04_backends_see_the_client_pod_address",
            "mesh::uniform_pick_without_snat::ipv4::mesh",
            "mesh::uniform_pick_without_snat::ipv6::mesh",
        ],
        gap: "",
    },
    Row {
        number: 5,
        title: "Services: should allow pods to hairpin back to themselves through services",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[
            "semantics::e2e_05_hairpin_to_itself_through_its_service",
            "mesh::hairpin::ipv4::mesh",
            "mesh::hairpin::ipv6::mesh",
        ],
        gap: "",
    },
    Row {
        number: 6,
        title: "Services: should be able to up and down services",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["control_plane::e2e_06_up_and_down_services"],
        gap: "",
    },
    Row {
        number: 7,
        title: "Services: should work after the service has been recreated",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["control_plane::e2e_07_works_after_the_service_has_been_recreated"],
        gap: "",
    },
    Row {
        number: 8,
        title: "Services: should work after restarting kube-proxy [Disruptive]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["control_plane::e2e_08_works_after_restarting_the_agent"],
        gap: "",
    },
    Row {
        number: 9,
        title: "Services: should work after restarting apiserver [Disruptive]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["control_plane::e2e_09_apiserver_restart"],
        gap: "",
    },
    Row {
        number: 10,
        title: "Services: should be able to create a functioning NodePort service",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &[
            "nodeport::e2e_10_nodeport_reaches_pods_on_both_nodes",
            "control_plane::e2e_10_nodeport_on_the_node_address",
            "conformance::e2e_54_pod_to_service_tcp",
        ],
        gap: "",
    },
    Row {
        number: 11,
        title: "Services: should be possible to connect to a service via ExternalIP when the external IP is not assigned to a node",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["nodeport::e2e_11_external_ip_and_load_balancer_ip", "conformance::e2e_11_external_ip_from_a_pod"],
        gap: "",
    },
    Row {
        number: 12,
        title: "Services: should be able to update service type to NodePort listening on same port number but different protocols",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_12_cluster_ip_to_node_port_tcp_and_udp_on_one_port"],
        gap: "",
    },
    Row {
        number: 13,
        title: "Services: should be able to change the type from ExternalName to ClusterIP",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_13_external_name_to_cluster_ip"],
        gap: "",
    },
    Row {
        number: 14,
        title: "Services: should be able to change the type from ExternalName to NodePort",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_14_external_name_to_node_port"],
        gap: "",
    },
    Row {
        number: 15,
        title: "Services: should be able to change the type from ClusterIP to ExternalName",
        conformance: true,
        reproducible: Reproducible::No,
        tests: &[],
        gap: "DNS: after the change the Service is reached through its name (a CNAME record); the VIP and nodePort leaving the datapath is what rows 6 and 17 check",
    },
    Row {
        number: 16,
        title: "Services: should be able to change the type from NodePort to ExternalName",
        conformance: true,
        reproducible: Reproducible::No,
        tests: &[],
        gap: "DNS: after the change the Service is reached through its name (a CNAME record); the VIP and nodePort leaving the datapath is what rows 6 and 17 check",
    },
    Row {
        number: 17,
        title: "Services: should release NodePorts on delete",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_17_node_ports_released_on_delete"],
        gap: "",
    },
    Row {
        number: 18,
        title: "Services: should create endpoints for unready pods",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &["conformance::e2e_18_publish_not_ready_addresses_toggled_live"],
        gap: "",
    },
    Row {
        number: 19,
        title: "Services: should be able to connect to terminating and unready endpoints if PublishNotReadyAddresses is true",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &["conformance::e2e_19_terminating_unready_endpoint_served_with_publish_not_ready_addresses"],
        gap: "",
    },
    Row {
        number: 20,
        title: "Services: should not be able to connect to terminating and unready endpoints if PublishNotReadyAddresses is false",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[
            "semantics::e2e_38_terminating_fallback_via_node_ports_and_e2e_20_not_serving_is_refused",
            "semantics::e2e_36_terminating_endpoints_serve_when_none_is_ready",
        ],
        gap: "",
    },
    Row {
        number: 21,
        title: "Services: should have session affinity work for service with type clusterIP [LinuxOnly]",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &[
            "semantics::e2e_21_client_ip_affinity_sticks_per_client_pod",
            "mesh::client_ip_affinity::ipv4::mesh",
            "mesh::client_ip_affinity::ipv6::mesh",
        ],
        gap: "",
    },
    Row {
        number: 22,
        title: "Services: should have session affinity timeout work for service with type clusterIP [LinuxOnly]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[
            "semantics::e2e_22_client_ip_affinity_expires_after_its_timeout",
            "conformance::e2e_22_affinity_timeout_125s_cluster_ip",
        ],
        gap: "",
    },
    Row {
        number: 23,
        title: "Services: should be able to switch session affinity for service with type clusterIP [LinuxOnly]",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &["semantics::e2e_23_switch_session_affinity_live"],
        gap: "",
    },
    Row {
        number: 24,
        title: "Services: should have session affinity work for NodePort service [LinuxOnly]",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &["semantics::e2e_24_client_ip_affinity_via_node_port"],
        gap: "",
    },
    Row {
        number: 25,
        title: "Services: should have session affinity timeout work for NodePort service [LinuxOnly]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_25_affinity_timeout_125s_node_port"],
        gap: "",
    },
    Row {
        number: 26,
        title: "Services: should be able to switch session affinity for NodePort service [LinuxOnly]",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_26_switch_affinity_node_port"],
        gap: "",
    },
    Row {
        number: 27,
        title: "Services: should implement service.kubernetes.io/service-proxy-name",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_27_service_proxy_name_label_toggled_live"],
        gap: "",
    },
    Row {
        number: 28,
        title: "Services: should implement service.kubernetes.io/headless",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_28_headless_label_toggled_live"],
        gap: "",
    },
    Row {
        number: 29,
        title: "Services: should be rejected when no endpoints exist",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[
            "semantics::e2e_29_no_endpoints_refuses_at_once",
            "semantics::e2e_29_no_endpoints_refuses_external_traffic_policy_local_too",
            "mesh::no_endpoints_refused::ipv4::mesh",
            "mesh::no_endpoints_refused::ipv6::mesh",
        ],
        gap: "",
    },
    Row {
        number: 30,
        title: "Services: should be rejected for evicted pods (no endpoints exist)",
        conformance: false,
        reproducible: Reproducible::Partial,
        tests: &[],
        gap: "the trigger is kubelet evicting pods (phase Failed, left out of the slices even with publishNotReadyAddresses); the proxy side, no endpoint left means REJECT, is row 29",
    },
    Row {
        number: 31,
        title: "Services: should respect internalTrafficPolicy=Local Pod to Pod",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[
            "semantics::e2e_31_internal_traffic_policy_local",
            "semantics::e2e_31_affinity_does_not_override_internal_traffic_policy_local",
            "mesh::internal_traffic_policy_local::ipv4::mesh",
            "mesh::internal_traffic_policy_local::ipv6::mesh",
        ],
        gap: "",
    },
    Row {
        number: 32,
        title: "Services: should respect internalTrafficPolicy=Local Pod (hostNetwork: true) to Pod",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_32_internal_traffic_policy_local_host_network_clients"],
        gap: "",
    },
    Row {
        number: 33,
        title: "Services: should respect internalTrafficPolicy=Local Pod and Node, to Pod (hostNetwork: true)",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_33_internal_traffic_policy_local_host_network_backend"],
        gap: "",
    },
    Row {
        number: 34,
        title: "Services: should support externalTrafficPolicy=Local for type=NodePort",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["nodeport::e2e_34_external_traffic_policy_local"],
        gap: "",
    },
    Row {
        number: 35,
        title: "Services: should fail health check node port if there are only terminating endpoints",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["nodeport::e2e_35_health_check_node_port"],
        gap: "",
    },
    Row {
        number: 36,
        title: "Services: should fallback to terminating endpoints when there are no ready endpoints with internalTrafficPolicy=Cluster",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["semantics::e2e_36_terminating_endpoints_serve_when_none_is_ready"],
        gap: "",
    },
    Row {
        number: 37,
        title: "Services: should fallback to local terminating endpoints when there are no ready endpoints with internalTrafficPolicy=Local",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["semantics::e2e_37_39_local_terminating_fallback"],
        gap: "",
    },
    Row {
        number: 38,
        title: "Services: should fallback to terminating endpoints when there are no ready endpoints with externallTrafficPolicy=Cluster",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["semantics::e2e_38_terminating_fallback_via_node_ports_and_e2e_20_not_serving_is_refused"],
        gap: "",
    },
    Row {
        number: 39,
        title: "Services: should fallback to local terminating endpoints when there are no ready endpoints with externalTrafficPolicy=Local",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["semantics::e2e_37_39_local_terminating_fallback"],
        gap: "",
    },
    Row {
        number: 40,
        title: "Services: should serve endpoints on same port and different protocols",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_40_same_port_tcp_and_udp_each_removable"],
        gap: "",
    },
    Row {
        number: 41,
        title: "Services: should serve endpoints on same port and different protocol for internal traffic on Type LoadBalancer",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_41_same_port_tcp_and_udp_on_a_load_balancer_cluster_ip"],
        gap: "",
    },
    Row {
        number: 42,
        title: "Services: should allow creating a basic SCTP service with pod and endpoints [LinuxOnly] [Serial]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_42_sctp_service_loads_no_module"],
        gap: "",
    },
    Row {
        number: 43,
        title: "Services: should implement NodePort and HealthCheckNodePort correctly when ExternalTrafficPolicy changes",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_43_node_port_and_health_check_follow_external_traffic_policy"],
        gap: "",
    },
    Row {
        number: 44,
        title: "Services: should connect to the ports exposed by restartable init containers",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &["conformance::e2e_44_sidecar_port"],
        gap: "",
    },
    Row {
        number: 45,
        title: "Services: should connect to the named ports exposed by restartable init containers",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &["conformance::e2e_45_named_sidecar_port"],
        gap: "",
    },
    Row {
        number: 46,
        title: "Conntrack: should be able to preserve UDP traffic when server pod cycles for a NodePort service",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_46_udp_node_port_server_pod_cycles"],
        gap: "",
    },
    Row {
        number: 47,
        title: "Conntrack: should be able to preserve UDP traffic when server pod cycles for a ClusterIP service",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_47_udp_cluster_ip_server_pod_cycles"],
        gap: "",
    },
    Row {
        number: 48,
        title: "Conntrack: should be able to preserve UDP traffic when server pod cycles for a ClusterIP service with InternalTrafficPolicy set to Local",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_48_udp_internal_traffic_policy_local_server_pod_cycles"],
        gap: "",
    },
    Row {
        number: 49,
        title: "Conntrack: should be able to preserve UDP traffic when server pod cycles for a ClusterIP service and client is hostNetwork",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_49_udp_host_network_client_server_pod_cycles"],
        gap: "",
    },
    Row {
        number: 50,
        title: "Conntrack: should be able to preserve UDP traffic when initial unready endpoints get ready",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_50_udp_initially_unready_endpoint_gets_ready"],
        gap: "",
    },
    Row {
        number: 51,
        title: "Conntrack: proxy implementation should not be vulnerable to the invalid conntrack state bug [Privileged]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_51_out_of_window_packet_causes_no_reset"],
        gap: "",
    },
    Row {
        number: 52,
        title: "KubeProxy: should set TCP CLOSE_WAIT timeout [Privileged]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_52_half_closed_flow_lives_an_hour"],
        gap: "",
    },
    Row {
        number: 53,
        title: "Networking: should check kube-proxy urls",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_53_proxy_mode_url"],
        gap: "",
    },
    Row {
        number: 54,
        title: "Networking Granular Checks: Services should function for pod-Service: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_54_pod_to_service_tcp"],
        gap: "",
    },
    Row {
        number: 55,
        title: "Networking Granular Checks: Services should function for pod-Service: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[
            "conformance::e2e_55_pod_to_service_udp",
            "mesh::udp_replies_from_the_cluster_ip::ipv4::mesh",
            "mesh::udp_replies_from_the_cluster_ip::ipv6::mesh",
        ],
        gap: "",
    },
    Row {
        number: 56,
        title: "Networking Granular Checks: Services should function for pod-Service: sctp [Feature:SCTPConnectivity]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[],
        gap: "SCTP: this kernel has no SCTP (CONFIG_IP_SCTP is not set, socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails with EPROTONOSUPPORT), so no SCTP client or server can run here; on an SCTP kernel the TC path would still need SCTP parsing and checksum (CRC32c) handling in proxy-ebpf/src/tc/ (packet.rs, nat.rs), which knows TCP and UDP only",
    },
    Row {
        number: 57,
        title: "Networking Granular Checks: Services should function for node-Service: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_57_node_to_service_tcp"],
        gap: "",
    },
    Row {
        number: 58,
        title: "Networking Granular Checks: Services should function for node-Service: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_58_node_to_service_udp"],
        gap: "",
    },
    Row {
        number: 59,
        title: "Networking Granular Checks: Services should function for node-Service: sctp [Feature:SCTPConnectivity]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[],
        gap: "SCTP: this kernel has no SCTP (CONFIG_IP_SCTP is not set, socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails with EPROTONOSUPPORT), so no SCTP client or server can run here; on an SCTP kernel the TC path would still need SCTP parsing and checksum (CRC32c) handling in proxy-ebpf/src/tc/ (packet.rs, nat.rs), which knows TCP and UDP only",
    },
    Row {
        number: 60,
        title: "Networking Granular Checks: Services should function for endpoint-Service: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_60_endpoint_to_own_service_tcp"],
        gap: "",
    },
    Row {
        number: 61,
        title: "Networking Granular Checks: Services should function for endpoint-Service: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_61_endpoint_to_own_service_udp"],
        gap: "",
    },
    Row {
        number: 62,
        title: "Networking Granular Checks: Services should function for endpoint-Service: sctp [Feature:SCTPConnectivity]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[],
        gap: "SCTP: this kernel has no SCTP (CONFIG_IP_SCTP is not set, socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails with EPROTONOSUPPORT), so no SCTP client or server can run here; on an SCTP kernel the TC path would still need SCTP parsing and checksum (CRC32c) handling in proxy-ebpf/src/tc/ (packet.rs, nat.rs), which knows TCP and UDP only",
    },
    Row {
        number: 63,
        title: "Networking Granular Checks: Services should function for multiple endpoint-Services with same selector",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_63_services_sharing_endpoints"],
        gap: "",
    },
    Row {
        number: 64,
        title: "Networking Granular Checks: Services should update endpoints: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["control_plane::e2e_64_update_endpoints_while_traffic_flows"],
        gap: "",
    },
    Row {
        number: 65,
        title: "Networking Granular Checks: Services should update endpoints: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_65_update_endpoints_udp"],
        gap: "",
    },
    Row {
        number: 66,
        title: "Networking Granular Checks: Services should update nodePort: http [Slow]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_66_update_node_port_tcp"],
        gap: "",
    },
    Row {
        number: 67,
        title: "Networking Granular Checks: Services should support basic nodePort: udp functionality",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_67_udp_node_port_from_the_host"],
        gap: "",
    },
    Row {
        number: 68,
        title: "Networking Granular Checks: Services should update nodePort: udp [Slow]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_68_update_node_port_udp"],
        gap: "",
    },
    Row {
        number: 69,
        title: "Networking Granular Checks: Services should function for client IP based session affinity: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[
            "semantics::e2e_21_client_ip_affinity_sticks_per_client_pod",
            "mesh::client_ip_affinity::ipv4::mesh",
            "mesh::client_ip_affinity::ipv6::mesh",
        ],
        gap: "",
    },
    Row {
        number: 70,
        title: "Networking Granular Checks: Services should function for client IP based session affinity: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_70_client_ip_affinity_udp"],
        gap: "",
    },
    Row {
        number: 71,
        title: "Networking Granular Checks: Services should be able to handle large requests: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_71_large_request_tcp"],
        gap: "",
    },
    Row {
        number: 72,
        title: "Networking Granular Checks: Services should be able to handle large requests: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_72_large_request_udp"],
        gap: "",
    },
    Row {
        number: 73,
        title: "Networking Granular Checks: Services should function for service endpoints using hostNetwork",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_73_host_network_endpoints"],
        gap: "",
    },
    Row {
        number: 74,
        title: "Networking: should recreate its iptables rules if they are deleted [Disruptive]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["reliability::wiped_maps_and_links_are_restored_by_the_periodic_check"],
        gap: "",
    },
    Row {
        number: 75,
        title: "EndpointSlice: should support a Service with multiple ports specified in multiple EndpointSlices",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_75_one_ip_ports_in_separate_slices"],
        gap: "",
    },
    Row {
        number: 76,
        title: "EndpointSlice: should support a Service with multiple endpoint IPs specified in multiple EndpointSlices",
        conformance: true,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_76_endpoint_ips_in_separate_slices"],
        gap: "",
    },
    Row {
        number: 77,
        title: "EndpointSliceMirroring: should mirror a custom Endpoint with multiple subsets and same IP address",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &["conformance::e2e_77_mirrored_slices_same_ip"],
        gap: "",
    },
    Row {
        number: 78,
        title: "Traffic Distribution: should route traffic to an endpoint in the same zone when using PreferClose",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &["conformance::e2e_78_prefer_close_routes_to_the_same_zone"],
        gap: "",
    },
    Row {
        number: 79,
        title: "Traffic Distribution: should route traffic correctly between pods on multiple nodes when using PreferClose",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &["conformance::e2e_79_prefer_close_across_nodes_of_a_zone"],
        gap: "",
    },
    Row {
        number: 80,
        title: "Traffic Distribution: should route traffic to an endpoint in the same zone when using PreferSameZone",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &["conformance::e2e_80_prefer_same_zone_routes_to_the_same_zone"],
        gap: "",
    },
    Row {
        number: 81,
        title: "Traffic Distribution: should route traffic correctly between pods on multiple nodes when using PreferSameZone",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &["conformance::e2e_81_prefer_same_zone_across_nodes_of_a_zone"],
        gap: "",
    },
    Row {
        number: 82,
        title: "Traffic Distribution: should route traffic to an endpoint on the same node or fall back to same zone when using PreferSameNode",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &[
            "conformance::e2e_82_prefer_same_node_falls_back_to_the_zone_then_all",
            "mesh::topology_hints_same_node::ipv4::mesh",
            "mesh::topology_hints_same_node::ipv6::mesh",
        ],
        gap: "",
    },
    Row {
        number: 83,
        title: "Traffic Distribution: should route traffic to an endpoint on the same node when using PreferSameNode and fall back when the endpoint becomes unavailable",
        conformance: false,
        reproducible: Reproducible::YesStar,
        tests: &["conformance::e2e_83_prefer_same_node_falls_back_when_the_local_endpoint_goes"],
        gap: "",
    },
    Row {
        number: 84,
        title: "Topology Hints: should distribute endpoints evenly",
        conformance: false,
        reproducible: Reproducible::Partial,
        tests: &[],
        gap: "the hints come from the EndpointSlice controller's allocation (service.kubernetes.io/topology-mode: Auto); the proxy side, honouring hints, is rows 78-83",
    },
    Row {
        number: 85,
        title: "LocalhostNodePorts: should proxy localhost NodePort traffic to backends across nodes [Feature:LocalhostNodePorts]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_85_localhost_node_port"],
        gap: "",
    },
    Row {
        number: 86,
        title: "LocalhostNodePorts: should honor sessionAffinity=ClientIP for localhost NodePort",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_86_localhost_node_port_affinity"],
        gap: "",
    },
    Row {
        number: 87,
        title: "LocalhostNodePorts: should let a node pull an image from a registry exposed via localhost NodePort",
        conformance: false,
        reproducible: Reproducible::No,
        tests: &[],
        gap: "kubelet and the container runtime pull an image through the localhost NodePort",
    },
    Row {
        number: 88,
        title: "CVE-2021-29923: IPv4 Service Type ClusterIP with leading zeros should work interpreted as decimal",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_88_leading_zero_cluster_ip_is_decimal"],
        gap: "",
    },
    Row {
        number: 89,
        title: "IPv6DualStack: should create service with ipv4 cluster ip",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_89_ipv4_cluster_ip"],
        gap: "",
    },
    Row {
        number: 90,
        title: "IPv6DualStack: should create service with ipv6 cluster ip",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_90_ipv6_cluster_ip"],
        gap: "",
    },
    Row {
        number: 91,
        title: "IPv6DualStack: should create service with ipv4,v6 cluster ip",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_91_ipv4_ipv6_cluster_ips"],
        gap: "",
    },
    Row {
        number: 92,
        title: "IPv6DualStack: should create service with ipv6,v4 cluster ip",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_92_ipv6_ipv4_cluster_ips"],
        gap: "",
    },
    Row {
        number: 93,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should function for pod-Service: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_93_pod_to_secondary_family_tcp"],
        gap: "",
    },
    Row {
        number: 94,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should function for pod-Service: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_94_pod_to_secondary_family_udp"],
        gap: "",
    },
    Row {
        number: 95,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should function for pod-Service: sctp [Feature:SCTPConnectivity]",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &[],
        gap: "SCTP: this kernel has no SCTP (CONFIG_IP_SCTP is not set, socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails with EPROTONOSUPPORT), so no SCTP client or server can run here; on an SCTP kernel the TC path would still need SCTP parsing and checksum (CRC32c) handling in proxy-ebpf/src/tc/ (packet.rs, nat.rs), which knows TCP and UDP only",
    },
    Row {
        number: 96,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should function for node-Service: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_96_node_to_secondary_family_tcp"],
        gap: "",
    },
    Row {
        number: 97,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should function for node-Service: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_97_node_to_secondary_family_udp"],
        gap: "",
    },
    Row {
        number: 98,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should function for endpoint-Service: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_98_endpoint_to_own_secondary_family_tcp"],
        gap: "",
    },
    Row {
        number: 99,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should function for endpoint-Service: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_99_endpoint_to_own_secondary_family_udp"],
        gap: "",
    },
    Row {
        number: 100,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should update endpoints: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_100_update_secondary_family_endpoints_tcp"],
        gap: "",
    },
    Row {
        number: 101,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should update endpoints: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_101_update_secondary_family_endpoints_udp"],
        gap: "",
    },
    Row {
        number: 102,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should function for client IP based session affinity: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_102_secondary_family_client_ip_affinity_tcp"],
        gap: "",
    },
    Row {
        number: 103,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should function for client IP based session affinity: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_103_secondary_family_client_ip_affinity_udp"],
        gap: "",
    },
    Row {
        number: 104,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should be able to handle large requests: http",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_104_secondary_family_large_request_tcp"],
        gap: "",
    },
    Row {
        number: 105,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should be able to handle large requests: udp",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_105_secondary_family_large_request_udp"],
        gap: "",
    },
    Row {
        number: 106,
        title: "IPv6DualStack Granular Checks: Services Secondary IP Family should function for service endpoints using hostNetwork",
        conformance: false,
        reproducible: Reproducible::Yes,
        tests: &["conformance::e2e_106_secondary_family_host_network_endpoints"],
        gap: "",
    },
];

/// The suites (files of `tests/tests/`) the table names, each with its tests.
pub fn suites() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let mut suites: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for test in ROWS.iter().flat_map(|row| row.tests) {
        let (suite, name) = test.split_once("::").unwrap_or(("", test));
        suites.entry(suite).or_default().insert(name);
    }
    suites
}

/// Splits the output of one `cargo test --test A --test B ...` (cargo's stderr and the tests'
/// stdout in one stream) into each suite's libtest report: what follows cargo's
/// `Running tests/<suite>.rs (...)` line, up to the next one.
pub fn reports_by_suite(output: &str) -> BTreeMap<String, String> {
    let mut reports: BTreeMap<String, String> = BTreeMap::new();
    let mut current = None;
    for line in output.lines() {
        let running = line.trim_start().strip_prefix("Running tests/").and_then(|rest| rest.split_once(".rs"));
        if let Some((suite, _)) = running {
            current = Some(suite.to_owned());
            continue;
        }
        if let Some(suite) = &current {
            let report = reports.entry(suite.clone()).or_default();
            report.push_str(line);
            report.push('\n');
        }
    }
    reports
}

/// What became of one test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It passed.
    Passed,
    /// It failed; the first line of its panic message.
    Failed(String),
    /// It did not run; why.
    NotRun(String),
}

/// Reads libtest's (human) report: `test NAME ... ok|FAILED|ignored`, and for each failure the
/// first line of the panic message from the `---- NAME stdout ----` section.
pub fn parse_libtest(report: &str) -> BTreeMap<String, Outcome> {
    let mut outcomes = BTreeMap::new();
    for line in report.lines() {
        let Some((name, result)) = line.strip_prefix("test ").and_then(|rest| rest.split_once(" ... ")) else {
            continue;
        };
        let outcome = match result.trim() {
            "ok" => Outcome::Passed,
            "FAILED" => Outcome::Failed("failed".into()),
            ignored if ignored.starts_with("ignored") => {
                let reason = ignored.trim_start_matches("ignored").trim_start_matches(',').trim();
                Outcome::NotRun(if reason.is_empty() { "ignored".into() } else { format!("ignored: {reason}") })
            }
            _ => continue,
        };
        outcomes.insert(name.trim().to_owned(), outcome);
    }
    let mut lines = report.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("---- ").and_then(|l| l.strip_suffix(" stdout ----")) else { continue };
        let mut message = None;
        while let Some(next) = lines.peek() {
            if next.starts_with("---- ") || *next == "failures:" {
                break;
            }
            let next = lines.next().unwrap_or_default();
            if message.is_none() && next.starts_with("thread '") && next.contains("panicked at") {
                // Since Rust 1.73 the message follows on the next line; before, after the location.
                let inline = next.split_once("panicked at").and_then(|(_, rest)| rest.split_once("', ")).map(|p| p.1);
                message = inline.map(str::to_owned).or_else(|| lines.peek().map(|m| (*m).to_owned()));
            }
        }
        if let (Some(Outcome::Failed(reason)), Some(message)) = (outcomes.get_mut(name), message) {
            *reason = one_line(&message, 300);
        }
    }
    outcomes
}

/// The reason of `#[ignore = "..."]` on test `name` in a suite's source, if it has one: a test
/// known to fail says why, and the table shows it.
pub fn ignore_reason(source: &str, name: &str) -> Option<String> {
    let position = source.find(&format!("fn {name}("))?;
    let line_start = source[..position].rfind('\n').map_or(0, |newline| newline + 1);
    let before: Vec<&str> = source[..line_start].lines().rev().take_while(|l| l.trim().starts_with("#[")).collect();
    before.iter().find_map(|attribute| {
        let rest = attribute.trim().strip_prefix("#[ignore = \"")?;
        Some(rest.rsplit_once("\"]").map_or(rest, |(reason, _)| reason).replace("\\\"", "\""))
    })
}

/// A row's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every test of the row passed.
    Pass,
    /// A test failed or did not run: why.
    Fail(String),
    /// No test proves the row yet: what is missing.
    Missing(String),
    /// Not reproducible without a cluster: why.
    NotApplicable(String),
}

impl Verdict {
    fn label(&self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail(_) => "**fail**",
            Self::Missing(_) => "**missing**",
            Self::NotApplicable(_) => "n/a",
        }
    }
}

/// Judges `row` from the outcomes of its tests (keyed `suite::test`); `known` gives a test's
/// `#[ignore]` reason, which explains a failure that is already known. A row with a `gap` does
/// not pass even when its tests do: they prove part of it, and the gap says what is missing.
pub fn judge(row: &Row, outcomes: &BTreeMap<String, Outcome>, known: impl Fn(&str) -> Option<String>) -> Verdict {
    if !row.reproducible.counts() {
        return Verdict::NotApplicable(row.gap.to_owned());
    }
    if row.tests.is_empty() {
        return Verdict::Missing(row.gap.to_owned());
    }
    let mut reasons = Vec::new();
    for test in row.tests {
        let known = known(test).map(|k| format!("known: {k}; ")).unwrap_or_default();
        match outcomes.get(*test) {
            Some(Outcome::Passed) => {}
            Some(Outcome::Failed(message)) => reasons.push(format!("`{test}` failed ({known}{message})")),
            Some(Outcome::NotRun(why)) => reasons.push(format!("`{test}` did not run ({known}{why})")),
            None => reasons.push(format!("`{test}` did not run (not found in its suite's report)")),
        }
    }
    if reasons.is_empty() && row.gap.is_empty() {
        Verdict::Pass
    } else if reasons.is_empty() {
        // The tests prove part of the row; the gap is the part nothing proves yet.
        let tests: Vec<String> = row.tests.iter().map(|t| format!("`{t}`")).collect();
        Verdict::Missing(format!("{} (what is proven passes: {})", row.gap, tests.join(", ")))
    } else {
        if !row.gap.is_empty() {
            reasons.insert(0, row.gap.to_owned());
        }
        Verdict::Fail(reasons.join("; "))
    }
}

/// Counts of a judged table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Reproducible rows that pass.
    pub passed: usize,
    /// Reproducible rows with a failing test.
    pub failed: usize,
    /// Reproducible rows without a test.
    pub missing: usize,
    /// Rows that cannot be reproduced without a cluster.
    pub not_applicable: usize,
}

impl Summary {
    /// Counts the verdicts.
    pub fn of(verdicts: &[(Row, Verdict)]) -> Self {
        let mut summary = Self::default();
        for (_, verdict) in verdicts {
            match verdict {
                Verdict::Pass => summary.passed += 1,
                Verdict::Fail(_) => summary.failed += 1,
                Verdict::Missing(_) => summary.missing += 1,
                Verdict::NotApplicable(_) => summary.not_applicable += 1,
            }
        }
        summary
    }

    /// "N of 101 pass".
    pub fn headline(&self) -> String {
        format!("{} of {REPRODUCIBLE_ROWS} pass", self.passed)
    }
}

/// The table as Markdown: `preamble` (how it was run), the summary, then one line per row.
pub fn render(verdicts: &[(Row, Verdict)], preamble: &str) -> String {
    let summary = Summary::of(verdicts);
    let mut out = String::from("# Conformance: the kube-proxy e2e datapath behaviours\n\n");
    out.push_str(preamble.trim_end());
    out.push_str(&format!(
        "\n\n**{}** ({} fail, {} miss a behaviour or a test; {} rows need a cluster and are not counted).\n\n",
        summary.headline(),
        summary.failed,
        summary.missing,
        summary.not_applicable
    ));
    out.push_str("| # | Upstream test | C | Reproducible | Result | Tests, or why not |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for (row, verdict) in verdicts {
        let tests = row.tests.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join("<br>");
        let detail = match verdict {
            Verdict::Pass => tests,
            Verdict::Fail(why) | Verdict::Missing(why) | Verdict::NotApplicable(why) => one_line(why, 1200),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.number,
            cell(row.title),
            if row.conformance { "C" } else { "" },
            row.reproducible.label(),
            verdict.label(),
            cell(&detail)
        ));
    }
    out
}

/// `text` on one line, at most `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max { line } else { format!("{}…", line.chars().take(max).collect::<String>()) }
}

/// `text` safe inside a Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}
