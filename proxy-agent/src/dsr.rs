//! `--lb-mode`: how traffic from outside reaches a backend on another node, SNATed to the node
//! that received it (kube-proxy's behaviour) or by direct server return
//! (`proxy_common::dsr`; docs/architecture.md, "Direct server return").

use proxy_common::proto::TCP;

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
    fn hybrid_is_dsr_for_tcp_only_and_snat_never() {
        let table = [(LbMode::Snat, [false; 3]), (LbMode::Dsr, [true; 3]), (LbMode::Hybrid, [true, false, false])];
        for (mode, want) in table {
            assert_eq!([TCP, UDP, SCTP].map(|p| mode.dsr_for(p)), want, "{}", mode.as_str());
        }
    }
}
