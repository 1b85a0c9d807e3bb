//! The test API server, driven by the real kube client and kube-runtime watcher over HTTP.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, ObjectMeta, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Config, Resource, ResourceExt};
use proxy_tests::apiserver::ApiServer;
use serde_json::json;

/// Upper bound for every wait in these tests.
const WAIT: Duration = Duration::from_secs(15);

async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn next<S: Stream + Unpin>(what: &str, stream: &mut S) -> S::Item {
    bounded(what, stream.next()).await.unwrap_or_else(|| panic!("stream ended: {what}"))
}

fn client(server: &ApiServer) -> Client {
    Client::try_from(Config::new(server.url().parse().expect("server URL"))).expect("kube client")
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

fn service(ns: &str, name: &str, cluster_ip: &str, port: i32, app: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: labels(&[("app", app)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            ports: Some(vec![ServicePort { port, protocol: Some("TCP".into()), ..Default::default() }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(ns: &str, name: &str, service: &str, addresses: &[&str]) -> EndpointSlice {
    let endpoint = |address: &&str| Endpoint {
        addresses: vec![address.to_string()],
        node_name: Some("node-1".into()),
        ..Default::default()
    };
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: labels(&[("kubernetes.io/service-name", service)]),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: addresses.iter().map(endpoint).collect(),
        ..Default::default()
    }
}

fn node(name: &str) -> Node {
    Node { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() }
}

fn port(svc: &Service) -> i32 {
    svc.spec.as_ref().and_then(|s| s.ports.as_ref()).map_or(0, |p| p[0].port)
}

fn key<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// What a watcher's consumer would hold: the objects, rebuilt on every Init..InitDone.
struct Mirror<K> {
    objects: BTreeMap<String, K>,
    buffer: Option<BTreeMap<String, K>>,
    inits: usize,
    errors: Vec<String>,
}

impl<K: Resource + Clone> Mirror<K> {
    fn new() -> Self {
        Mirror { objects: BTreeMap::new(), buffer: None, inits: 0, errors: Vec::new() }
    }

    fn feed(&mut self, event: Result<Event<K>, watcher::Error>) {
        match event {
            Ok(Event::Init) => self.buffer = Some(BTreeMap::new()),
            Ok(Event::InitApply(obj)) => _ = self.buffer.as_mut().expect("Init first").insert(key(&obj), obj),
            Ok(Event::InitDone) => {
                self.objects = self.buffer.take().expect("Init first");
                self.inits += 1;
            }
            Ok(Event::Apply(obj)) => _ = self.objects.insert(key(&obj), obj),
            Ok(Event::Delete(obj)) => _ = self.objects.remove(&key(&obj)),
            Err(err) => self.errors.push(err.to_string()),
        }
    }

    /// Feeds events until `done` holds (checked after every event and every 20 ms; bounded by `WAIT`).
    async fn sync_until<S>(&mut self, what: &str, stream: &mut S, done: impl Fn(&Self) -> bool)
    where
        S: Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
    {
        bounded(what, async {
            while !done(self) {
                if let Ok(event) = tokio::time::timeout(Duration::from_millis(20), stream.next()).await {
                    self.feed(event.expect("watchers never end"));
                }
            }
        })
        .await;
    }

    /// Keeps feeding events (if any) for `duration`, so the watcher keeps running.
    async fn drive_for<S>(&mut self, duration: Duration, stream: &mut S)
    where
        S: Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
    {
        let deadline = tokio::time::Instant::now() + duration;
        while let Ok(event) = tokio::time::timeout_at(deadline, stream.next()).await {
            self.feed(event.expect("watchers never end"));
        }
    }
}

/// Services as `namespace/name -> port`, for comparisons.
fn ports(mirror: &Mirror<Service>) -> BTreeMap<String, i32> {
    mirror.objects.iter().map(|(k, s)| (k.clone(), port(s))).collect()
}

fn expect_ports(pairs: &[(&str, i32)]) -> BTreeMap<String, i32> {
    pairs.iter().map(|(k, p)| (k.to_string(), *p)).collect()
}

type Watch<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

fn service_watcher(client: Client) -> Watch<Service> {
    watcher::watcher(Api::<Service>::all(client), watcher::Config::default()).default_backoff().boxed()
}

#[tokio::test]
async fn list_get_and_selectors_through_a_kubeconfig() {
    let server = ApiServer::start().await;
    let path = std::env::temp_dir().join(format!("apiserver-test-{}-{}.yaml", std::process::id(), server.url().len()));
    server.write_kubeconfig(&path);
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    std::fs::remove_file(&path).expect("remove kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("config");
    assert_eq!(config.cluster_url.to_string().trim_end_matches('/'), server.url());
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).expect("client");

    let rv_web = server.apply(&service("default", "web", "10.96.0.10", 80, "web"));
    let rv_db = server.apply(&service("shop", "db", "10.96.0.20", 5432, "db"));
    assert!(rv_db.parse::<u64>().unwrap() > rv_web.parse::<u64>().unwrap());

    let version = bounded("version", client.apiserver_version()).await.expect("/version");
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "34"));

    let all = bounded("list", Api::<Service>::all(client.clone()).list(&ListParams::default())).await.unwrap();
    assert_eq!(all.metadata.resource_version.as_deref(), Some(rv_db.as_str()));
    let listed: Vec<_> = all.items.iter().map(|s| (key(s), s.resource_version().unwrap(), port(s))).collect();
    assert_eq!(listed, [("default/web".into(), rv_web.clone(), 80), ("shop/db".into(), rv_db.clone(), 5432)]);
    assert!(all.items.iter().all(|s| s.uid().is_some() && s.creation_timestamp().is_some()));

    // Namespaced list (the kubeconfig's namespace), label and field selectors.
    let default_ns = Api::<Service>::default_namespaced(client.clone());
    let names = |list: kube::api::ObjectList<Service>| list.items.iter().map(key).collect::<Vec<_>>();
    assert_eq!(names(default_ns.list(&ListParams::default()).await.unwrap()), ["default/web"]);
    let all_api = Api::<Service>::all(client.clone());
    for (selector, want) in [("app=db", vec!["shop/db"]), ("app!=db", vec!["default/web"]), ("!app", vec![])] {
        let got = names(all_api.list(&ListParams::default().labels(selector)).await.unwrap());
        assert_eq!(got, want, "labelSelector {selector}");
    }
    let by_name = all_api.list(&ListParams::default().fields("metadata.name=db")).await.unwrap();
    assert_eq!(names(by_name), ["shop/db"]);
    assert_eq!(server.list_count::<Service>(), 6);

    // GET by name, and a 404 Status for a missing one.
    let shop = Api::<Service>::namespaced(client.clone(), "shop");
    let db = shop.get("db").await.unwrap();
    assert_eq!(db.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.20"));
    match shop.get("missing").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"))
        }
        other => panic!("expected 404, got {other:?}"),
    }
    assert!(shop.get_opt("missing").await.unwrap().is_none());
}

#[tokio::test]
async fn watcher_sees_init_then_apply_and_delete() {
    let server = ApiServer::start().await;
    let client = client(&server);
    let rv_a = server.apply(&service("default", "a", "10.96.0.1", 80, "a"));
    let rv_b = server.apply(&service("default", "b", "10.96.0.2", 81, "b"));
    let mut events = watcher::watcher(Api::<Service>::all(client), watcher::Config::default()).boxed();

    assert!(matches!(next("Init", &mut events).await, Ok(Event::Init)));
    for (name, rv) in [("a", &rv_a), ("b", &rv_b)] {
        match next("InitApply", &mut events).await {
            Ok(Event::InitApply(s)) => {
                assert_eq!((s.name_any(), s.resource_version()), (name.into(), Some(rv.clone())))
            }
            other => panic!("expected InitApply({name}), got {other:?}"),
        }
    }
    assert!(matches!(next("InitDone", &mut events).await, Ok(Event::InitDone)));

    let rv_c = server.apply(&service("other", "c", "10.96.0.3", 82, "c"));
    match next("Apply c", &mut events).await {
        Ok(Event::Apply(s)) => {
            assert_eq!((key(&s), s.resource_version(), port(&s)), ("other/c".into(), Some(rv_c), 82))
        }
        other => panic!("expected Apply(c), got {other:?}"),
    }
    let rv_a2 = server.apply(&service("default", "a", "10.96.0.1", 8080, "a"));
    match next("Apply a", &mut events).await {
        Ok(Event::Apply(s)) => {
            assert_eq!((key(&s), s.resource_version(), port(&s)), ("default/a".into(), Some(rv_a2), 8080))
        }
        other => panic!("expected Apply(a), got {other:?}"),
    }
    assert!(server.delete::<Service>(Some("default"), "b"));
    assert!(!server.delete::<Service>(Some("default"), "b"));
    match next("Delete b", &mut events).await {
        Ok(Event::Delete(s)) => {
            assert_eq!((key(&s), s.resource_version()), ("default/b".into(), Some(server.resource_version())));
        }
        other => panic!("expected Delete(b), got {other:?}"),
    }
    assert_eq!((server.list_count::<Service>(), server.watch_count::<Service>()), (1, 1));
}

#[tokio::test]
async fn compaction_and_cut_watches_force_a_relist_that_converges() {
    let server = ApiServer::start().await;
    server.apply(&service("default", "a", "10.96.0.1", 80, "a"));
    server.apply(&service("default", "b", "10.96.0.2", 81, "b"));
    let mut events = service_watcher(client(&server));
    let mut mirror = Mirror::new();
    // The watcher sends its WATCH only when polled after InitDone: wait until it is open.
    mirror.sync_until("watch open", &mut events, |_| server.watch_count::<Service>() == 1).await;
    assert_eq!(ports(&mirror), expect_ports(&[("default/a", 80), ("default/b", 81)]));
    assert_eq!(server.list_count::<Service>(), 1);

    // Changes the open watch never delivers (stalled), then history is lost and the watch is cut.
    server.set_stalled::<Service>(true);
    server.apply(&service("default", "c", "10.96.0.3", 82, "c"));
    server.apply(&service("default", "b", "10.96.0.2", 9090, "b"));
    assert!(server.delete::<Service>(None, "a"));
    server.compact();
    server.drop_watches();
    server.set_stalled::<Service>(false);

    mirror.sync_until("relist", &mut events, |m| m.inits == 2).await;
    assert_eq!(ports(&mirror), expect_ports(&[("default/b", 9090), ("default/c", 82)]));
    assert_eq!(server.list_count::<Service>(), 2);
    assert!(
        mirror.errors.iter().any(|e| e.contains("too old resource version")),
        "expected a 410 Expired watch error, got {:?}",
        mirror.errors
    );

    // And it keeps watching after the relist.
    server.apply(&service("default", "d", "10.96.0.4", 83, "d"));
    mirror.sync_until("apply after relist", &mut events, |m| m.objects.contains_key("default/d")).await;
    assert_eq!(server.list_count::<Service>(), 2);
}

#[tokio::test]
async fn bookmarks_and_timeouts_do_not_disturb_watchers() {
    let server = ApiServer::start().await;
    server.set_bookmark_interval(Duration::from_millis(100));
    let client = client(&server);
    let rv = server.apply(&service("default", "a", "10.96.0.1", 80, "a"));

    // Raw watch: bookmarks carry the current resourceVersion and keep coming after a change.
    let api = Api::<Service>::all(client.clone());
    let mut raw = bounded("watch", api.watch(&WatchParams::default(), &rv)).await.unwrap().boxed();
    for _ in 0..3 {
        match next("bookmark", &mut raw).await.unwrap() {
            WatchEvent::Bookmark(bm) => assert_eq!(bm.metadata.resource_version, rv),
            other => panic!("expected a bookmark, got {other:?}"),
        }
    }
    let rv2 = server.apply(&service("default", "b", "10.96.0.2", 81, "b"));
    let mut seen_added = false;
    loop {
        match next("added then bookmark", &mut raw).await.unwrap() {
            WatchEvent::Added(s) => {
                assert_eq!((s.name_any(), s.resource_version()), ("b".into(), Some(rv2.clone())));
                seen_added = true;
            }
            WatchEvent::Bookmark(bm) if seen_added => {
                assert_eq!(bm.metadata.resource_version, rv2);
                break;
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(raw);

    // The watcher swallows bookmarks and goes on without re-listing or re-watching.
    let mut events = service_watcher(client.clone());
    let mut mirror = Mirror::new();
    mirror.sync_until("initial list", &mut events, |m| m.inits == 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    server.apply(&service("default", "c", "10.96.0.3", 82, "c"));
    mirror.sync_until("apply after bookmarks", &mut events, |m| m.objects.len() == 3).await;
    // One watch by the raw client above, one by the watcher.
    assert_eq!((server.list_count::<Service>(), server.watch_count::<Service>()), (1, 2));
    assert!(mirror.errors.is_empty(), "{:?}", mirror.errors);

    // timeoutSeconds ends a watch cleanly; the watcher re-watches without re-listing.
    let started = Instant::now();
    let short = api.watch(&WatchParams::default().disable_bookmarks().timeout(1), &server.resource_version()).await;
    let mut short = short.unwrap().boxed();
    assert!(bounded("watch timeout", short.next()).await.is_none());
    assert!(started.elapsed() >= Duration::from_millis(900), "ended after {:?}", started.elapsed());

    let mut events = watcher::watcher(api, watcher::Config::default().timeout(1)).default_backoff().boxed();
    let mut mirror = Mirror::new();
    mirror.sync_until("initial list", &mut events, |m| m.inits == 1).await;
    let (lists, watches) = (server.list_count::<Service>(), server.watch_count::<Service>());
    mirror.drive_for(Duration::from_millis(2500), &mut events).await;
    let renewed = server.watch_count::<Service>();
    assert!(renewed >= watches + 2, "the watch was not renewed: {watches} -> {renewed}");
    server.apply(&service("default", "d", "10.96.0.4", 83, "d"));
    mirror.sync_until("apply after timeouts", &mut events, |m| m.objects.len() == 4).await;
    assert_eq!(server.list_count::<Service>(), lists);
    assert!(mirror.errors.is_empty(), "{:?}", mirror.errors);
}

#[tokio::test]
async fn node_watcher_with_a_field_selector_sees_only_its_node() {
    let server = ApiServer::start().await;
    let client = client(&server);
    server.apply(&node("node-1"));
    server.apply(&node("node-2"));
    let config = watcher::Config::default().fields("metadata.name=node-1");
    let mut events = watcher::watcher(Api::<Node>::all(client.clone()), config).default_backoff().boxed();
    let mut mirror = Mirror::new();
    mirror.sync_until("initial list", &mut events, |m| m.inits == 1).await;
    assert_eq!(mirror.objects.keys().collect::<Vec<_>>(), ["/node-1"]);

    let mut labelled = node("node-2");
    labelled.metadata.labels = labels(&[("role", "other")]);
    server.apply(&labelled);
    assert!(server.delete::<Node>(None, "node-2"));
    let mut updated = node("node-1");
    updated.metadata.labels = labels(&[("role", "mine")]);
    let rv = server.apply(&updated);
    match next("node-1 update", &mut events).await {
        Ok(Event::Apply(n)) => {
            assert_eq!((n.name_any(), n.resource_version()), ("node-1".into(), Some(rv)));
            assert_eq!(n.labels().get("role").map(String::as_str), Some("mine"));
        }
        other => panic!("expected Apply(node-1), got {other:?}"),
    }
    assert!(server.delete::<Node>(None, "node-1"));
    assert!(matches!(next("node-1 delete", &mut events).await, Ok(Event::Delete(n)) if n.name_any() == "node-1"));

    let nodes = Api::<Node>::all(client);
    server.apply(&node("node-3"));
    assert_eq!(nodes.get("node-3").await.unwrap().name_any(), "node-3");
    assert!(nodes.get_opt("node-1").await.unwrap().is_none());
    assert_eq!(server.objects::<Node>().len(), 1);
}

#[tokio::test]
async fn endpointslices_are_namespaced_and_label_selected() {
    let server = ApiServer::start().await;
    let client = client(&server);
    server.apply(&slice("shop", "web-1", "web", &["10.0.0.1"]));
    server.apply(&slice("shop", "db-1", "db", &["10.0.0.2"]));
    server.apply(&slice("other", "web-1", "web", &["10.0.0.3"]));
    let config = watcher::Config::default().labels("kubernetes.io/service-name=web");
    let api = Api::<EndpointSlice>::namespaced(client.clone(), "shop");
    let mut events = watcher::watcher(api.clone(), config).default_backoff().boxed();
    let mut mirror = Mirror::new();
    mirror.sync_until("initial list", &mut events, |m| m.inits == 1).await;
    assert_eq!(mirror.objects.keys().collect::<Vec<_>>(), ["shop/web-1"]);

    // A slice relabelled into the selection is ADDED, out of it DELETED.
    server.apply(&slice("shop", "db-1", "web", &["10.0.0.2"]));
    mirror.sync_until("relabel in", &mut events, |m| m.objects.len() == 2).await;
    server.apply(&slice("shop", "web-1", "gone", &["10.0.0.1"]));
    mirror.sync_until("relabel out", &mut events, |m| m.objects.len() == 1).await;
    let remaining = &mirror.objects["shop/db-1"];
    assert_eq!(remaining.endpoints[0].addresses, ["10.0.0.2"]);
    assert_eq!(api.get("web-1").await.unwrap().labels()["kubernetes.io/service-name"], "gone");
    assert_eq!(server.objects::<EndpointSlice>().len(), 3);
}

#[tokio::test]
async fn outages_fail_requests_and_watchers_recover() {
    let server = ApiServer::start().await;
    let client = client(&server);
    server.apply(&service("default", "a", "10.96.0.1", 80, "a"));
    let mut events = service_watcher(client.clone());
    let mut mirror = Mirror::new();
    mirror.sync_until("watch open", &mut events, |_| server.watch_count::<Service>() == 1).await;
    assert_eq!(mirror.inits, 1);

    server.set_available(false);
    let api = Api::<Service>::all(client.clone());
    let failed = bounded("list during outage", api.list(&ListParams::default())).await;
    assert!(failed.is_err(), "a list during the outage succeeded: {failed:?}");
    server.apply(&service("default", "b", "10.96.0.2", 81, "b"));
    mirror.sync_until("watch errors", &mut events, |m| !m.errors.is_empty()).await;

    let requests = server.request_count();
    server.set_available(true);
    mirror.sync_until("recovery", &mut events, |m| m.objects.len() == 2).await;
    assert!(server.request_count() > requests);
    assert_eq!(ports(&mirror), expect_ports(&[("default/a", 80), ("default/b", 81)]));
    // The watch resumed from its resourceVersion: history replay, no relist.
    assert_eq!(server.list_count::<Service>(), 1);

    // Injected error statuses, with kube's own retries off.
    let mut config = Config::new(server.url().parse().unwrap());
    config.default_retry = false;
    let no_retry = Api::<Service>::all(Client::try_from(config).unwrap());
    server.set_fail_status(Some(503));
    match bounded("list with 503", no_retry.list(&ListParams::default())).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 503),
        other => panic!("expected a 503, got {other:?}"),
    }
    server.set_fail_status(None);
    assert_eq!(no_retry.list(&ListParams::default()).await.unwrap().items.len(), 2);
}

#[tokio::test]
async fn stalled_watches_are_silent_until_resumed() {
    let server = ApiServer::start().await;
    server.set_bookmark_interval(Duration::from_millis(50));
    let client = client(&server);
    let rv = server.apply(&service("default", "a", "10.96.0.1", 80, "a"));
    let api = Api::<Service>::all(client);
    let mut raw = api.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    assert!(matches!(next("bookmark", &mut raw).await, Ok(WatchEvent::Bookmark(_))));

    server.set_stalled::<Service>(true);
    let rv2 = server.apply(&service("default", "b", "10.96.0.2", 81, "b"));
    // A watch of another kind is not stalled.
    let mut nodes =
        Api::<Node>::all(api.clone().into_client()).watch(&WatchParams::default(), &rv2).await.unwrap().boxed();
    assert!(matches!(next("node bookmark", &mut nodes).await, Ok(WatchEvent::Bookmark(_))));
    let quiet = tokio::time::timeout(Duration::from_millis(500), raw.next()).await;
    assert!(quiet.is_err(), "a stalled watch sent {quiet:?}");

    server.set_stalled::<Service>(false);
    loop {
        match next("resumed", &mut raw).await.unwrap() {
            WatchEvent::Added(s) => {
                break assert_eq!((s.name_any(), s.resource_version()), ("b".into(), Some(rv2)));
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn malformed_objects_are_served_as_stored() {
    let server = ApiServer::start().await;
    let client = client(&server);
    let rv = server.apply_raw(
        "services",
        json!({"metadata": {"name": "bad", "namespace": "default"},
               "spec": {"clusterIP": "not-an-ip", "ports": [{"port": 70000, "protocol": "TCP"}]}}),
    );
    let list = Api::<Service>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    let bad = &list.items[0];
    let spec = bad.spec.as_ref().unwrap();
    assert_eq!((spec.cluster_ip.as_deref(), port(bad)), (Some("not-an-ip"), 70000));
    assert_eq!(bad.resource_version(), Some(rv));
    assert!(bad.uid().is_some());

    // Not even decodable as a typed Service: the typed list fails, a dynamic one sees the raw value.
    server.apply_raw("Service", json!({"metadata": {"name": "worse"}, "spec": {"ports": [{"port": "eighty"}]}}));
    let typed = Api::<Service>::all(client.clone()).list(&ListParams::default()).await;
    assert!(typed.is_err(), "a non-numeric port decoded: {typed:?}");
    let resource = ApiResource::erase::<Service>(&());
    let dynamic = Api::<DynamicObject>::all_with(client, &resource).list(&ListParams::default()).await.unwrap();
    let worse = dynamic.items.iter().find(|o| o.name_any() == "worse").expect("worse listed");
    assert_eq!(worse.data["spec"]["ports"][0]["port"], "eighty");
    assert_eq!(worse.namespace().as_deref(), Some("default"));
    assert_eq!(server.objects::<Service>().len(), 2);
}

#[tokio::test]
async fn dropping_the_server_stops_it() {
    let server = ApiServer::start().await;
    let rv = server.apply(&node("node-1"));
    let api = Api::<Node>::all(client(&server));
    let mut watch = api.watch(&WatchParams::default().disable_bookmarks(), &rv).await.unwrap().boxed();
    assert_eq!(api.list(&ListParams::default()).await.unwrap().items.len(), 1);

    drop(server);
    // The open watch ends (cleanly or with an error) and new requests fail.
    if let Some(Ok(event)) = bounded("watch end", watch.next()).await {
        panic!("unexpected {event:?}");
    }
    assert!(bounded("list after drop", api.list(&ListParams::default())).await.is_err());
}

/// `svc-00` … : names that sort as they are numbered.
fn numbered(i: usize) -> Service {
    service("default", &format!("svc-{i:02}"), &format!("10.96.1.{}", i + 1), 80, "paged")
}

/// Lists Services `limit` at a time, following `metadata.continue`; returns every page.
async fn pages(api: &Api<Service>, limit: u32, mut between: impl FnMut(usize)) -> Vec<kube::core::ObjectList<Service>> {
    let mut pages = Vec::new();
    let mut token = None;
    loop {
        let mut params = ListParams::default().limit(limit);
        params.continue_token = token;
        let page = bounded("a page", api.list(&params)).await.expect("a page of services");
        token = page.metadata.continue_.clone().filter(|t| !t.is_empty());
        pages.push(page);
        between(pages.len());
        if token.is_none() || pages.len() > 100 {
            return pages;
        }
    }
}

#[tokio::test]
async fn a_paged_list_returns_every_object_once_as_of_its_first_page() {
    let server = ApiServer::start().await;
    for i in 0..25 {
        server.apply(&numbered(i));
    }
    let api = Api::<Service>::all(client(&server));
    // After the first page, objects not yet served change: one is modified, one deleted, one
    // added. The list must still show the 25 as they were when it started.
    let pages = pages(&api, 7, |served| {
        if served == 1 {
            server.apply(&service("default", "svc-20", "10.96.1.21", 9090, "paged"));
            assert!(server.delete::<Service>(None, "svc-21"));
            server.apply(&numbered(30));
        }
    })
    .await;

    let sizes: Vec<usize> = pages.iter().map(|p| p.items.len()).collect();
    assert_eq!(sizes, [7, 7, 7, 4]);
    let remaining: Vec<Option<i64>> = pages.iter().map(|p| p.metadata.remaining_item_count).collect();
    assert_eq!(remaining, [Some(18), Some(11), Some(4), None]);
    let versions: Vec<Option<String>> = pages.iter().map(|p| p.metadata.resource_version.clone()).collect();
    assert!(versions.iter().all(|v| *v == versions[0]), "one resourceVersion for every page: {versions:?}");
    let listed: Vec<(String, i32)> = pages.iter().flat_map(|p| &p.items).map(|s| (key(s), port(s))).collect();
    let expected: Vec<(String, i32)> = (0..25).map(|i| (format!("default/svc-{i:02}"), 80)).collect();
    assert_eq!(listed, expected);

    // A watch from the list's resourceVersion sees exactly the changes made after it.
    let rv = versions[0].clone().expect("the list's resourceVersion");
    let mut watch = bounded("watch", api.watch(&WatchParams::default(), &rv)).await.expect("watch").boxed();
    let mut seen = Vec::new();
    for _ in 0..3 {
        match next("a change after the list", &mut watch).await.expect("a watch event") {
            WatchEvent::Added(s) => seen.push(("ADDED", key(&s), port(&s))),
            WatchEvent::Modified(s) => seen.push(("MODIFIED", key(&s), port(&s))),
            WatchEvent::Deleted(s) => seen.push(("DELETED", key(&s), port(&s))),
            other => panic!("unexpected watch event {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            ("MODIFIED", "default/svc-20".to_owned(), 9090),
            ("DELETED", "default/svc-21".to_owned(), 80),
            ("ADDED", "default/svc-30".to_owned(), 80),
        ]
    );
}

#[tokio::test]
async fn a_continue_token_older_than_a_compaction_is_gone() {
    let server = ApiServer::start().await;
    for i in 0..5 {
        server.apply(&numbered(i));
    }
    let api = Api::<Service>::all(client(&server));
    let first = api.list(&ListParams::default().limit(2)).await.expect("the first page");
    server.apply(&numbered(9));
    server.compact();
    let mut params = ListParams::default().limit(2);
    params.continue_token = first.metadata.continue_.clone();
    assert!(params.continue_token.is_some(), "the first page of 5 names a next one");
    match api.list(&params).await {
        Err(kube::Error::Api(status)) => assert_eq!((status.code, status.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410 Expired, got {other:?}"),
    }
    // A fresh list starts over and sees the current objects.
    let fresh = pages(&api, 2, |_| {}).await;
    assert_eq!(fresh.iter().map(|p| p.items.len()).sum::<usize>(), 6);
}

#[tokio::test]
async fn the_watcher_lists_in_pages_of_500_and_then_watches() {
    let server = ApiServer::start().await;
    for i in 0..1_200 {
        server.apply(&service("default", &format!("s{i:04}"), "10.96.0.1", 80, "many"));
    }
    let mut events = service_watcher(client(&server));
    let mut mirror = Mirror::new();
    mirror.sync_until("watch open", &mut events, |_| server.watch_count::<Service>() == 1).await;
    assert_eq!(mirror.objects.len(), 1_200);
    // kube-runtime's default page size is 500: three LIST requests for 1 200 objects.
    assert_eq!(server.list_count::<Service>(), 3);
    server.apply(&service("default", "s1200", "10.96.0.2", 81, "many"));
    mirror.sync_until("apply after the paged list", &mut events, |m| m.objects.contains_key("default/s1200")).await;
    assert_eq!(mirror.objects.len(), 1_201);
}

/// The agent's own watchers (`ApiService`, `ApiSlice`: decoded straight into what the agent
/// keeps) list in pages and then watch, and keep exactly what the API's types would have kept.
#[tokio::test]
async fn the_agents_compact_types_list_in_pages_and_watch() {
    use proxy_agent::{
        model::Slice,
        source::{
            Keep,
            wire::{ApiService, ApiSlice},
        },
    };

    let server = ApiServer::start().await;
    for i in 0..1_100 {
        let mut svc = service("default", &format!("s{i:04}"), "10.96.0.1", 80, "many");
        svc.metadata.annotations = labels(&[("kubectl.kubernetes.io/last-applied-configuration", "{}")]);
        server.apply(&svc);
        server.apply(&slice("default", &format!("s{i:04}-a"), &format!("s{i:04}"), &["10.0.0.1", "10.0.0.2"]));
    }
    let client = client(&server);
    let config = watcher::Config::default;
    let mut services = watcher::watcher(Api::<ApiService>::all(client.clone()), config()).default_backoff().boxed();
    let mut slices = watcher::watcher(Api::<ApiSlice>::all(client), config()).default_backoff().boxed();
    let mut service_mirror = Mirror::new();
    let mut slice_mirror = Mirror::new();
    service_mirror.sync_until("services listed", &mut services, |m| m.inits == 1).await;
    slice_mirror.sync_until("slices listed", &mut slices, |m| m.inits == 1).await;
    // Pages of 500, as kube-runtime's watcher asks: three LIST requests per kind.
    assert_eq!((server.list_count::<Service>(), server.list_count::<EndpointSlice>()), (3, 3));
    assert_eq!((service_mirror.objects.len(), slice_mirror.objects.len()), (1_100, 1_100));

    // What the API's types followed by `Keep` make of the stored objects.
    let kept_services: Vec<Service> = server
        .objects::<Service>()
        .into_iter()
        .map(|o| serde_json::from_value::<Service>(o).expect("a stored Service").keep())
        .collect();
    let kept_slices: Vec<Slice> = server
        .objects::<EndpointSlice>()
        .into_iter()
        .map(|o| serde_json::from_value::<EndpointSlice>(o).expect("a stored slice").keep())
        .collect();
    let listed_services: Vec<Service> = service_mirror.objects.values().map(|s| s.clone().keep()).collect();
    let listed_slices: Vec<Slice> = slice_mirror.objects.values().map(|s| s.clone().keep()).collect();
    assert_eq!(listed_services, kept_services);
    assert_eq!(listed_slices, kept_slices);
    assert_eq!(listed_slices[7].endpoints.len(), 2, "the endpoints arrived");

    // A change after the list arrives through the watch, decoded the same way.
    server.apply(&slice("default", "s0007-a", "s0007", &["10.0.0.3"]));
    slice_mirror
        .sync_until("a watched change", &mut slices, |m| {
            m.objects["default/s0007-a"].slice.endpoints.first().and_then(|e| e.address.as_deref()) == Some("10.0.0.3")
        })
        .await;
    server.delete::<EndpointSlice>(Some("default"), "s0008-a");
    slice_mirror.sync_until("a watched delete", &mut slices, |m| !m.objects.contains_key("default/s0008-a")).await;
    assert!(slice_mirror.errors.is_empty() && service_mirror.errors.is_empty(), "{:?}", slice_mirror.errors);
}

/// A watch event names its type before its object, as the real API server writes it (a
/// client reading the object first must buffer it whole until it learns the type).
#[tokio::test]
async fn watch_events_name_their_type_first() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let server = ApiServer::start().await;
    server.apply(&service("default", "web", "10.96.0.1", 80, "web"));
    let address = server.url().trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.expect("connect to the test API server");
    let request = format!(
        "GET /api/v1/services?watch=true&resourceVersion=0&timeoutSeconds=1 HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send the watch request");
    let mut response = String::new();
    bounded("the watch ends after its timeout", stream.read_to_string(&mut response)).await.expect("read");
    assert!(response.contains(r#"{"type":"ADDED","object":{"#), "{response}");
}
