//! kube-proxy's service health servers: for every LoadBalancer with
//! `externalTrafficPolicy: Local` and a `healthCheckNodePort`, an HTTP server on that port of
//! every node address answering 200 when this node has ready local endpoints and 503 when it has
//! none (or only terminating ones), with kube-proxy's JSON body, so a cloud load balancer sends
//! traffic only to nodes that can serve it locally. Servers follow the services as they change.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use hyper::StatusCode;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::http;
use crate::model::HealthCheck;

/// The body kube-proxy's service health server answers.
fn body(check: &HealthCheck) -> String {
    serde_json::json!({
        "service": { "namespace": check.namespace, "name": check.name },
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string()
}

/// One served port: its server task and the answer it gives now.
struct Served {
    task: JoinHandle<()>,
    check: Arc<RwLock<HealthCheck>>,
}

/// Serves the health checks `checks` publishes until it closes.
pub async fn run(mut checks: watch::Receiver<BTreeMap<u16, HealthCheck>>) {
    let mut served: HashMap<u16, Served> = HashMap::new();
    loop {
        let wanted = checks.borrow_and_update().clone();
        served.retain(|port, s| {
            let keep = wanted.contains_key(port);
            if !keep {
                info!(port, "healthCheckNodePort released");
                s.task.abort();
            }
            keep
        });
        for (port, check) in wanted {
            if let Some(s) = served.get(&port) {
                *s.check.write().unwrap_or_else(|e| e.into_inner()) = check;
                continue;
            }
            let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            let listener = match TcpListener::bind(address).await {
                Ok(listener) => listener,
                Err(error) => {
                    warn!(%address, service = format!("{}/{}", check.namespace, check.name), %error, "cannot serve healthCheckNodePort");
                    continue;
                }
            };
            info!(port, service = format!("{}/{}", check.namespace, check.name), "serving healthCheckNodePort");
            let shared = Arc::new(RwLock::new(check));
            let answer = shared.clone();
            let handler: http::Handler = Arc::new(move |_path| {
                let check = answer.read().unwrap_or_else(|e| e.into_inner()).clone();
                let status = if check.local_endpoints > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                Some(http::reply(status, "application/json", body(&check)))
            });
            let task = tokio::spawn(http::serve(listener, "healthCheckNodePort", handler));
            served.insert(port, Served { task, check: shared });
        }
        if checks.changed().await.is_err() {
            break;
        }
    }
    for s in served.into_values() {
        s.task.abort();
    }
}
