//! `--lb-mode`: how traffic from outside reaches a backend on another node, SNATed to the node
//! that received it (kube-proxy's behaviour) or by direct server return
//! (`proxy_common::dsr`; docs/architecture.md, "Direct server return").

use k8s_openapi::api::core::v1::Node;
use proxy_common::proto::TCP;

/// The Node annotation that says the node's agent runs and takes direct server return (it
/// learns the option and rewrites its backends' replies). The agent sets it on its own Node
/// at start (a merge patch; `--cleanup` removes it); in manifest mode the Node documents carry
/// it. A DSR flow goes only to a backend on such a node: one elsewhere is SNATed, as a node
/// without our programs would pass the option to the pod and let it answer the client from
/// its own address.
pub const DSR_ANNOTATION: &str = "proxy.kube-ebpf.io/dsr";
/// The annotation's value: the encapsulation the node takes (the IPv4 option of
/// `proxy_common::dsr`).
pub const DSR_ANNOTATION_VALUE: &str = "ipv4";

/// Whether `node` takes direct server return (carries [`DSR_ANNOTATION`] set to
/// [`DSR_ANNOTATION_VALUE`]).
pub fn takes_dsr(node: &Node) -> bool {
    let annotations = node.metadata.annotations.as_ref();
    annotations.and_then(|a| a.get(DSR_ANNOTATION)).is_some_and(|v| v == DSR_ANNOTATION_VALUE)
}

/// The JSON merge patch that sets (`on`) or removes the agent's [`DSR_ANNOTATION`] on its Node.
pub fn annotation_patch(on: bool) -> serde_json::Value {
    let value = if on { serde_json::Value::from(DSR_ANNOTATION_VALUE) } else { serde_json::Value::Null };
    serde_json::json!({ "metadata": { "annotations": { DSR_ANNOTATION: value } } })
}

/// How traffic from outside (nodePorts, externalIPs, LoadBalancer IPs) under
/// `externalTrafficPolicy: Cluster` reaches its backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum LbMode {
    /// SNATed to the receiving node, whose replies come back through it (kube-proxy).
    #[default]
    Snat,
    /// Direct server return for every protocol: the client's address is kept, and a backend
    /// on another node answers the client straight from its node.
    Dsr,
    /// Direct server return for TCP, SNAT for UDP and SCTP (as Cilium's `hybrid`): a UDP
    /// datagram would carry the option in every packet, and one near the MTU would not fit.
    Hybrid,
}

impl LbMode {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LbMode::Snat => "snat",
            LbMode::Dsr => "dsr",
            LbMode::Hybrid => "hybrid",
        }
    }

    /// Whether external traffic of protocol `proto` goes by direct server return.
    pub fn dsr_for(self, proto: u8) -> bool {
        match self {
            LbMode::Snat => false,
            LbMode::Dsr => true,
            LbMode::Hybrid => proto == TCP,
        }
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::proto::{SCTP, UDP};

    use super::*;

    #[test]
    fn a_node_takes_dsr_only_with_the_annotation_set_to_ipv4() {
        let node = |value: Option<&str>| Node {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: value.map(|v| [(DSR_ANNOTATION.to_owned(), v.to_owned())].into()),
                ..Default::default()
            },
            ..Node::default()
        };
        assert!(takes_dsr(&node(Some("ipv4"))));
        assert!(!takes_dsr(&node(None)), "no annotation: no agent, or an older one");
        assert!(!takes_dsr(&node(Some("ipip"))), "an encapsulation this agent does not speak");
    }

    #[test]
    fn the_patch_sets_then_removes_the_annotation() {
        assert_eq!(annotation_patch(true)["metadata"]["annotations"][DSR_ANNOTATION], "ipv4");
        assert!(annotation_patch(false)["metadata"]["annotations"][DSR_ANNOTATION].is_null());
    }

    #[test]
    fn hybrid_is_dsr_for_tcp_only_and_snat_never() {
        let table = [(LbMode::Snat, [false; 3]), (LbMode::Dsr, [true; 3]), (LbMode::Hybrid, [true, false, false])];
        for (mode, want) in table {
            assert_eq!([TCP, UDP, SCTP].map(|p| mode.dsr_for(p)), want, "{}", mode.as_str());
        }
    }
}
