//! The HTTP side: routing, LIST, GET and the start of a WATCH, and Kubernetes JSON responses.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::selector::Selector;
use super::watch::{self, WatchStream};
use super::{Body, BodyError, Control, Filter, Kind, Shared};

/// Accepts connections until aborted; dropping the `JoinSet` then stops every connection too.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while connections.try_join_next().is_some() {}
        if !shared.control().available {
            continue; // dropping the stream closes the connection at once
        }
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&shared), req));
            _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// A parsed request path.
enum Route<'a> {
    Version,
    Api,
    Apis,
    Collection { kind: Kind, namespace: Option<&'a str> },
    Object { kind: Kind, namespace: Option<&'a str>, name: &'a str },
}

fn route<'a>(segments: &[&'a str]) -> Option<Route<'a>> {
    let (group_version, rest) = match segments {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::Api),
        ["apis"] => return Some(Route::Apis),
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(*ns), rest),
        _ => (None, rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::ALL.into_iter().find(|k| k.plural() == plural && k.api_version() == group_version)?;
    match (kind.namespaced(), namespace, name) {
        (false, Some(_), _) => return None,   // cluster-scoped kinds have no namespace
        (true, None, Some(_)) => return None, // a namespaced object is read within its namespace
        _ => {}
    }
    Some(match name {
        Some(name) => Route::Object { kind, namespace, name },
        None => Route::Collection { kind, namespace },
    })
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, BodyError> {
    let control = shared.control();
    shared.store().requests += 1;
    if !control.available {
        return Err("test API server is down".into()); // hyper closes the connection unanswered
    }
    if let Some(code) = control.fail_status {
        return Ok(status(code, "InternalError", "injected failure by the test API server"));
    }
    if req.method() == Method::PATCH && req.uri().path().starts_with("/api/v1/nodes/") {
        return Ok(patch_node(&shared, req).await);
    }
    if req.method() == Method::POST || req.method() == Method::PATCH {
        return Ok(write_event(&shared, req).await);
    }
    if req.method() != Method::GET {
        return Ok(status(405, "MethodNotAllowed", "the test API server only serves GET, and writes Events"));
    }
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()).into_owned().collect();
    let segments: Vec<&str> = req.uri().path().split('/').filter(|s| !s.is_empty()).collect();
    Ok(match route(&segments) {
        None => status(404, "NotFound", "the server could not find the requested resource"),
        Some(Route::Version) => ok(json!({
            "major": "1", "minor": "34", "gitVersion": "v1.34.0-proxy-tests", "gitCommit": "",
            "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z", "goVersion": "go1.24",
            "compiler": "gc", "platform": "linux/amd64",
        })),
        Some(Route::Api) => ok(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})),
        Some(Route::Apis) => {
            let version = json!({"groupVersion": "discovery.k8s.io/v1", "version": "v1"});
            ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": "discovery.k8s.io", "versions": [version], "preferredVersion": version},
            ]}))
        }
        Some(Route::Object { kind, namespace, name }) => {
            let key = (kind, kind.namespace(namespace), name.to_owned());
            match shared.store().objects.get(&key) {
                Some(object) => ok(object.clone()),
                None => not_found(kind, name),
            }
        }
        Some(Route::Collection { kind, namespace }) => {
            let filter = match filter(kind, namespace, &query) {
                Ok(filter) => filter,
                Err(message) => return Ok(status(400, "BadRequest", &message)),
            };
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                start_watch(&shared, filter, &query, &control)
            } else {
                list(&shared, filter, &query)
            }
        }
    })
}

/// POST and PATCH (a JSON merge patch) of `events.k8s.io/v1` Events, what kube-runtime's event
/// `Recorder` sends: kept, in order, for tests to read. Nothing else can be written.
async fn write_event(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let create = req.method() == Method::POST;
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (namespace, name) = match segments[..] {
        ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"] if create => (ns, None),
        ["apis", "events.k8s.io", "v1", "namespaces", ns, "events", name] if !create => (ns, Some(name)),
        _ => return status(405, "MethodNotAllowed", "the test API server writes events.k8s.io/v1 Events only"),
    };
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return status(400, "BadRequest", &e.to_string()),
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    let mut store = shared.store();
    store.uids += 1;
    let n = store.uids;
    let object = match name {
        None => {
            let mut object = body;
            let meta = &mut object["metadata"];
            if meta["name"].as_str().is_none_or(str::is_empty) {
                meta["name"] = json!(format!("{}{n}", meta["generateName"].as_str().unwrap_or("event-")));
            }
            meta["namespace"] = json!(namespace);
            meta["uid"] = json!(format!("event-uid-{n}"));
            object
        }
        Some(name) => {
            let stored = store.posted_events.iter().rev().map(|(_, e)| e).find(|e| {
                e["metadata"]["name"].as_str() == Some(name) && e["metadata"]["namespace"].as_str() == Some(namespace)
            });
            let Some(mut object) = stored.cloned() else {
                return status(404, "NotFound", &format!("events \"{name}\" not found"));
            };
            merge(&mut object, body);
            object
        }
    };
    let mut object = object;
    object["metadata"]["resourceVersion"] = json!(n.to_string());
    store.posted_events.push((if create { "create" } else { "patch" }.to_owned(), object.clone()));
    let code = if create { StatusCode::CREATED } else { StatusCode::OK };
    json_response(code, full(serde_json::to_vec(&object).unwrap_or_default()))
}

/// PATCH (a JSON merge patch) of a Node, what the agent sends to announce direct server
/// return: applied to the stored Node (MODIFIED to watches), counted for tests to read.
async fn patch_node(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let name = req.uri().path().trim_start_matches("/api/v1/nodes/").to_owned();
    let merge_patch = req.headers().get("content-type").is_some_and(|t| t == "application/merge-patch+json");
    if !merge_patch || name.is_empty() || name.contains('/') {
        return status(415, "UnsupportedMediaType", "the test API server takes merge patches of Nodes only");
    }
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return status(400, "BadRequest", &e.to_string()),
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    let stored = shared.store().objects.get(&(Kind::Node, String::new(), name.clone())).cloned();
    let Some(mut object) = stored else {
        return not_found(Kind::Node, &name);
    };
    merge(&mut object, body);
    *shared.store().patches.entry(Kind::Node).or_default() += 1;
    shared.put(Kind::Node, object.clone());
    let stored = shared.store().objects.get(&(Kind::Node, String::new(), name)).cloned();
    json_response(StatusCode::OK, full(serde_json::to_vec(&stored.unwrap_or(object)).unwrap_or_default()))
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (key, value) in fields {
                match value {
                    Value::Null => _ = target.as_object_mut().map(|t| t.remove(&key)),
                    value => merge(&mut target[key.as_str()], value),
                }
            }
        }
        other => *target = other,
    }
}

fn filter(kind: Kind, namespace: Option<&str>, query: &HashMap<String, String>) -> Result<Filter, String> {
    let selector = |name| query.get(name).map(String::as_str).unwrap_or_default();
    Ok(Filter {
        kind,
        namespace: namespace.map(str::to_owned),
        labels: Selector::labels(selector("labelSelector"))?,
        fields: Selector::fields(selector("fieldSelector"))?,
    })
}

/// LIST, paged as the real API server pages it: at most `limit` items a page, then a
/// `metadata.continue` token and `remainingItemCount` (without selectors, as the real server
/// gives it). Every page of one list shows the objects as they were at the first page's
/// resourceVersion, however the store changed since (the changes after it are undone from the
/// history, as etcd reads at a revision); a token older than the last compaction gets
/// `410 Gone` with reason `Expired`, as from the real server.
fn list(shared: &Shared, filter: Filter, query: &HashMap<String, String>) -> Response<Body> {
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => None,
        Some(Ok(0)) => None, // the real server reads 0 as "no limit"
        Some(Ok(limit)) => Some(limit),
        Some(Err(_)) => return status(400, "BadRequest", "limit must be a non-negative integer"),
    };
    let token = match query.get("continue").filter(|t| !t.is_empty()).map(|t| Continue::decode(t)) {
        None => None,
        Some(Some(token)) => Some(token),
        Some(None) => return status(400, "BadRequest", "continue key is not valid: not a token of this server"),
    };
    let mut store = shared.store();
    *store.lists.entry(filter.kind).or_default() += 1;
    let snapshot = token.as_ref().map_or(store.rv, |t| t.rv);
    if snapshot < store.compacted {
        let message = format!(
            "The provided continue parameter is too old to display a consistent list result (resourceVersion \
             {snapshot}, compacted at {}). You can start a new list without the continue parameter.",
            store.compacted
        );
        return status(410, "Expired", &message);
    }
    let after = token.as_ref().map(|t| (t.namespace.clone(), t.name.clone()));
    let mut items = store.at(filter.kind, snapshot, after).filter(|(_, object)| filter.matches(object));
    let page: Vec<((String, String), &Value)> = items.by_ref().take(limit.unwrap_or(usize::MAX)).collect();
    let mut metadata = json!({"resourceVersion": snapshot.to_string()});
    if let Some(((namespace, name), _)) = page.last()
        && items.next().is_some()
    {
        let served = token.as_ref().map_or(0, |t| t.served) + page.len();
        // Counted once, on the first page (the snapshot does not change), so that paging
        // through N objects costs O(N), not O(N²).
        let total = token.as_ref().map_or_else(|| served + 1 + items.count(), |t| t.total);
        // The real server counts the rest only when no selector filters it.
        if filter.labels.is_empty() && filter.fields.is_empty() {
            metadata["remainingItemCount"] = json!(total - served);
        }
        let next = Continue { rv: snapshot, namespace: namespace.clone(), name: name.clone(), served, total };
        metadata["continue"] = json!(next.encode());
    }
    // Written straight from the stored objects, as the real server encodes from its cache: a
    // copy of the page as a value tree first cost more than the writing itself.
    let list = List {
        kind: format!("{}List", filter.kind.name()),
        api_version: filter.kind.api_version(),
        metadata,
        items: page.into_iter().map(|(_, object)| object).collect(),
    };
    json_response(StatusCode::OK, full(serde_json::to_vec(&list).expect("JSON values serialize")))
}

/// A LIST response.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct List<'a> {
    kind: String,
    api_version: &'static str,
    metadata: Value,
    items: Vec<&'a Value>,
}

/// Where the next page of a list starts: the list's resourceVersion and the last key served.
/// Opaque to clients (hex of JSON; the real server's is base64 of JSON).
#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    rv: u64,
    namespace: String,
    name: String,
    /// Items served so far and in the whole list, for `remainingItemCount`.
    served: usize,
    total: usize,
}

impl Continue {
    fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a continue token serializes");
        json.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn decode(token: &str) -> Option<Continue> {
        let bytes: Option<Vec<u8>> = (0..token.len())
            .step_by(2)
            .map(|i| token.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
            .collect();
        serde_json::from_slice(&bytes?).ok()
    }
}

/// WATCH: replays the history after `resourceVersion` (or, without one, or with `0` or
/// `sendInitialEvents=true`, sends the current objects as ADDED), then streams live changes.
fn start_watch(shared: &Shared, filter: Filter, query: &HashMap<String, String>, control: &Control) -> Response<Body> {
    let param = |name: &str| query.get(name).map(String::as_str);
    let initial_events = param("sendInitialEvents") == Some("true");
    let from = match param("resourceVersion").unwrap_or_default() {
        "" | "0" => None,
        rv => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return status(400, "BadRequest", &format!("invalid resource version: {rv}"));
            }
        },
    };
    let timeout = param("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800);
    let bookmarks = param("allowWatchBookmarks") == Some("true");

    let mut store = shared.store();
    *store.watches.entry(filter.kind).or_default() += 1;
    let mut backlog = VecDeque::new();
    match from {
        Some(rv) if rv < store.compacted && !initial_events => {
            let message = format!("too old resource version: {rv} ({})", store.compacted);
            return ok_lines([json!({"type": "ERROR", "object": status_json(410, "Expired", &message)})]);
        }
        Some(rv) if !initial_events => {
            let after = store.history.partition_point(|c| c.rv <= rv);
            backlog.extend(store.history[after..].iter().filter_map(|c| filter.event(c)));
        }
        _ => {
            let current = store.objects.iter().filter(|((kind, ..), o)| *kind == filter.kind && filter.matches(o));
            backlog.extend(current.map(|(_, object)| json!({"type": "ADDED", "object": object})));
            if initial_events {
                backlog.push_back(watch::bookmark(filter.kind, store.rv, true));
            }
        }
    }
    let stream = WatchStream {
        kind: filter.kind,
        filter,
        backlog,
        // Subscribing under the store lock: no change is missed or sent twice.
        events: shared.events.subscribe(),
        control: shared.control.subscribe(),
        generation: control.generation,
        progress: store.rv,
        bookmarks: if bookmarks { WatchStream::ticker(control.bookmark_interval) } else { None },
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
    };
    drop(store);
    let body = StreamBody::new(stream.into_body()).boxed();
    json_response(StatusCode::OK, body)
}

fn json_response(code: StatusCode, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("header"));
    response
}

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed()
}

fn ok(value: Value) -> Response<Body> {
    json_response(StatusCode::OK, full(serde_json::to_vec(&value).expect("JSON values serialize")))
}

/// A complete watch response of the given events.
fn ok_lines(events: impl IntoIterator<Item = Value>) -> Response<Body> {
    let mut body = Vec::new();
    for event in events {
        watch::write_line(&mut body, &event);
    }
    json_response(StatusCode::OK, full(body))
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = full(serde_json::to_vec(&status_json(code, reason, message)).expect("JSON values serialize"));
    json_response(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body)
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    let mut response = status_json(404, "NotFound", &format!("{} \"{name}\" not found", kind.plural()));
    response["details"] = json!({"name": name, "kind": kind.plural()});
    json_response(StatusCode::NOT_FOUND, full(serde_json::to_vec(&response).expect("JSON values serialize")))
}
