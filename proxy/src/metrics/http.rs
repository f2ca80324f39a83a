//! The monitoring endpoints over HTTP/1 (hyper): `GET /metrics`,
//! `GET /health` (the process serves) and `GET /ready` (every shard has a
//! reachable primary; else 503 with a JSON body naming what is missing).

use std::convert::Infallible;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::Live;

/// The Prometheus text exposition format's content type.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long one HTTP connection may stay open (a scraper reconnects).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves the endpoints until the task is aborted (the proxy stops).
pub async fn serve(listener: TcpListener, live: Weak<Live>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                crate::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let live = live.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(req.method(), req.uri().path(), live.upgrade());
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            if let Ok(Err(e)) = crate::timer::timeout(CONNECTION_LIFETIME, conn).await {
                tracing::debug!(error = %e, "metrics: connection ended");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The answer to one request (`live` is gone once the proxy stops).
fn respond(method: &Method, path: &str, live: Option<Arc<Live>>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    const JSON: &str = "application/json";
    if method != Method::GET && method != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let Some(live) = live else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "shutting down\n".into(),
        );
    };
    let shared = live.current();
    match path {
        "/metrics" => reply(StatusCode::OK, METRICS_TYPE, super::render(&shared)),
        "/health" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/ready" => match super::readiness(&shared) {
            Ok(()) => reply(
                StatusCode::OK,
                JSON,
                serde_json::json!({ "ready": true }).to_string(),
            ),
            Err(missing) => {
                let shards: Vec<_> = missing
                    .into_iter()
                    .map(|(shard, problem)| serde_json::json!({ "shard": shard, "problem": problem }))
                    .collect();
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    JSON,
                    serde_json::json!({ "ready": false, "shards_without_primary": shards })
                        .to_string(),
                )
            }
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: the endpoints are /metrics, /health and /ready\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_other_than_get_and_head_are_refused_and_a_stopping_proxy_is_unavailable() {
        let r = respond(&Method::POST, "/metrics", None);
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "GET, HEAD");
        let r = respond(&Method::GET, "/metrics", None);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
