//! A minimal HTTP/1.1 server on hyper: GET (and HEAD) routes answered by a blocking handler,
//! which runs on tokio's blocking pool because it asks the kernel.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// A response: status, content type and body.
pub type Reply = Response<Full<Bytes>>;

/// Answers a GET for a path, or `None` for an unknown path.
pub type Handler = Arc<dyn Fn(&str) -> Option<Reply> + Send + Sync>;

/// A response with `status`, `content_type` and `body`.
pub fn reply(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    response
}

fn answer(handler: &Handler, method: &Method, path: &str) -> Reply {
    if method != Method::GET && method != Method::HEAD {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n".into());
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    handler(path).unwrap_or_else(|| reply(StatusCode::NOT_FOUND, "text/plain", format!("{path}: not found\n")))
}

/// Serves `listener` until the task is dropped; `name` names the server in log lines. Never
/// fails: a failed accept (out of file descriptors) is logged and retried.
pub async fn serve(listener: TcpListener, name: &'static str, handler: Handler) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(server = name, %error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let method = request.method().clone();
                    let path = request.uri().path().to_owned();
                    let response =
                        tokio::task::spawn_blocking(move || answer(&handler, &method, &path)).await.unwrap_or_else(
                            |_| reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "internal error\n".into()),
                        );
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                debug!(server = name, %peer, %error, "connection ended with an error");
            }
        });
    }
}
