//! `svidcar inject --webhook`: the injection served as a Kubernetes mutating admission webhook
//! over HTTPS. `POST` an `admission.k8s.io/v1` `AdmissionReview`; the answer echoes the request
//! `uid`, is always `allowed: true` for objects it can read (with a base64 `JSONPatch` when
//! something is injected), and `allowed: false` with the reason for an invalid annotation.
//! `GET /healthz` answers `ok`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{plan, InjectConfig, Plan};

/// Largest AdmissionReview accepted (the API server caps objects at about 3 MiB).
const MAX_BODY: usize = 8 * 1024 * 1024;

/// Why the webhook could not start, or a review could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The certificate or key file could not be read or used.
    #[error("TLS certificate/key {path}: {reason}")]
    Tls {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The request body is not an `admission.k8s.io/v1` AdmissionReview with a request.
    #[error("not an admission.k8s.io/v1 AdmissionReview request: {0}")]
    BadReview(String),
}

/// Loads a PEM certificate chain and private key into a TLS 1.2/1.3 server config.
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, WebhookError> {
    let tls_err = |path: &Path, reason: String| WebhookError::Tls {
        path: path.display().to_string(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(tls_err(cert, "no CERTIFICATE block".to_string()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| tls_err(key, e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Answers one AdmissionReview (the JSON body of the request) with the response review.
pub fn review(body: &[u8], config: &InjectConfig) -> Result<Value, WebhookError> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::BadReview(e.to_string()))?;
    if review.get("apiVersion").and_then(Value::as_str) != Some("admission.k8s.io/v1")
        || review.get("kind").and_then(Value::as_str) != Some("AdmissionReview")
    {
        return Err(WebhookError::BadReview(
            "apiVersion must be admission.k8s.io/v1 and kind AdmissionReview".to_string(),
        ));
    }
    let request = review
        .get("request")
        .ok_or_else(|| WebhookError::BadReview("no request".to_string()))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or_else(|| WebhookError::BadReview("request.uid is missing".to_string()))?;
    let kind = request
        .pointer("/kind/kind")
        .and_then(Value::as_str)
        .unwrap_or("");
    let operation = request
        .get("operation")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut response = json!({"uid": uid, "allowed": true});
    let object = request.get("object").filter(|o| o.is_object());
    match object {
        Some(object) if operation == "CREATE" => match plan(object, kind, config) {
            Ok(Plan::Patch(ops)) => {
                let patch =
                    serde_json::to_vec(&ops).map_err(|e| WebhookError::BadReview(e.to_string()))?;
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
                tracing::info!(uid, kind, "injected");
            }
            Ok(Plan::Skip(reason)) => tracing::info!(uid, kind, reason, "not injected"),
            Err(e) => {
                tracing::warn!(uid, kind, error = %e, "refused");
                response["allowed"] = json!(false);
                response["status"] = json!({"code": 400, "message": e.to_string()});
            }
        },
        _ => tracing::debug!(uid, kind, operation, "nothing to inject"),
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

async fn handle(
    req: Request<Incoming>,
    config: Arc<InjectConfig>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.method() == Method::GET && req.uri().path() == "/healthz" {
        return Ok(text(StatusCode::OK, "ok\n".to_string()));
    }
    if req.method() != Method::POST {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview\n".into(),
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!("cannot read body: {e}\n"),
            ))
        }
    };
    match review(&body, &config) {
        Ok(answer) => {
            let mut resp = text(StatusCode::OK, answer.to_string());
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
        Err(e) => Ok(text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
    }
}

/// Binds `addr` and serves the webhook until the process ends.
pub async fn serve(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    config: InjectConfig,
) -> Result<(), WebhookError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WebhookError::Listen { addr, source })?;
    serve_listener(listener, tls, config).await
}

/// Serves the webhook on an already bound listener.
pub async fn serve_listener(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    config: InjectConfig,
) -> Result<(), WebhookError> {
    let acceptor = TlsAcceptor::from(tls);
    let config = Arc::new(config);
    if let Ok(local) = listener.local_addr() {
        tracing::info!(%local, "injection webhook listening (HTTPS)");
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let tls_stream = match acceptor.accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| handle(req, config.clone()));
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(tls_stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
