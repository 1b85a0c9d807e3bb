//! kube-proxy's rules for a set of services, written the way kube-proxy writes them: its
//! iptables mode (`iptables-restore` input) and its nftables mode (`nft -f` input). The benches
//! load them to measure kube-proxy side by side with the agent; the migration tests load them to
//! prove `--cleanup-kube-proxy` removes what kube-proxy leaves behind. Text only: loading is the
//! caller's, inside a namespace it created.

use std::net::Ipv4Addr;

/// The cluster's pod range (`docs/testing.md`), as kube-proxy's `--cluster-cidr`.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The service range (`docs/testing.md`).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The Kubernetes namespace of every synthetic service.
pub const NAMESPACE: &str = "default";

/// One service port: TCP, unnamed port, a ClusterIP, optionally a
/// nodePort, and its endpoints (all on `target_port`).
#[derive(Clone, Debug)]
pub struct Svc {
    /// `svc-<index>`.
    pub name: String,
    /// The ClusterIP.
    pub vip: Ipv4Addr,
    /// The service port.
    pub port: u16,
    /// The endpoints' port.
    pub target_port: u16,
    /// The nodePort, if any.
    pub node_port: Option<u16>,
    /// Endpoint addresses.
    pub endpoints: Vec<Ipv4Addr>,
}

impl Svc {
    /// kube-proxy's `ServicePortName` string for an unnamed port: `namespace/name`.
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}", self.name)
    }
}

/// A stand-in for kube-proxy's chain-name hash (base32 of a SHA-256, cut to `len`): the same
/// alphabet and length, so names, and the work of parsing them, look the same.
fn name_hash(text: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        text.bytes().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    };
    let bits = (u128::from(fnv(0)) << 64) | u128::from(fnv(0x9e37_79b9_7f4a_7c15));
    (0..len).map(|i| ALPHABET[((bits >> (5 * i)) & 31) as usize] as char).collect()
}

/// kube-proxy's iptables mode (pkg/proxy/iptables): the nat and filter rules of one sync, as
/// fed to `iptables-restore --noflush`.
pub mod iptables {
    use std::fmt::Write as _;

    use super::{CLUSTER_CIDR, Svc, name_hash};

    /// `KUBE-SVC-<hash>` of a service port.
    pub fn svc_chain(svc: &Svc) -> String {
        format!("KUBE-SVC-{}", name_hash(&format!("{}tcp", svc.port_name()), 16))
    }

    /// `KUBE-EXT-<hash>` of a service port (nodePort traffic).
    pub fn ext_chain(svc: &Svc) -> String {
        format!("KUBE-EXT-{}", name_hash(&format!("{}tcp", svc.port_name()), 16))
    }

    /// `KUBE-SEP-<hash>` of one endpoint.
    pub fn sep_chain(svc: &Svc, endpoint: std::net::Ipv4Addr) -> String {
        format!("KUBE-SEP-{}", name_hash(&format!("{}tcp{endpoint}:{}", svc.port_name(), svc.target_port), 16))
    }

    /// The jump rules kube-proxy installs once (`iptables -N` / `-I`), outside the restore.
    pub fn jumps() -> String {
        [
            "*filter",
            ":KUBE-PROXY-FIREWALL - [0:0]",
            ":KUBE-NODEPORTS - [0:0]",
            ":KUBE-SERVICES - [0:0]",
            ":KUBE-EXTERNAL-SERVICES - [0:0]",
            ":KUBE-FORWARD - [0:0]",
            "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
            "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
            "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
            "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "COMMIT",
            "*nat",
            ":KUBE-SERVICES - [0:0]",
            ":KUBE-POSTROUTING - [0:0]",
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
            "COMMIT",
            "",
        ]
        .join("\n")
    }

    /// The whole ruleset of a full sync, for `iptables-restore --noflush` after [`jumps`].
    pub fn full(services: &[Svc]) -> String {
        restore(services, |_| true, &[], false)
    }

    /// The same with the jump rules from the built-in chains: one complete `iptables-restore`
    /// (which flushes the tables first) leaves exactly what [`jumps`] then [`full`] leave.
    pub fn full_with_jumps(services: &[Svc]) -> String {
        restore(services, |_| true, &[], true)
    }

    /// A partial sync after service `changed`'s endpoints changed (kube-proxy's default
    /// `MinimizeIPTablesRestore`): the top-level chains in full, only the changed service's
    /// chains, and `-X` for endpoint chains that are gone.
    pub fn partial(services: &[Svc], changed: usize, gone: &[String]) -> String {
        restore(services, |i| i == changed, gone, false)
    }

    /// The lines of [`jumps`] that append to built-in chains, for `table`.
    fn builtin_jumps(table: &str) -> Vec<String> {
        let mut in_table = false;
        let mut out = Vec::new();
        for line in jumps().lines() {
            if let Some(name) = line.strip_prefix('*') {
                in_table = name == table;
            } else if in_table && line.starts_with("-A ") && !line.starts_with("-A KUBE-") {
                out.push(line.to_owned());
            }
        }
        out
    }

    fn restore(services: &[Svc], write_service: impl Fn(usize) -> bool, gone: &[String], with_jumps: bool) -> String {
        let mut out = String::with_capacity(services.len() * 1200);
        out += "*filter\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n";
        out += ":KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n";
        if with_jumps {
            for line in builtin_jumps("filter") {
                out += &line;
                out.push('\n');
            }
        }
        out += "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n";
        out += "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n";
        out += "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
        out += "COMMIT\n*nat\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n";
        if with_jumps {
            for line in builtin_jumps("nat") {
                out += &line;
                out.push('\n');
            }
        }
        for (_, svc) in services.iter().enumerate().filter(|(i, _)| write_service(*i)) {
            let _ = writeln!(out, ":{} - [0:0]", svc_chain(svc));
            if svc.node_port.is_some() {
                let _ = writeln!(out, ":{} - [0:0]", ext_chain(svc));
            }
            for &endpoint in &svc.endpoints {
                let _ = writeln!(out, ":{} - [0:0]", sep_chain(svc, endpoint));
            }
        }
        // As kube-proxy does: a chain about to be deleted is declared (which flushes it) first.
        for chain in gone {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        out += "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n";
        out += "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n";
        out += "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n";
        out += "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n";
        for svc in services {
            let name = svc.port_name();
            let _ = writeln!(
                out,
                "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} -j {}",
                svc.vip,
                svc.port,
                svc_chain(svc)
            );
            if let Some(node_port) = svc.node_port {
                let _ = writeln!(
                    out,
                    "-A KUBE-NODEPORTS -m comment --comment {name} -m tcp -p tcp --dport {node_port} -j {}",
                    ext_chain(svc)
                );
            }
        }
        out += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
        for (_, svc) in services.iter().enumerate().filter(|(i, _)| write_service(*i)) {
            let name = svc.port_name();
            let chain = svc_chain(svc);
            if svc.node_port.is_some() {
                let ext = ext_chain(svc);
                let _ = writeln!(
                    out,
                    "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(out, "-A {ext} -j {chain}");
            }
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
                svc.vip, svc.port
            );
            let n = svc.endpoints.len();
            for (j, &endpoint) in svc.endpoints.iter().enumerate() {
                let target = format!("{endpoint}:{}", svc.target_port);
                let statistic = if j + 1 < n {
                    format!("-m statistic --mode random --probability {:.10} ", 1.0 / (n - j) as f64)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "-A {chain} -m comment --comment \"{name} -> {target}\" {statistic}-j {}",
                    sep_chain(svc, endpoint)
                );
            }
            for &endpoint in &svc.endpoints {
                let sep = sep_chain(svc, endpoint);
                let _ = writeln!(out, "-A {sep} -m comment --comment {name} -s {endpoint}/32 -j KUBE-MARK-MASQ");
                let _ = writeln!(
                    out,
                    "-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {endpoint}:{}",
                    svc.target_port
                );
            }
        }
        for chain in gone {
            let _ = writeln!(out, "-X {chain}");
        }
        out += "COMMIT\n";
        out
    }
}

/// kube-proxy's nftables mode (pkg/proxy/nftables, v1.31 layout): `table ip kube-proxy` with
/// the `service-ips` verdict map, one chain per service port with `numgen random mod n vmap`,
/// one chain per endpoint with `dnat`, and the filter-side checks, as one `nft -f` transaction.
pub mod nftables {
    use std::fmt::Write as _;

    use super::{CLUSTER_CIDR, SERVICE_CIDR, Svc, name_hash};

    /// The table every rule lives in.
    pub const TABLE: &str = "ip kube-proxy";

    /// `<tcp>/<port name>` suffix of kube-proxy's chain names for an unnamed TCP port.
    fn base(svc: &Svc) -> String {
        format!("{}/tcp/", svc.port_name())
    }

    /// `service-<hash>-<ns>/<name>/tcp/<port>`.
    pub fn service_chain(svc: &Svc) -> String {
        format!("service-{}-{}", name_hash(&format!("service{}", base(svc)), 8), base(svc))
    }

    /// `external-<hash>-...` (nodePort traffic).
    pub fn external_chain(svc: &Svc) -> String {
        format!("external-{}-{}", name_hash(&format!("external{}", base(svc)), 8), base(svc))
    }

    /// `endpoint-<hash>-<ns>/<name>/tcp/<port>__<ip>/<port>`.
    pub fn endpoint_chain(svc: &Svc, endpoint: std::net::Ipv4Addr) -> String {
        let tail = format!("{}__{endpoint}/{}", base(svc), svc.target_port);
        format!("endpoint-{}-{tail}", name_hash(&format!("endpoint{tail}"), 8))
    }

    /// The base chains, maps and sets kube-proxy creates before any service.
    fn skeleton(out: &mut String) {
        let t = TABLE;
        let lines = [
            format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}"),
            format!("add chain {t} filter-prerouting {{ type filter hook prerouting priority -110 ; }}"),
            format!("add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}"),
            format!("add chain {t} filter-input {{ type filter hook input priority -110 ; }}"),
            format!("add chain {t} filter-output {{ type filter hook output priority -110 ; }}"),
            format!("add chain {t} filter-output-post-dnat {{ type filter hook output priority -90 ; }}"),
            format!("add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}"),
            format!("add chain {t} nat-output {{ type nat hook output priority -100 ; }}"),
            format!("add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}"),
            format!("add chain {t} cluster-ips-check"),
            format!("add chain {t} service-endpoints-check"),
            format!("add chain {t} nodeport-endpoints-check"),
            format!("add chain {t} firewall-check"),
            format!("add chain {t} services"),
            format!("add chain {t} mark-for-masquerade"),
            format!("add chain {t} masquerading"),
            format!(
                "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
            ),
            format!("add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"),
            format!("add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"),
            format!(
                "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
            ),
            format!(
                "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
            ),
            format!(
                "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
            ),
            format!(
                "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
            ),
            format!(
                "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
            ),
            format!("add rule {t} filter-prerouting ct state new jump firewall-check"),
            format!("add rule {t} filter-forward ct state new jump service-endpoints-check"),
            format!("add rule {t} filter-forward ct state new jump cluster-ips-check"),
            format!("add rule {t} filter-input ct state new jump nodeport-endpoints-check"),
            format!("add rule {t} filter-input ct state new jump service-endpoints-check"),
            format!("add rule {t} filter-output ct state new jump service-endpoints-check"),
            format!("add rule {t} filter-output ct state new jump firewall-check"),
            format!("add rule {t} filter-output-post-dnat ct state new jump cluster-ips-check"),
            format!("add rule {t} nat-prerouting jump services"),
            format!("add rule {t} nat-output jump services"),
            format!("add rule {t} nat-postrouting jump masquerading"),
            format!(
                "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
            ),
            format!(
                "add rule {t} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
            ),
            format!(
                "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
            ),
            format!(
                "add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
            ),
            format!("add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"),
            format!("add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"),
            format!("add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"),
            format!("add rule {t} mark-for-masquerade mark set mark or 0x4000"),
            format!("add rule {t} masquerading mark and 0x4000 == 0 return"),
            format!("add rule {t} masquerading mark set mark xor 0x4000"),
            format!("add rule {t} masquerading masquerade fully-random"),
            format!("add rule {t} reject-chain reject"),
        ];
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
    }

    /// One endpoint's chain and rules.
    fn endpoint(out: &mut String, svc: &Svc, endpoint: std::net::Ipv4Addr) {
        let chain = endpoint_chain(svc, endpoint);
        let _ = writeln!(out, "add chain {TABLE} {chain}");
        let _ = writeln!(out, "add rule {TABLE} {chain} ip saddr {endpoint} jump mark-for-masquerade");
        let _ = writeln!(out, "add rule {TABLE} {chain} meta l4proto tcp dnat to {endpoint}:{}", svc.target_port);
    }

    /// The service chain's rules (its chain exists).
    fn service_rules(out: &mut String, svc: &Svc) {
        let chain = service_chain(svc);
        let _ = writeln!(
            out,
            "add rule {TABLE} {chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            svc.vip, svc.port
        );
        let targets: Vec<String> =
            svc.endpoints.iter().enumerate().map(|(j, &e)| format!("{j} : goto {}", endpoint_chain(svc, e))).collect();
        let _ = writeln!(
            out,
            "add rule {TABLE} {chain} numgen random mod {} vmap {{ {} }}",
            svc.endpoints.len(),
            targets.join(" , ")
        );
    }

    /// The whole ruleset of a full sync, as one transaction.
    pub fn full(services: &[Svc], node_ips: &[std::net::Ipv4Addr]) -> String {
        let mut out = String::with_capacity(services.len() * 1500);
        skeleton(&mut out);
        for ip in node_ips {
            let _ = writeln!(out, "add element {TABLE} nodeport-ips {{ {ip} }}");
        }
        for svc in services {
            let chain = service_chain(svc);
            let _ = writeln!(out, "add chain {TABLE} {chain}");
            for &e in &svc.endpoints {
                endpoint(&mut out, svc, e);
            }
            service_rules(&mut out, svc);
            let _ = writeln!(out, "add element {TABLE} cluster-ips {{ {} }}", svc.vip);
            let _ =
                writeln!(out, "add element {TABLE} service-ips {{ {} . tcp . {} : goto {chain} }}", svc.vip, svc.port);
            if let Some(node_port) = svc.node_port {
                let external = external_chain(svc);
                let _ = writeln!(out, "add chain {TABLE} {external}");
                let _ = writeln!(out, "add rule {TABLE} {external} jump mark-for-masquerade");
                let _ = writeln!(out, "add rule {TABLE} {external} goto {chain}");
                let _ =
                    writeln!(out, "add element {TABLE} service-nodeports {{ tcp . {node_port} : goto {external} }}");
            }
        }
        out
    }

    /// The transaction of a partial sync after `svc`'s endpoint `old` was replaced (`svc` holds
    /// the new set): the new endpoint's chain, the service chain rewritten, the old chain gone.
    pub fn change(svc: &Svc, old: std::net::Ipv4Addr, new: std::net::Ipv4Addr) -> String {
        let mut out = String::new();
        endpoint(&mut out, svc, new);
        let chain = service_chain(svc);
        let _ = writeln!(out, "flush chain {TABLE} {chain}");
        service_rules(&mut out, svc);
        let _ = writeln!(out, "delete chain {TABLE} {}", endpoint_chain(svc, old));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Service `i` (10.96.1.<i+1>:80) with `per_service` endpoints 10.244.128.<k>:8080.
    fn services(n: usize, per_service: usize) -> Vec<Svc> {
        (0..n)
            .map(|i| Svc {
                name: format!("svc-{i}"),
                vip: Ipv4Addr::new(10, 96, 1, i as u8 + 1),
                port: 80,
                target_port: 8080,
                node_port: None,
                endpoints: (0..per_service).map(|j| Ipv4Addr::new(10, 244, 128, (i * per_service + j) as u8)).collect(),
            })
            .collect()
    }

    #[test]
    fn iptables_rules_follow_kube_proxy_layout() {
        let mut services = services(2, 2);
        services[1].node_port = Some(30080);
        let rules = iptables::full(&services);
        let svc = iptables::svc_chain(&services[0]);
        assert!(rules.contains(&format!("-d 10.96.1.1/32 --dport 80 -j {svc}")));
        assert!(rules.contains("--probability 0.5000000000 -j KUBE-SEP-"));
        assert!(rules.contains("-m tcp -p tcp --dport 30080 -j KUBE-EXT-"));
        assert!(rules.contains("-j DNAT --to-destination 10.244.128.0:8080"));
        // A partial sync writes KUBE-SERVICES whole but only the changed service's chains.
        let partial = iptables::partial(&services, 1, &["KUBE-SEP-OLD".into()]);
        assert!(partial.contains(&format!("-j {svc}")));
        assert!(!partial.contains(&format!("-A {svc} ")));
        assert!(partial.contains("-X KUBE-SEP-OLD\n"));
    }

    #[test]
    fn nftables_rules_follow_kube_proxy_layout() {
        let services = services(1, 2);
        let rules = nftables::full(&services, &[]);
        let chain = nftables::service_chain(&services[0]);
        assert!(chain.starts_with("service-") && chain.ends_with("-default/svc-0/tcp/"));
        assert!(rules.contains(&format!("service-ips {{ 10.96.1.1 . tcp . 80 : goto {chain} }}")));
        assert!(rules.contains("numgen random mod 2 vmap {"));
        assert!(rules.contains("dnat to 10.244.128.1:8080"));
    }
}
