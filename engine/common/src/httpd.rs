//! A small HTTP/1.1 server on tokio + hyper, shared by the engine's ops port and the control
//! plane's service API: bodies are read whole (with a limit) and handlers are plain async
//! functions from request to response.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A request with its body read.
pub type Req = Request<Bytes>;
pub type Resp = Response<Full<Bytes>>;

/// Largest request body accepted (a bulk registry operation is the biggest legitimate one).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Serves `listener` forever, optionally over TLS; each request goes to `handler`.
pub async fn serve<H, F>(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, handler: H)
where
    H: Fn(Req) -> F + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let resp = match Limited::new(body, MAX_BODY).collect().await {
                        Ok(b) => handler(Request::from_parts(parts, b.to_bytes())).await,
                        Err(_) => text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"),
                    };
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let builder = hyper::server::conn::http1::Builder::new();
            let result = match tls {
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(s) => builder.serve_connection(TokioIo::new(s), service).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "https handshake failed");
                        return;
                    }
                },
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON response; a body that cannot be serialised is a 500, never an empty success.
pub fn json(status: StatusCode, body: &impl serde::Serialize) -> Resp {
    let bytes = match serde_json::to_vec(body) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot serialise a response body");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot serialise the response",
            );
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// A response whose body is JSON the caller already wrote.
pub fn json_raw(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

pub fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// The value of query parameter `name`, percent-decoded.
pub fn query_param(req: &Req, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Unserialisable;
    impl serde::Serialize for Unserialisable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no"))
        }
    }

    #[test]
    fn a_body_that_fails_to_serialise_is_a_500() {
        let r = json(StatusCode::OK, &Unserialisable);
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let ok = json(StatusCode::OK, &serde_json::json!({"a": 1}));
        assert_eq!(ok.status(), StatusCode::OK);
    }
}
