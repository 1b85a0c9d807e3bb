//! A small, real HTTP Kubernetes API server for end-to-end tests.
//!
//! It serves the subset of the API that `kube::Client` and `kube::runtime::watcher` use to list and
//! watch Services, EndpointSlices and Nodes: LIST (with label and field selectors, paged with
//! `limit` and `continue` over a consistent snapshot, as kube-runtime's watcher lists), GET by name,
//! and WATCH (history replay, live events, bookmarks, `timeoutSeconds`, `410 Expired` after a
//! compaction), plus `/version`, `/api` and `/apis`. Objects are stored as plain JSON and never
//! validated, so tests can also inject malformed objects. One resourceVersion counter is shared
//! by all kinds, as with etcd.
//!
//! The [`ApiServer`] handle changes the stored objects and injects faults: compaction, cut
//! watches, outages, error statuses and stalled watches. It listens on 127.0.0.1 only and stops
//! when dropped.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use k8s_openapi::api::core::v1::Service;
//! use proxy_tests::apiserver::ApiServer;
//!
//! let server = ApiServer::start().await;
//! let client = kube::Client::try_from(kube::Config::new(server.url().parse()?))?;
//! let rv = server.apply(&Service::default()); // a real test sets metadata.name
//! let services = kube::Api::<Service>::all(client).list(&Default::default()).await?;
//! # Ok(()) }
//! ```

mod http;
mod selector;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use k8s_openapi::Resource;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use selector::Selector;

type BodyError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BodyError>;

/// The kinds the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Service | Kind::Node => "v1",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }

    /// The kind named by a kind name or its plural (case-insensitive), e.g. `Service` or `services`.
    fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| text.eq_ignore_ascii_case(k.name()) || text.eq_ignore_ascii_case(k.plural()))
    }

    /// The kind of a k8s-openapi type; panics for kinds the server does not serve.
    fn of<K: Resource>() -> Kind {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == K::KIND && k.api_version() == K::API_VERSION)
            .unwrap_or_else(|| panic!("test API server does not serve {}", K::KIND))
    }

    /// The namespace an object of this kind is stored under ("" for cluster-scoped kinds).
    fn namespace(self, namespace: Option<&str>) -> String {
        match (self.namespaced(), namespace) {
            (false, _) => String::new(),
            (true, Some(ns)) if !ns.is_empty() => ns.to_owned(),
            (true, _) => "default".to_owned(),
        }
    }
}

/// One stored change, kept in the history for replay and broadcast to open watches.
struct Change {
    rv: u64,
    kind: Kind,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    event: &'static str,
    object: Value,
    /// The object before a `MODIFIED` or `DELETED` change: selectors see objects entering or
    /// leaving, and paged lists see the object as it was at their resourceVersion.
    old: Option<Value>,
}

/// Fault switches, shared with every open watch through a `tokio::sync::watch` channel.
#[derive(Debug, Clone)]
struct Control {
    /// Bumped to cut every open watch.
    generation: u64,
    available: bool,
    fail_status: Option<u16>,
    stalled: Vec<Kind>,
    bookmark_interval: Duration,
}

/// Which objects a LIST or WATCH selects.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    labels: Selector,
    fields: Selector,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
        self.namespace.as_deref().is_none_or(|want| want == ns)
            && self.labels.matches_labels(object)
            && self.fields.matches_fields(object)
    }

    /// The watch event this watch sees for `change`, if any (like the watch cache, an object
    /// modified into or out of the selection is seen as ADDED or DELETED).
    fn event(&self, change: &Change) -> Option<Value> {
        if change.kind != self.kind {
            return None;
        }
        let now = self.matches(&change.object);
        let before = change.old.as_ref().is_some_and(|old| self.matches(old));
        let event = match (change.event, before, now) {
            ("MODIFIED", true, true) => "MODIFIED",
            ("MODIFIED", false, true) => "ADDED",
            ("MODIFIED", true, false) => "DELETED",
            (event, _, true) if event != "MODIFIED" => event,
            _ => return None,
        };
        Some(json!({"type": event, "object": change.object}))
    }
}

/// The stored objects and their history.
#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches starting from a resourceVersion below this one get `410 Expired`.
    compacted: u64,
    /// Keyed by kind, namespace ("" when cluster-scoped) and name.
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Arc<Change>>,
    uids: u64,
    requests: usize,
    lists: HashMap<Kind, usize>,
    /// Merge patches of objects (a Node's annotation), per kind.
    patches: HashMap<Kind, usize>,
    watches: HashMap<Kind, usize>,
    /// Events written (`create` or `patch`, the object after the write), in order.
    posted_events: Vec<(String, Value)>,
}

impl Store {
    /// The objects of `kind` as they were at resourceVersion `rv` (not before the last
    /// compaction), in key order, after the key `after` (namespace, name): the stored ones with
    /// every later change undone from the history, as etcd reads at a revision.
    fn at(
        &self,
        kind: Kind,
        rv: u64,
        after: Option<(String, String)>,
    ) -> impl Iterator<Item = ((String, String), &Value)> {
        // Per key, the state before its first change after `rv` (`None`: it did not exist yet).
        let mut undone: BTreeMap<(String, String), Option<&Value>> = BTreeMap::new();
        let since = self.history.partition_point(|c| c.rv <= rv);
        for change in self.history[since..].iter().filter(|c| c.kind == kind) {
            let meta = &change.object["metadata"];
            let key =
                (kind.namespace(meta["namespace"].as_str()), meta["name"].as_str().unwrap_or_default().to_owned());
            let before = if change.event == "ADDED" { None } else { change.old.as_ref() };
            undone.entry(key).or_insert(before);
        }
        undone.retain(|key, _| after.as_ref().is_none_or(|after| key > after));
        let start = match &after {
            Some((namespace, name)) => Bound::Excluded((kind, namespace.clone(), name.clone())),
            None => Bound::Included((kind, String::new(), String::new())),
        };
        let mut current = self
            .objects
            .range((start, Bound::Unbounded))
            .take_while(move |((k, ..), _)| *k == kind)
            .map(|((_, namespace, name), object)| ((namespace.clone(), name.clone()), object))
            .peekable();
        let mut undone = undone.into_iter().peekable();
        // A merge of the two key-ordered sequences; where both have a key, the undone state wins.
        std::iter::from_fn(move || {
            loop {
                let (key, object) = match (current.peek(), undone.peek()) {
                    (None, None) => return None,
                    (Some((key, _)), Some((changed, _))) if key == changed => {
                        current.next();
                        undone.next()?
                    }
                    (Some((key, _)), Some((changed, _))) if key > changed => undone.next()?,
                    (None, Some(_)) => undone.next()?,
                    _ => current.next().map(|(key, object)| (key, Some(object)))?,
                };
                if let Some(object) = object {
                    return Some((key, object));
                }
            }
        })
    }
}

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Arc<Change>>,
    control: tokio::sync::watch::Sender<Control>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn control(&self) -> Control {
        self.control.borrow().clone()
    }
}

/// A running test API server; stops when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    /// Starts a server on 127.0.0.1 with an ephemeral port (inside a Tokio runtime).
    pub async fn start() -> ApiServer {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind the test API server on 127.0.0.1");
        let addr = listener.local_addr().expect("listener address");
        let control = Control {
            generation: 0,
            available: true,
            fail_status: None,
            stalled: Vec::new(),
            bookmark_interval: Duration::from_secs(1),
        };
        let shared = Arc::new(Shared {
            store: Mutex::default(),
            events: broadcast::channel(4096).0,
            control: tokio::sync::watch::Sender::new(control),
        });
        let task = tokio::spawn(http::serve(listener, Arc::clone(&shared)));
        ApiServer { addr, shared, task }
    }

    /// The Events clients wrote (events.k8s.io/v1), in order: the verb (`create`, `patch`) and
    /// the Event after the write.
    pub fn posted_events(&self) -> Vec<(String, Value)> {
        self.shared.store().posted_events.clone()
    }

    /// Starts a server on `runtime` listening on 127.0.0.1 inside the network namespace `ns`
    /// (a listening socket belongs to the namespace of the thread that binds it), so that an
    /// agent running there reaches it.
    pub fn start_in(runtime: &tokio::runtime::Runtime, ns: &crate::netns::Netns) -> anyhow::Result<ApiServer> {
        std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<ApiServer> {
                ns.enter()?;
                Ok(runtime.block_on(ApiServer::start()))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread starting the test API server panicked"))?
        })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (plain HTTP, no auth, namespace `default`); panics on I/O errors.
    pub fn write_kubeconfig(&self, path: &Path) {
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    \
             cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\n",
            self.url()
        );
        std::fs::write(path, kubeconfig).unwrap_or_else(|e| panic!("write kubeconfig {}: {e}", path.display()));
    }

    /// Creates or replaces `obj` (ADDED or MODIFIED) and returns its new resourceVersion.
    pub fn apply<K: Resource + serde::Serialize>(&self, obj: &K) -> String {
        let value = serde_json::to_value(obj).expect("serialize a k8s-openapi object");
        self.store(Kind::of::<K>(), value)
    }

    /// Stores arbitrary JSON, unvalidated, as an object of `kind` (`"Service"`, `"endpointslices"`,
    /// `"Node"`, … by kind or plural) and returns its new resourceVersion.
    ///
    /// Missing `kind`, `apiVersion`, `metadata.namespace` (namespaced kinds: `default`), `uid` and
    /// `creationTimestamp` are filled in and `metadata.resourceVersion` is set; nothing else is
    /// touched. Panics if `value` is not a JSON object or `kind` is not served.
    pub fn apply_raw(&self, kind: &str, value: Value) -> String {
        let kind = Kind::parse(kind).unwrap_or_else(|| panic!("test API server does not serve {kind}"));
        self.store(kind, value)
    }

    /// Deletes an object (DELETED); `false` if it did not exist. `None` means `default` for namespaced kinds.
    pub fn delete<K: Resource>(&self, namespace: Option<&str>, name: &str) -> bool {
        self.remove(Kind::of::<K>(), namespace, name)
    }

    /// [`ApiServer::delete`] by kind name or plural, as for [`ApiServer::apply_raw`].
    pub fn delete_raw(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let kind = Kind::parse(kind).unwrap_or_else(|| panic!("test API server does not serve {kind}"));
        self.remove(kind, namespace, name)
    }

    fn remove(&self, kind: Kind, namespace: Option<&str>, name: &str) -> bool {
        let mut store = self.shared.store();
        let key = (kind, kind.namespace(namespace), name.to_owned());
        let Some(mut object) = store.objects.remove(&key) else {
            return false;
        };
        // Kept as the change's `old`: a paged list at an earlier resourceVersion still shows it.
        let before = object.clone();
        store.rv += 1;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), store.rv.to_string().into());
        }
        self.shared.record(&mut store, kind, "DELETED", object, Some(before));
        true
    }

    /// The stored objects of a kind, ordered by namespace and name.
    pub fn objects<K: Resource>(&self) -> Vec<Value> {
        let kind = Kind::of::<K>();
        let store = self.shared.store();
        store.objects.iter().filter(|((k, ..), _)| *k == kind).map(|(_, v)| v.clone()).collect()
    }

    /// The current resourceVersion (the last one handed out).
    pub fn resource_version(&self) -> String {
        self.shared.store().rv.to_string()
    }

    /// Forgets the event history (advancing the resourceVersion by one, as other writes would):
    /// from now on, a watch from any earlier resourceVersion gets `410 Expired`. Open watches go on.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        store.rv += 1;
        store.compacted = store.rv;
        store.history.clear();
    }

    /// Abruptly cuts every open watch (the connection breaks mid-body); clients must re-watch.
    pub fn drop_watches(&self) {
        self.shared.control.send_modify(|c| c.generation += 1);
    }

    /// Simulates an outage: while down, every connection is closed without a response (as with a
    /// crashed API server behind a load balancer) and open watches are cut.
    ///
    /// kube 5's client retries 429/503/504 responses by itself (up to 15 times, with backoff up to
    /// minutes), so a connection failure is what makes a client notice an outage promptly.
    pub fn set_available(&self, up: bool) {
        self.shared.control.send_modify(|c| c.available = up);
    }

    /// Answers every request with this HTTP status and a `Status` body until reset with `None`;
    /// open watches are not touched. (kube 5's client retries 429, 503 and 504 itself unless its
    /// `Config::default_retry` is off.)
    pub fn set_fail_status(&self, status: Option<u16>) {
        self.shared.control.send_modify(|c| c.fail_status = status);
    }

    /// Stalls (or resumes) every watch of kind `K`, open or new: while stalled they send nothing,
    /// not even bookmarks, and ignore `timeoutSeconds`; changes are kept and sent on resume.
    pub fn set_stalled<K: Resource>(&self, stalled: bool) {
        let kind = Kind::of::<K>();
        self.shared.control.send_modify(|c| {
            c.stalled.retain(|k| *k != kind);
            if stalled {
                c.stalled.push(kind);
            }
        });
    }

    /// How often watches that allow bookmarks get one (default 1 s; zero disables). Affects new watches.
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.control.send_modify(|c| c.bookmark_interval = every);
    }

    /// How many LIST requests for kind `K` were served.
    pub fn list_count<K: Resource>(&self) -> usize {
        self.shared.store().lists.get(&Kind::of::<K>()).copied().unwrap_or(0)
    }

    /// How many WATCH requests for kind `K` were accepted (including ones answered with 410).
    pub fn watch_count<K: Resource>(&self) -> usize {
        self.shared.store().watches.get(&Kind::of::<K>()).copied().unwrap_or(0)
    }

    /// How many merge patches of kind `K` were applied.
    pub fn patch_count<K: Resource>(&self) -> usize {
        self.shared.store().patches.get(&Kind::of::<K>()).copied().unwrap_or(0)
    }

    /// How many HTTP requests were received in total (including failed ones).
    pub fn request_count(&self) -> usize {
        self.shared.store().requests
    }

    fn store(&self, kind: Kind, value: Value) -> String {
        self.shared.put(kind, value)
    }
}

impl Shared {
    /// Creates or replaces an object (ADDED or MODIFIED) and returns its new resourceVersion.
    pub(crate) fn put(&self, kind: Kind, mut value: Value) -> String {
        let mut store = self.store();
        store.rv += 1;
        let rv = store.rv;
        let object = value.as_object_mut().expect("a Kubernetes object is a JSON object");
        object.entry("kind").or_insert(kind.name().into());
        object.entry("apiVersion").or_insert(kind.api_version().into());
        let meta = object.entry("metadata").or_insert_with(|| json!({}));
        let name = meta["name"].as_str().unwrap_or_default().to_owned();
        let namespace = kind.namespace(meta["namespace"].as_str());
        let key = (kind, namespace.clone(), name);
        let old = store.objects.get(&key).cloned();
        if let Some(meta) = meta.as_object_mut() {
            if kind.namespaced() {
                meta.insert("namespace".into(), namespace.into());
            }
            meta.insert("resourceVersion".into(), rv.to_string().into());
            let old_meta = old.as_ref().map(|o| &o["metadata"]);
            if !meta.contains_key("uid") {
                let uid = match old_meta.and_then(|m| m.get("uid")) {
                    Some(uid) => uid.clone(),
                    None => {
                        store.uids += 1;
                        format!("00000000-0000-4000-8000-{:012x}", store.uids).into()
                    }
                };
                meta.insert("uid".into(), uid);
            }
            if !meta.contains_key("creationTimestamp") {
                let created = old_meta.and_then(|m| m.get("creationTimestamp")).cloned();
                let now = || serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).expect("time");
                meta.insert("creationTimestamp".into(), created.unwrap_or_else(now));
            }
        }
        store.objects.insert(key, value.clone());
        let event = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(&mut store, kind, event, value, old);
        rv.to_string()
    }

    /// Appends a change at the current resourceVersion to the history and sends it to open watches.
    fn record(&self, store: &mut Store, kind: Kind, event: &'static str, object: Value, old: Option<Value>) {
        let change = Arc::new(Change { rv: store.rv, kind, event, object, old });
        store.history.push(Arc::clone(&change));
        // No receivers just means no open watches; the store lock orders sends with subscriptions.
        _ = self.events.send(change);
    }
}
