//! The embedded default source: a directory of Kubernetes YAML (or JSON), exactly as
//! `kubectl get -o yaml` writes it: single objects, several documents separated by `---`, or a
//! `kind: List`. Services, EndpointSlices and Nodes are read; other kinds are ignored. The
//! directory is watched, and every change re-reads it (unchanged objects cause no map writes).

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use notify::{RecursiveMode, Watcher as _};
use serde::{Deserialize as _, de::DeserializeOwned};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Change, Sourced, Update};
use crate::{metrics::Metrics, model::SkipReason};

/// How long a burst of file events is collected before the directory is re-read.
const SETTLE: Duration = Duration::from_millis(50);

/// Errors that stop the source (bad objects never do).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The directory cannot be read.
    #[error("manifest directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    /// The directory cannot be watched.
    #[error("watching manifest directory {path}: {source}")]
    Watch { path: PathBuf, source: notify::Error },
}

/// Everything one read of the directory found.
#[derive(Debug, Default)]
pub struct Manifests {
    /// Services, in file order.
    pub services: Vec<Sourced<Service>>,
    /// EndpointSlices, in file order.
    pub slices: Vec<Sourced<EndpointSlice>>,
    /// Nodes, in file order.
    pub nodes: Vec<Sourced<Node>>,
    /// Documents that did not parse: (origin, error), one log line each.
    pub errors: Vec<(String, String)>,
}

impl Manifests {
    /// The updates that make the sync loop's view equal to this read.
    pub fn into_updates(self) -> [Update; 3] {
        [
            Update::Nodes(Change::Replace(self.nodes)),
            Update::Services(Change::Replace(self.services)),
            Update::Slices(Change::Replace(self.slices)),
        ]
    }
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file in `dir` (not recursive), in name order.
pub fn read_dir(dir: &Path) -> Result<Manifests, ManifestError> {
    let dir_error = |source| ManifestError::Dir { path: dir.to_owned(), source };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(dir_error)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Manifests::default();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_into(&mut out, &file.display().to_string(), &text),
            Err(e) => out.errors.push((file.display().to_string(), e.to_string())),
        }
    }
    Ok(out)
}

/// Parses one file's text (all its documents) into `out`.
pub fn parse_into(out: &mut Manifests, file: &str, text: &str) {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = format!("{file} (document {})", index + 1);
        match serde_yaml_ng::Value::deserialize(document) {
            Ok(serde_yaml_ng::Value::Null) => {}
            Ok(value) => add_object(out, &origin, value),
            Err(e) => {
                // A syntax error leaves the rest of the file unreadable (and the document
                // iterator would keep yielding the same error).
                out.errors.push((origin, e.to_string()));
                break;
            }
        }
    }
}

fn add_object(out: &mut Manifests, origin: &str, value: serde_yaml_ng::Value) {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned();
    match kind.as_str() {
        "Service" => push(&mut out.services, &mut out.errors, origin, value),
        "EndpointSlice" => push(&mut out.slices, &mut out.errors, origin, value),
        "Node" => push(&mut out.nodes, &mut out.errors, origin, value),
        kind if kind.ends_with("List") => {
            let items = value.get("items").and_then(|i| i.as_sequence()).cloned().unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                add_object(out, &format!("{origin} items[{i}]"), item);
            }
        }
        "" => out.errors.push((origin.to_owned(), "no `kind` field".into())),
        other => debug!(origin, kind = other, "ignoring a kind the proxy does not use"),
    }
}

fn push<T: DeserializeOwned>(
    into: &mut Vec<Sourced<T>>,
    errors: &mut Vec<(String, String)>,
    origin: &str,
    value: serde_yaml_ng::Value,
) {
    match serde_yaml_ng::from_value::<T>(value) {
        Ok(object) => into.push(Sourced { object: Arc::new(object), origin: Some(origin.into()) }),
        Err(e) => errors.push((origin.to_owned(), e.to_string())),
    }
}

/// Reads `dir`, sends its objects, then re-reads and re-sends on every change until `updates`
/// closes. Files that do not parse are logged (one line each, naming the file and the error)
/// and counted; everything else keeps working.
pub async fn run(dir: PathBuf, updates: mpsc::Sender<Update>, metrics: Metrics) -> Result<(), ManifestError> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = events_tx.send(());
        }
    })
    .map_err(|source| ManifestError::Watch { path: dir.clone(), source })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| ManifestError::Watch { path: dir.clone(), source })?;
    info!(dir = %dir.display(), "watching manifest directory");
    // A bad file is reported once, not again on every re-read while it stays bad.
    let mut reported = HashSet::new();
    loop {
        let mut manifests = read_dir(&dir)?;
        let errors: HashSet<_> = manifests.errors.drain(..).collect();
        for (origin, error) in errors.difference(&reported) {
            warn!(origin, %error, "skipping a manifest that does not parse");
            metrics.skipped(SkipReason::Unparseable);
        }
        reported = errors;
        for update in manifests.into_updates() {
            if updates.send(update).await.is_err() {
                return Ok(());
            }
        }
        if events.recv().await.is_none() {
            return Ok(());
        }
        // Editors write in several steps: let the burst settle, then read once.
        tokio::time::sleep(SETTLE).await;
        while events.try_recv().is_ok() {}
    }
}
