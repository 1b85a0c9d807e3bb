//! The Kubernetes API source: watches Services, EndpointSlices (all namespaces) and this node
//! (every node under `--lb-mode dsr|hybrid`) with kube-rs watchers, and annotates this node's
//! Node as taking direct server return. A (re)list is sent as one `Replace` once complete, so
//! a half-listed cluster never looks like deleted services; errors, dropped watches and
//! `410 Gone` are retried with backoff by the watcher (relisting when needed), never by
//! exiting, and the datapath keeps its last state meanwhile.

use std::{fmt::Debug, path::Path, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::core::v1::{Node, ObjectReference},
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Config, Resource,
    api::{ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    Change, Keep, Sourced, Update,
    wire::{ApiService, ApiSlice},
};
use crate::{dsr, metrics::Metrics, model::object_key};

/// Errors that keep the source from starting.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The kubeconfig could not be read.
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: String, source: kube::config::KubeconfigError },
    /// No configuration was found (not in a cluster, no kubeconfig).
    #[error("no Kubernetes configuration (not in a cluster, no kubeconfig; pass --kubeconfig or --manifests): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The client could not be built.
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `--kubeconfig`, else the in-cluster config, else the usual kubeconfig search
/// (`$KUBECONFIG`, `~/.kube/config`), as kube-proxy does.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let error = |source| KubeSourceError::Kubeconfig { path: path.display().to_string(), source };
            let kubeconfig = Kubeconfig::read_from(path).map_err(error)?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.map_err(error)?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Watches until `updates` closes; `metrics` learns whether each watch works (`/healthz` turns
/// unhealthy when the API server stays away). Every Node is watched when `all_nodes` (a
/// `--lb-mode` with direct server return, which needs to know which nodes take it), else only
/// this one. This node's Node is annotated as taking direct server return
/// ([`dsr::DSR_ANNOTATION`]): the programs that learn the option are loaded by now.
pub async fn run(client: Client, node_name: String, all_nodes: bool, updates: mpsc::Sender<Update>, metrics: Metrics) {
    let node_config = if all_nodes {
        watcher::Config::default()
    } else {
        watcher::Config::default().fields(&format!("metadata.name={node_name}"))
    };
    let all = watcher::Config::default;
    tokio::join!(
        watch(Api::<ApiService>::all(client.clone()), all(), updates.clone(), Update::Services, &metrics),
        watch(Api::<ApiSlice>::all(client.clone()), all(), updates.clone(), Update::Slices, &metrics),
        watch(Api::<Node>::all(client.clone()), node_config, updates, Update::Nodes, &metrics),
        announce_dsr(Api::<Node>::all(client), &node_name),
    );
}

/// How long a failed announcement waits before it is tried again.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(5);

/// Sets [`dsr::DSR_ANNOTATION`] on this node's Node (a JSON merge patch: nothing else of the
/// Node is touched), retried until the API server takes it. Until then other nodes SNAT the
/// flows they send here, which works too.
async fn announce_dsr(api: Api<Node>, node_name: &str) {
    let patch = Patch::Merge(dsr::annotation_patch(true));
    let mut warned = false;
    loop {
        match api.patch(node_name, &PatchParams::default(), &patch).await {
            Ok(_) => {
                info!(node = node_name, annotation = dsr::DSR_ANNOTATION, "announced direct server return on the Node");
                return;
            }
            // One warning, not one every retry: until it succeeds other nodes SNAT what they send here.
            Err(error) if !warned => {
                warned = true;
                warn!(node = node_name, %error, "annotating the Node for direct server return failed (needs `patch` on nodes); retrying every 5 s, other nodes SNAT their flows to this node's pods meanwhile");
            }
            Err(error) => debug!(node = node_name, %error, "annotating the Node for direct server return failed again"),
        }
        tokio::time::sleep(ANNOUNCE_RETRY).await;
    }
}

/// Removes [`dsr::DSR_ANNOTATION`] from this node's Node (`--cleanup`): other nodes then SNAT
/// the flows they send here. A Node without it is no error.
pub async fn withdraw_dsr(client: Client, node_name: &str) -> Result<(), kube::Error> {
    let patch = Patch::Merge(dsr::annotation_patch(false));
    Api::<Node>::all(client).patch(node_name, &PatchParams::default(), &patch).await.map(drop)
}

/// Posts a Warning Event on a Service for every `(namespace/name, message)` received, as
/// `proxy-agent` on this node (`kubectl describe service` shows it), until the channel closes.
/// Repeats of one event become a series (the API's `series.count`), not new objects.
pub fn refusal_events(client: Client, node_name: String) -> mpsc::UnboundedSender<(String, String)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
    let reporter = Reporter { controller: "proxy-agent".into(), instance: Some(node_name) };
    let recorder = Recorder::new(client, reporter);
    tokio::spawn(async move {
        while let Some((service, message)) = rx.recv().await {
            let (namespace, name) = service.split_once('/').unwrap_or(("", service.as_str()));
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                ..ObjectReference::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: "ServiceNotProgrammed".into(),
                note: Some(message),
                action: "Program".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &reference).await {
                warn!(service, %error, "posting an Event on the service failed");
            }
        }
    });
    tx
}

/// How often a kind whose watch failed is asked for again (a list of one object), to learn
/// when the API server answers: a watch that comes back says nothing until something changes.
const RECOVERY_PROBE: Duration = Duration::from_secs(1);

/// One kind's watch loop, beside the probe that notices when the API server is back.
async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    updates: mpsc::Sender<Update>,
    wrap: fn(Change<K::Kept>) -> Update,
    metrics: &Metrics,
) where
    K: Resource<DynamicType = ()> + Keep<Kept: Send + Sync> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let kind = K::kind(&()).into_owned();
    let params = ListParams { field_selector: config.field_selector.clone(), limit: Some(1), ..Default::default() };
    tokio::select! {
        () = follow(api.clone(), config, updates, wrap, metrics, &kind) => {}
        () = probe_while_failing(&api, &params, metrics, &kind) => {}
    }
}

/// While the watch of `kind` fails, lists one object every [`RECOVERY_PROBE`]; an answer marks
/// the kind reachable again (for `/healthz`). Never returns.
async fn probe_while_failing<K>(api: &Api<K>, params: &ListParams, metrics: &Metrics, kind: &str)
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    loop {
        tokio::time::sleep(RECOVERY_PROBE).await;
        if !metrics.source_failing().iter().any(|(failing, _)| failing == kind) {
            continue;
        }
        // The client retries some answers by itself for minutes: bounded here.
        if let Ok(Ok(_)) = tokio::time::timeout(RECOVERY_PROBE, api.list(params)).await {
            info!(kind, "the API server answers again");
            metrics.source(kind, true);
        }
    }
}

/// Turns watcher events into [`Change`]s.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    updates: mpsc::Sender<Update>,
    wrap: fn(Change<K::Kept>) -> Update,
    metrics: &Metrics,
    kind: &str,
) where
    K: Resource<DynamicType = ()> + Keep<Kept: Send + Sync> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    // What the model does not read (managedFields, annotations, a Node's images, most of an
    // endpoint) can be most of an object's size: dropped before anything keeps it, a list
    // included.
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listing: Vec<Sourced<K::Kept>> = Vec::new();
    // Whether the last report said the watch works: every object of a list is an event, and
    // only a change needs the shared metrics (a failure is always reported: rare, and the
    // recovery probe may have said "up" meanwhile).
    let mut reported_up = false;
    loop {
        let event = match events.try_next().await {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(error) => {
                // The watcher relists or rewatches by itself after a backoff.
                warn!(kind, %error, "watch failed; retrying with backoff");
                metrics.source(kind, false);
                reported_up = false;
                continue;
            }
        };
        if !reported_up {
            metrics.source(kind, true);
            reported_up = true;
        }
        let change = match event {
            watcher::Event::Init => {
                listing.clear();
                continue;
            }
            watcher::Event::InitApply(object) => {
                listing.push(Sourced::api(object.keep()));
                continue;
            }
            watcher::Event::InitDone => {
                info!(kind, objects = listing.len(), "listed");
                Change::Replace(std::mem::take(&mut listing))
            }
            watcher::Event::Apply(object) => {
                debug!(kind, object = object_key(object.meta()), "applied");
                Change::Apply(Sourced::api(object.keep()))
            }
            watcher::Event::Delete(object) => {
                debug!(kind, object = object_key(object.meta()), "deleted");
                Change::Delete(object_key(object.meta()))
            }
        };
        if updates.send(wrap(change)).await.is_err() {
            return;
        }
    }
}
