//! kube-proxy's own configuration file (`KubeProxyConfiguration`,
//! `kubeproxy.config.k8s.io/v1alpha1`): the `config.conf` kubeadm ships in the `kube-proxy`
//! ConfigMap, read by `--config`. The fields that mean the same here are used, kube-proxy's
//! own (modes, conntrack tuning) are ignored, and flags given on the command line win.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_yaml_ng::{Mapping, Value};

use crate::{cli::RunArgs, model::Cidr, observe::BindAddress};

/// The API version and kind the file must declare.
const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
const KIND: &str = "KubeProxyConfiguration";

/// kube-proxy's ports when an address is given without one (its `ports.ProxyHealthzPort` and
/// `ports.ProxyStatusPort`).
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;

/// Fields of the file that only kube-proxy's own datapaths or process use: read, and named as
/// ignored.
const IGNORED: &[&str] = &[
    "bindAddress",
    "bindAddressHardFail",
    "configSyncPeriod",
    "conntrack",
    "detectLocal",
    "detectLocalMode",
    "enableProfiling",
    "featureGates",
    "iptables",
    "ipvs",
    "logging",
    "mode",
    "nftables",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "udpIdleTimeout",
    "windowsRunAsService",
    "winkernel",
];

/// What went wrong reading the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {}: {source} - pass --config the path of kube-proxy's config.conf", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a YAML mapping.
    #[error("{}: not a KubeProxyConfiguration (a YAML mapping): {message}", path.display())]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// A field holds a value that means nothing here.
    #[error("{}: field {field}: {message}", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The field, dotted from the top (`clientConnection.kubeconfig`).
        field: String,
        /// What is wrong and what to write instead.
        message: String,
    },
}

/// The settings a KubeProxyConfiguration holds for the agent; `None` where the file leaves
/// the value to the default (kube-proxy's defaulting treats `""`, `0s` and `null` so).
#[derive(Debug, Default, PartialEq)]
pub struct FileConfig {
    /// `hostnameOverride`.
    pub hostname_override: Option<String>,
    /// `clusterCIDR` (comma-separated, one range per family).
    pub cluster_cidr: Option<Vec<Cidr>>,
    /// `nodePortAddresses` (ranges of both families); `Some(empty)` means all addresses.
    pub nodeport_addresses: Option<Vec<Cidr>>,
    /// `healthzBindAddress`.
    pub healthz_bind_address: Option<BindAddress>,
    /// `metricsBindAddress`.
    pub metrics_bind_address: Option<BindAddress>,
    /// `syncPeriod` (else the period of the mode's block, as kube-proxy falls back).
    pub sync_period: Option<Duration>,
    /// `minSyncPeriod` (likewise).
    pub min_sync_period: Option<Duration>,
    /// `clientConnection.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// Fields present that only kube-proxy uses, dotted.
    pub ignored: Vec<String>,
    /// Fields no KubeProxyConfiguration has (misspelt, or from a newer kube-proxy).
    pub unknown: Vec<String>,
    /// Values only partly usable here, each a sentence for the log.
    pub notes: Vec<String>,
}

impl FileConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(path, &text)
    }

    /// Parses `text`, the content of `path` (named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let yaml_error = |message: String| ConfigError::Yaml { path: path.to_owned(), message };
        let root: Value = serde_yaml_ng::from_str(text).map_err(|e| yaml_error(e.to_string()))?;
        let Value::Mapping(root) = root else { return Err(yaml_error("the document is not a mapping".into())) };
        let fields = Fields { path, map: &root, prefix: String::new() };
        fields.expect_text("apiVersion", API_VERSION)?;
        fields.expect_text("kind", KIND)?;
        let mut config = Self {
            hostname_override: fields.text("hostnameOverride")?,
            kubeconfig: match fields.nested("clientConnection")? {
                Some(connection) => connection.text("kubeconfig")?.map(PathBuf::from),
                None => None,
            },
            ..Self::default()
        };
        config.cluster_cidr = config.cidrs(&fields, "clusterCIDR")?;
        config.nodeport_addresses = config.cidrs(&fields, "nodePortAddresses")?;
        config.healthz_bind_address = fields.bind_address("healthzBindAddress", HEALTHZ_PORT)?;
        config.metrics_bind_address = fields.bind_address("metricsBindAddress", METRICS_PORT)?;
        let mode_block = match fields.text("mode")?.as_deref() {
            Some("ipvs") => "ipvs",
            Some("nftables") => "nftables",
            _ => "iptables",
        };
        let mode_fields = fields.nested(mode_block)?;
        for (name, slot) in [("syncPeriod", &mut config.sync_period), ("minSyncPeriod", &mut config.min_sync_period)] {
            *slot = match fields.duration(name)? {
                Some(period) => Some(period),
                None => match &mode_fields {
                    Some(mode) => mode.duration(name)?,
                    None => None,
                },
            };
        }
        for key in root.keys() {
            let name = key.as_str().unwrap_or("(not a string)");
            match name {
                "apiVersion" | "kind" | "hostnameOverride" | "clusterCIDR" | "nodePortAddresses"
                | "healthzBindAddress" | "metricsBindAddress" | "syncPeriod" | "minSyncPeriod" => {}
                "clientConnection" => {
                    let Some(Value::Mapping(connection)) = root.get(key) else { continue };
                    let others = connection.keys().filter_map(Value::as_str).filter(|k| *k != "kubeconfig");
                    config.ignored.extend(others.map(|k| format!("clientConnection.{k}")));
                }
                _ if IGNORED.contains(&name) => config.ignored.push(name.to_owned()),
                _ => config.unknown.push(name.to_owned()),
            }
        }
        Ok(config)
    }

    /// The CIDRs (either family) of a list field (`nodePortAddresses`) or a comma-separated one
    /// (`clusterCIDR`); `primary` is noted, as the agent has no notion of a primary address.
    fn cidrs(&mut self, fields: &Fields<'_>, name: &str) -> Result<Option<Vec<Cidr>>, ConfigError> {
        let entries: Vec<String> = match fields.map.get(name) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(text)) if text.trim().is_empty() => return Ok(None),
            Some(Value::String(text)) => text.split(',').map(|s| s.trim().to_owned()).collect(),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| {
                    item.as_str().map(str::to_owned).ok_or_else(|| fields.error(name, "entries must be strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(fields.error(name, "want a CIDR or a list of CIDRs")),
        };
        let mut cidrs = Vec::new();
        for entry in entries {
            if entry == "primary" {
                self.notes.push(format!(
                    "{name}: \"primary\" (the node's primary addresses) is not supported: nodePorts are served on \
                     every node address unless other ranges are listed - list the node's address as a /32 instead"
                ));
            } else {
                cidrs.push(entry.parse::<Cidr>().map_err(|e| fields.error(name, &e.to_string()))?);
            }
        }
        Ok(Some(cidrs))
    }

    /// Fills the settings of `args` that were not given on the command line (`given(id)` says
    /// whether the flag with clap id `id` was) from the file. Returns the fields used.
    pub fn apply(&self, args: &mut RunArgs, given: impl Fn(&str) -> bool) -> Vec<&'static str> {
        let mut used = Vec::new();
        let mut take = |id: &str, field: &'static str, present: bool| {
            let take = present && !given(id);
            if take {
                used.push(field);
            }
            take
        };
        if take("hostname_override", "hostnameOverride", self.hostname_override.is_some()) {
            args.hostname_override.clone_from(&self.hostname_override);
        }
        if let Some(cidrs) = &self.cluster_cidr
            && take("cluster_cidr", "clusterCIDR", true)
        {
            args.cluster_cidr.clone_from(cidrs);
        }
        if let Some(cidrs) = &self.nodeport_addresses
            && take("nodeport_addresses", "nodePortAddresses", true)
        {
            args.nodeport_addresses.clone_from(cidrs);
        }
        if let Some(address) = self.healthz_bind_address
            && take("healthz_bind_address", "healthzBindAddress", true)
        {
            args.healthz_bind_address = address;
        }
        if let Some(address) = self.metrics_bind_address
            && take("metrics_bind_address", "metricsBindAddress", true)
        {
            args.metrics_bind_address = address;
        }
        if let Some(period) = self.sync_period
            && take("sync_period", "syncPeriod", true)
        {
            args.sync_period = period;
        }
        if let Some(period) = self.min_sync_period
            && take("min_sync_period", "minSyncPeriod", true)
        {
            args.min_sync_period = period;
        }
        if take("kubeconfig", "clientConnection.kubeconfig", self.kubeconfig.is_some()) {
            args.kubeconfig.clone_from(&self.kubeconfig);
        }
        used
    }
}

/// The fields of one mapping of the file, `prefix` naming where it sits (`clientConnection.`).
struct Fields<'a> {
    path: &'a Path,
    map: &'a Mapping,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn error(&self, name: &str, message: &str) -> ConfigError {
        ConfigError::Field {
            path: self.path.to_owned(),
            field: format!("{}{name}", self.prefix),
            message: message.into(),
        }
    }

    /// A string field; `None` when absent, null or empty.
    fn text(&self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) if text.trim().is_empty() => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.trim().to_owned())),
            Some(_) => Err(self.error(name, "want a string")),
        }
    }

    fn expect_text(&self, name: &str, want: &str) -> Result<(), ConfigError> {
        match self.text(name)? {
            Some(found) if found == want => Ok(()),
            found => Err(self.error(
                name,
                &format!("is {:?}, want {want:?} (is this kube-proxy's config.conf?)", found.unwrap_or_default()),
            )),
        }
    }

    /// A nested mapping; `None` when absent or null.
    fn nested(&self, name: &str) -> Result<Option<Fields<'a>>, ConfigError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Mapping(map)) => {
                Ok(Some(Fields { path: self.path, map, prefix: format!("{}{name}.", self.prefix) }))
            }
            Some(_) => Err(self.error(name, "want a mapping")),
        }
    }

    /// A Go duration (`30s`, `1m0s`, `500ms`) up to a day; `None` when absent, empty or zero
    /// (kube-proxy's defaulting replaces a zero period).
    fn duration(&self, name: &str) -> Result<Option<Duration>, ConfigError> {
        let Some(text) = self.text(name)? else { return Ok(None) };
        let period = humantime::parse_duration(&text)
            .map_err(|e| self.error(name, &format!("{text:?} is not a duration such as 30s or 1m0s: {e}")))?;
        if period > crate::cli::MAX_PERIOD {
            return Err(self.error(name, "must be at most 24h"));
        }
        Ok((!period.is_zero()).then_some(period))
    }

    /// kube-proxy's bind address: `IP:port`, or an IP alone (kube-proxy's port for it); `None`
    /// when empty, which kube-proxy's defaulting fills with its default address (not "off").
    fn bind_address(&self, name: &str, default_port: u16) -> Result<Option<BindAddress>, ConfigError> {
        let Some(text) = self.text(name)? else { return Ok(None) };
        let address = text
            .parse::<SocketAddr>()
            .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, default_port)))
            .map_err(|_| self.error(name, &format!("{text:?} is neither IP:port nor an IP")))?;
        Ok(Some(BindAddress(Some(address))))
    }
}

#[cfg(test)]
mod tests;
