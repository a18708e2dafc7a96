//! Real external authorization servers for the ext_authz filter: a gRPC one
//! (`envoy.service.auth.v3.Authorization/Check`, on tonic) and an HTTP one
//! (on hyper). Both decide by the request's `x-authz` header:
//!
//! - `allow`: OK, adding `x-user: alice` and `x-authz-seen` (what the
//!   server was told: method, path, host, header names, context
//!   extensions, and the gRPC call's own `:authority`) for the upstream, and `x-authz-response: ok` for the client;
//! - `deny` (or no header): 403 with body `denied by authz` and
//!   `x-deny-reason: policy`;
//! - `unauthorized`: 401 with `www-authenticate: Bearer`;
//! - `error`: a gRPC INTERNAL status, or an HTTP 500;
//! - `slow`: answers after 2 s (longer than the tests' timeouts);
//! - `flaky` (HTTP): a 503 the first time it sees the request's
//!   `x-request-id`, then as `allow` (a retried check passes); the gRPC
//!   server takes it as `allow`, and fails `flaky-grpc` once with
//!   UNAVAILABLE the same way.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::r#type::v3 as types;
use legate_proto::envoy_types::pb::envoy::service::auth::v3 as auth;
use legate_proto::envoy_types::pb::google::rpc;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

/// A running server; stopped when dropped.
pub struct Authz {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Authz {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The header names the server reports, sorted, without the ones whose
/// presence depends on the client (`content-length` of an empty body).
fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let mut v: Vec<&str> = it.filter(|n| *n != "content-length").collect();
    v.sort_unstable();
    v.dedup();
    v.join(",")
}

struct Grpc;

fn header(key: &str, value: &str) -> core::HeaderValueOption {
    core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn denied(code: types::StatusCode, extra: (&str, &str)) -> auth::CheckResponse {
    auth::CheckResponse {
        status: Some(rpc::Status {
            code: 7,
            ..Default::default()
        }),
        http_response: Some(auth::check_response::HttpResponse::DeniedResponse(
            auth::DeniedHttpResponse {
                status: Some(types::HttpStatus { code: code as i32 }),
                headers: vec![header(extra.0, extra.1)],
                body: "denied by authz".into(),
            },
        )),
        ..Default::default()
    }
}

/// The route metadata the check carried (` route-md=ns:{k=v,...};...`,
/// sorted), or nothing when it carried none.
fn route_metadata(
    md: Option<&legate_proto::envoy_types::pb::envoy::config::core::v3::Metadata>,
) -> String {
    let Some(md) = md else {
        return String::new();
    };
    let mut parts: Vec<String> = md
        .filter_metadata
        .iter()
        .map(|(ns, st)| {
            let mut fields: Vec<String> = st
                .fields
                .iter()
                .map(|(k, v)| format!("{k}={}", value_text(v)))
                .collect();
            fields.sort();
            format!("{ns}:{{{}}}", fields.join(","))
        })
        .collect();
    parts.extend(
        md.typed_filter_metadata
            .iter()
            .map(|(ns, a)| format!("{ns}:typed:{}", a.type_url)),
    );
    parts.sort();
    format!(" route-md={}", parts.join(";"))
}

/// A protobuf `Value` as text, struct fields sorted (so two servers'
/// reports compare equal whatever their map order).
fn value_text(v: &legate_proto::envoy_types::pb::google::protobuf::Value) -> String {
    use legate_proto::envoy_types::pb::google::protobuf::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => format!("{s:?}"),
        Some(Kind::NumberValue(n)) => n.to_string(),
        Some(Kind::BoolValue(b)) => b.to_string(),
        Some(Kind::NullValue(_)) | None => "null".into(),
        Some(Kind::ListValue(l)) => format!(
            "[{}]",
            l.values
                .iter()
                .map(value_text)
                .collect::<Vec<_>>()
                .join(",")
        ),
        Some(Kind::StructValue(st)) => {
            let mut f: Vec<String> = st
                .fields
                .iter()
                .map(|(k, v)| format!("{k}:{}", value_text(v)))
                .collect();
            f.sort();
            format!("{{{}}}", f.join(","))
        }
    }
}

#[tonic::async_trait]
impl auth::authorization_server::Authorization for Grpc {
    async fn check(
        &self,
        request: tonic::Request<auth::CheckRequest>,
    ) -> Result<tonic::Response<auth::CheckResponse>, tonic::Status> {
        let call_authority = request
            .metadata()
            .get("x-call-authority")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let req = request.into_inner();
        let attrs = req.attributes.unwrap_or_default();
        let http = attrs.request.and_then(|r| r.http).unwrap_or_default();
        let verdict = http.headers.get("x-authz").cloned().unwrap_or_default();
        let mut ext: Vec<String> = attrs
            .context_extensions
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        ext.sort();
        let route_md = route_metadata(attrs.route_metadata_context.as_ref());
        // The body, when the check carries one (with_request_body).
        let body = if http.body.is_empty() && http.raw_body.is_empty() {
            String::new()
        } else {
            format!(
                " body={:?} raw-body={:?} size={} partial={}",
                http.body,
                String::from_utf8_lossy(&http.raw_body),
                http.size,
                http.headers
                    .get("x-envoy-auth-partial-body")
                    .map_or("-", String::as_str)
            )
        };
        let seen = format!(
            "{} {} host={} scheme={} protocol={} headers={} ext={} call-authority={}{}{body}",
            http.method,
            http.path,
            http.host,
            http.scheme,
            http.protocol,
            names(http.headers.keys().map(String::as_str)),
            ext.join(";"),
            call_authority,
            route_md
        );
        let id = http.headers.get("x-request-id").map(String::as_str);
        let verdict = match verdict.as_str() {
            "flaky-grpc" if first_check(id) => {
                return Err(tonic::Status::unavailable("authz starting"))
            }
            "flaky-grpc" => "allow".to_string(),
            _ => verdict,
        };
        let resp = match verdict.as_str() {
            // `flaky` is the HTTP server's; the gRPC one lets it through.
            "allow" | "flaky" => auth::CheckResponse {
                status: Some(rpc::Status::default()),
                http_response: Some(auth::check_response::HttpResponse::OkResponse(
                    auth::OkHttpResponse {
                        headers: vec![header("x-user", "alice"), header("x-authz-seen", &seen)],
                        headers_to_remove: vec!["x-remove-me".into()],
                        response_headers_to_add: vec![header("x-authz-response", "ok")],
                        ..Default::default()
                    },
                )),
                ..Default::default()
            },
            "unauthorized" => denied(
                types::StatusCode::Unauthorized,
                ("www-authenticate", "Bearer"),
            ),
            "error" => return Err(tonic::Status::internal("authz failed")),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                denied(types::StatusCode::Forbidden, ("x-deny-reason", "slow"))
            }
            _ => denied(types::StatusCode::Forbidden, ("x-deny-reason", "policy")),
        };
        Ok(tonic::Response::new(resp))
    }
}

/// Starts the gRPC server (h2c) on `addr`.
pub async fn start_grpc(addr: SocketAddr) -> anyhow::Result<Authz> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let addr = l.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
    let task = tokio::spawn(async move {
        // The call's :authority is copied into its metadata, so the
        // check can report it (tonic hides the URI from services).
        let authority = tower::util::MapRequestLayer::new(|mut req: http::Request<_>| {
            if let Some(v) = req
                .uri()
                .authority()
                .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert("x-call-authority", v);
            }
            req
        });
        let _ = tonic::transport::Server::builder()
            .layer(authority)
            .add_service(auth::authorization_server::AuthorizationServer::new(Grpc))
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(Authz { addr, task })
}

/// Whether this is the first check of the request with this id (both
/// servers' `flaky` verdicts fail it once).
fn first_check(id: Option<&str>) -> bool {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let id = id.unwrap_or("").to_string();
    let first = !seen.contains(&id);
    seen.push(id);
    first
}

async fn http_check(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let verdict = req
        .headers()
        .get("x-authz")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let head = format!(
        "{} {} headers={}",
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str()),
        names(req.headers().keys().map(|k| k.as_str()))
    );
    let partial = req
        .headers()
        .get("x-envoy-auth-partial-body")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // The body, when the check carries one (with_request_body).
    let seen = if body.is_empty() {
        head
    } else {
        format!(
            "{head} body={:?} partial={}",
            String::from_utf8_lossy(&body),
            partial.as_deref().unwrap_or("-")
        )
    };
    let reply = |status: u16, body: &'static str| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let flaky_first = verdict == "flaky" && first_check(request_id.as_deref());
    let verdict = if verdict == "flaky" && !flaky_first {
        "allow".to_string()
    } else {
        verdict
    };
    let mut r = match verdict.as_str() {
        "flaky" => reply(503, "authz unavailable"),
        "allow" => {
            let mut r = reply(200, "");
            let h = r.headers_mut();
            h.insert("x-user", "alice".parse().unwrap());
            h.insert("x-authz-seen", seen.parse().unwrap());
            h.insert("x-authz-response", "ok".parse().unwrap());
            r
        }
        "unauthorized" => {
            let mut r = reply(401, "denied by authz");
            r.headers_mut()
                .insert("www-authenticate", "Bearer".parse().unwrap());
            r
        }
        "error" => reply(500, "authz failed"),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            reply(403, "denied by authz")
        }
        _ => {
            let mut r = reply(403, "denied by authz");
            r.headers_mut()
                .insert("x-deny-reason", "policy".parse().unwrap());
            r
        }
    };
    r.headers_mut()
        .insert("x-authz-server", "http".parse().unwrap());
    Ok(r)
}

/// Starts the HTTP server (HTTP/1.1 and h2c) on `addr`.
pub async fn start_http(addr: SocketAddr) -> anyhow::Result<Authz> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), hyper::service::service_fn(http_check))
                    .await;
            });
        }
    });
    Ok(Authz { addr, task })
}
