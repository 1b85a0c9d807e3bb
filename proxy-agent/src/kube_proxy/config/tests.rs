use clap::{CommandFactory as _, FromArgMatches as _, parser::ValueSource};

use super::*;
use crate::cli::Cli;

/// The `config.conf` kubeadm (v1.31) writes into the `kube-proxy` ConfigMap: its defaults, with
/// the pod subnet of `kubeadm init --pod-network-cidr 10.244.0.0/16`.
const KUBEADM: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

fn parse(text: &str) -> Result<FileConfig, ConfigError> {
    FileConfig::parse(Path::new("/var/lib/kube-proxy/config.conf"), text)
}

/// kubeadm's file with `extra` lines appended (later keys are new top-level fields).
fn kubeadm_with(extra: &str) -> String {
    format!("{KUBEADM}{extra}")
}

#[test]
fn kubeadms_file_uses_the_cluster_cidr_and_kubeconfig_and_leaves_the_rest_to_defaults() {
    let config = parse(KUBEADM).expect("kubeadm's file parses");
    assert_eq!(config.cluster_cidr, Some(vec!["10.244.0.0/16".parse().unwrap()]));
    assert_eq!(config.kubeconfig, Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf")));
    // "" and 0s and null are kube-proxy's "default", never "off".
    assert_eq!(config.hostname_override, None);
    assert_eq!(config.healthz_bind_address, None);
    assert_eq!(config.metrics_bind_address, None);
    assert_eq!(config.nodeport_addresses, None);
    assert_eq!((config.sync_period, config.min_sync_period), (None, None));
    assert!(config.unknown.is_empty(), "{:?}", config.unknown);
    assert!(config.notes.is_empty(), "{:?}", config.notes);
}

#[test]
fn kubeadms_kube_proxy_only_fields_are_named_as_ignored() {
    let config = parse(KUBEADM).expect("kubeadm's file parses");
    for field in [
        "bindAddress",
        "conntrack",
        "detectLocalMode",
        "enableProfiling",
        "iptables",
        "ipvs",
        "mode",
        "nftables",
        "oomScoreAdj",
        "portRange",
        "showHiddenMetricsForVersion",
        "winkernel",
        "clientConnection.qps",
    ] {
        assert!(config.ignored.iter().any(|f| f == field), "{field} not in {:?}", config.ignored);
    }
    assert!(!config.ignored.iter().any(|f| f == "clientConnection.kubeconfig" || f == "clusterCIDR"));
}

#[test]
fn unknown_fields_are_named() {
    let config = parse(&kubeadm_with("hostnameOverrid: node-1\nfutureKnob: true\n")).expect("parses");
    assert_eq!(config.unknown, ["hostnameOverrid", "futureKnob"]);
}

#[test]
fn set_fields_are_read() {
    let text = kubeadm_with("")
        .replace("hostnameOverride: \"\"", "hostnameOverride: Node-1")
        .replace("healthzBindAddress: \"\"", "healthzBindAddress: 0.0.0.0:10256")
        .replace("metricsBindAddress: \"\"", "metricsBindAddress: 127.0.0.1")
        .replace("nodePortAddresses: null", "nodePortAddresses: [192.168.0.0/16, \"fd00::/64\", primary]")
        .replace("clusterCIDR: 10.244.0.0/16", "clusterCIDR: 10.244.0.0/16,fd00:10:244::/56")
        + "syncPeriod: 1m0s\nminSyncPeriod: 500ms\n";
    let config = parse(&text).expect("parses");
    assert_eq!(config.hostname_override.as_deref(), Some("Node-1"));
    assert_eq!(config.healthz_bind_address, Some(BindAddress(Some("0.0.0.0:10256".parse().unwrap()))));
    // An IP alone gets kube-proxy's port for that server.
    assert_eq!(config.metrics_bind_address, Some(BindAddress(Some("127.0.0.1:10249".parse().unwrap()))));
    // Both families are served: IPv6 ranges are kept, as kube-proxy's dual-stack mode keeps them.
    assert_eq!(config.nodeport_addresses, Some(vec!["192.168.0.0/16".parse().unwrap(), "fd00::/64".parse().unwrap()]));
    assert_eq!(config.cluster_cidr, Some(vec!["10.244.0.0/16".parse().unwrap(), "fd00:10:244::/56".parse().unwrap()]));
    assert_eq!(config.sync_period, Some(Duration::from_secs(60)));
    assert_eq!(config.min_sync_period, Some(Duration::from_millis(500)));
    let notes = config.notes.join("\n");
    assert!(notes.contains("\"primary\""), "{notes}");
    assert!(!notes.contains("fd00"), "IPv6 ranges are not left out: {notes}");
}

#[test]
fn periods_fall_back_to_the_modes_block() {
    let text = KUBEADM.replacen("  syncPeriod: 0s", "  syncPeriod: 45s", 1); // iptables's, the first
    assert_eq!(parse(&text).unwrap().sync_period, Some(Duration::from_secs(45)));
    let nft = KUBEADM.replace("mode: \"\"", "mode: nftables").replace(
        "  masqueradeBit: null\n  minSyncPeriod: 0s\n  syncPeriod: 0s\nnodePort",
        "  masqueradeBit: null\n  minSyncPeriod: 2s\n  syncPeriod: 0s\nnodePort",
    );
    assert_eq!(parse(&nft).unwrap().min_sync_period, Some(Duration::from_secs(2)));
    let top = kubeadm_with("syncPeriod: 10s\n").replacen("  syncPeriod: 0s", "  syncPeriod: 45s", 1);
    assert_eq!(parse(&top).unwrap().sync_period, Some(Duration::from_secs(10)), "the top-level field wins");
}

#[test]
fn errors_name_the_file_and_the_field() {
    let cases = [
        (KUBEADM.replace("healthzBindAddress: \"\"", "healthzBindAddress: 0.0.0.0/0"), "healthzBindAddress"),
        (KUBEADM.replace("clusterCIDR: 10.244.0.0/16", "clusterCIDR: 10.244.0.0/33"), "clusterCIDR"),
        (
            KUBEADM.replace("  kubeconfig: /var/lib", "  kubeconfig: [/var/lib]\n  x: /var/lib"),
            "clientConnection.kubeconfig",
        ),
        (kubeadm_with("syncPeriod: often\n"), "syncPeriod"),
        (kubeadm_with("minSyncPeriod: 48h\n"), "minSyncPeriod"),
        (KUBEADM.replace("kind: KubeProxyConfiguration", "kind: KubeletConfiguration"), "kind"),
        (KUBEADM.replace("apiVersion: kubeproxy.config.k8s.io/v1alpha1", "apiVersion: v1"), "apiVersion"),
    ];
    for (text, field) in cases {
        let error = parse(&text).expect_err(field).to_string();
        assert!(error.starts_with("/var/lib/kube-proxy/config.conf: field "), "{error}");
        assert!(error.contains(&format!("field {field}:")), "{field}: {error}");
    }
    let error = parse("- a list\n").expect_err("not a mapping").to_string();
    assert!(error.contains("/var/lib/kube-proxy/config.conf"), "{error}");
    let missing = Path::new("/nonexistent/config.conf");
    let error = FileConfig::load(missing).expect_err("missing").to_string();
    assert!(error.contains("/nonexistent/config.conf") && error.contains("--config"), "{error}");
}

/// Parses a command line and applies `config` as the agent does: flags > file > defaults.
fn run_args(config: &FileConfig, argv: &[&str]) -> (RunArgs, Vec<&'static str>) {
    let matches = Cli::command().try_get_matches_from(argv).expect("the flags parse");
    let mut args = Cli::from_arg_matches(&matches).expect("the flags parse").run;
    let used = config.apply(&mut args, |id| {
        matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
    });
    (args, used)
}

#[test]
fn flags_override_the_file_and_the_file_overrides_defaults() {
    let config = FileConfig {
        hostname_override: Some("from-file".into()),
        cluster_cidr: Some(vec!["10.1.0.0/16".parse().unwrap()]),
        nodeport_addresses: Some(vec!["192.168.1.0/24".parse().unwrap()]),
        healthz_bind_address: Some(BindAddress(Some("127.0.0.1:20256".parse().unwrap()))),
        metrics_bind_address: Some(BindAddress(Some("127.0.0.1:20249".parse().unwrap()))),
        sync_period: Some(Duration::from_secs(60)),
        min_sync_period: Some(Duration::from_secs(1)),
        kubeconfig: Some("/from/file".into()),
        ..FileConfig::default()
    };

    // No flags: everything from the file.
    let (args, used) = run_args(&config, &["proxy-agent"]);
    assert_eq!(args.hostname_override.as_deref(), Some("from-file"));
    assert_eq!(Some(args.cluster_cidr), config.cluster_cidr);
    assert_eq!(args.nodeport_addresses, config.nodeport_addresses.clone().unwrap());
    assert_eq!(args.healthz_bind_address, config.healthz_bind_address.unwrap());
    assert_eq!(args.metrics_bind_address, config.metrics_bind_address.unwrap());
    assert_eq!((args.sync_period, args.min_sync_period), (Duration::from_secs(60), Duration::from_secs(1)));
    assert_eq!(args.kubeconfig.as_deref(), Some(Path::new("/from/file")));
    assert_eq!(used.len(), 8, "{used:?}");

    // Flags given, even with their default values, win.
    let (args, used) = run_args(
        &config,
        &[
            "proxy-agent",
            "--hostname-override",
            "from-flag",
            "--healthz-bind-address",
            "0.0.0.0:10256",
            "--sync-period",
            "30s",
            "--kubeconfig",
            "/from/flag",
            "--nodeport-addresses",
            "10.0.0.0/8",
        ],
    );
    assert_eq!(args.hostname_override.as_deref(), Some("from-flag"));
    assert_eq!(args.healthz_bind_address.to_string(), "0.0.0.0:10256");
    assert_eq!(args.sync_period, Duration::from_secs(30));
    assert_eq!(args.kubeconfig.as_deref(), Some(Path::new("/from/flag")));
    assert_eq!(args.nodeport_addresses, vec!["10.0.0.0/8".parse::<Cidr>().unwrap()]);
    // The fields no flag named still come from the file.
    assert_eq!(args.metrics_bind_address, config.metrics_bind_address.unwrap());
    assert_eq!(args.min_sync_period, Duration::from_secs(1));
    assert_eq!(used, ["clusterCIDR", "metricsBindAddress", "minSyncPeriod"]);

    // A file that leaves a field to the default leaves the flag's default.
    let (args, used) = run_args(&FileConfig::default(), &["proxy-agent"]);
    assert_eq!(args.healthz_bind_address.to_string(), "0.0.0.0:10256");
    assert_eq!(args.min_sync_period, Duration::from_millis(10));
    assert!(used.is_empty());
}
