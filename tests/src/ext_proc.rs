//! A real external processor for the ext_proc filter
//! (`envoy.service.ext_proc.v3.ExternalProcessor/Process`, on tonic). One
//! bidirectional stream per request; it decides by the request's `x-proc`
//! header (remembered for the response headers of the same stream):
//!
//! - absent or `continue`: CONTINUE, setting `x-proc-seen` (what it was
//!   sent: end of stream, header names, pseudo-headers, protocol config),
//!   appending `x-user: alice`, removing `x-remove-me`;
//! - `actions`: one header per append action, on headers the client sent
//!   (`x-a`, `x-d`) and did not (`x-b`, `x-c`), and one by `append: false`;
//! - `immediate`: an immediate 418 with `x-imm: yes`, a body and details;
//!   `immediate-nostatus`: one without a status;
//! - `error`: a gRPC INTERNAL status; `close`: the stream ends cleanly
//!   with no answer; `slow`: answers after 2 s;
//! - `route`: sets `x-route: b` and asks for the route cache cleared;
//! - `attrs`: sets `x-proc-attrs` to the attributes it was sent under
//!   `envoy.filters.http.ext_proc` (`name=value`, sorted, `; `-separated;
//!   `none` without any);
//! - `pseudo`: sets `:path` to `/rewritten`; `forbidden`: sets `host`,
//!   `:scheme` and `x-envoy-bad`; `badvalue`: a value with a newline;
//! - on the response headers: `x-proc-resp-seen` (header names and
//!   `:status`) and `x-resp-added`; and with `resp-immediate` an immediate
//!   503, `resp-error` an INTERNAL status, `resp-status` `:status: 202`,
//!   `resp-remove` removes `content-type`.

use legate_proto::envoy_types::pb::envoy::config::core::v3 as core;
use legate_proto::envoy_types::pb::envoy::r#type::v3 as types;
use legate_proto::envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::StreamExt;

/// A running processor; stopped when dropped.
pub struct Processor {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Processor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Service;

type Out = Result<ep::ProcessingResponse, tonic::Status>;

fn set(
    key: &str,
    value: &str,
    action: core::header_value_option::HeaderAppendAction,
) -> core::HeaderValueOption {
    core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: key.into(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    }
}

fn header_value(h: &core::HeaderValue) -> String {
    if h.raw_value.is_empty() {
        h.value.clone()
    } else {
        String::from_utf8_lossy(&h.raw_value).into_owned()
    }
}

/// What the processor was told in a headers message, as one line.
fn describe(h: &ep::HttpHeaders, req: &ep::ProcessingRequest) -> String {
    let headers = h.headers.as_ref().map_or(&[][..], |m| &m.headers[..]);
    let mut names: Vec<&str> = headers
        .iter()
        .map(|h| h.key.as_str())
        .filter(|k| !k.starts_with(':'))
        .collect();
    names.sort_unstable();
    let mut pseudo: Vec<String> = headers
        .iter()
        .filter(|h| h.key.starts_with(':'))
        .map(|h| format!("{}={}", h.key, header_value(h)))
        .collect();
    pseudo.sort();
    let raw = headers.iter().all(|h| h.value.is_empty());
    let config = req
        .protocol_config
        .as_ref()
        .map_or("none".to_string(), |c| {
            format!(
                "{}/{}/{}",
                c.request_body_mode,
                c.response_body_mode,
                c.send_body_without_waiting_for_header_response
            )
        });
    format!(
        "eos={} raw={} names={} {} config={} attrs={} md={}",
        h.end_of_stream,
        raw,
        names.join(","),
        pseudo.join(" "),
        config,
        req.attributes.len(),
        req.metadata_context.is_some(),
    )
}

fn headers_response(
    phase_request: bool,
    set_headers: Vec<core::HeaderValueOption>,
    remove: Vec<String>,
    clear_route_cache: bool,
) -> ep::ProcessingResponse {
    let r = ep::HeadersResponse {
        response: Some(ep::CommonResponse {
            header_mutation: Some(ep::HeaderMutation {
                set_headers,
                remove_headers: remove,
            }),
            clear_route_cache,
            ..Default::default()
        }),
    };
    use ep::processing_response::Response as R;
    ep::ProcessingResponse {
        response: Some(if phase_request {
            R::RequestHeaders(r)
        } else {
            R::ResponseHeaders(r)
        }),
        ..Default::default()
    }
}

fn immediate(status: Option<u32>, body: &str, details: &str) -> ep::ProcessingResponse {
    use core::header_value_option::HeaderAppendAction as A;
    ep::ProcessingResponse {
        response: Some(ep::processing_response::Response::ImmediateResponse(
            ep::ImmediateResponse {
                status: status.map(|c| types::HttpStatus { code: c as i32 }),
                headers: Some(ep::HeaderMutation {
                    set_headers: vec![set("x-imm", "yes", A::AppendIfExistsOrAdd)],
                    remove_headers: vec![],
                }),
                body: body.as_bytes().to_vec(),
                details: details.into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// The attributes a message carries, as `x-proc-attrs` shows them.
fn attributes(req: &ep::ProcessingRequest) -> String {
    use legate_proto::envoy_types::pb::google::protobuf::value::Kind;
    let Some(s) = req.attributes.get("envoy.filters.http.ext_proc") else {
        return "none".into();
    };
    let mut out: Vec<String> = s
        .fields
        .iter()
        .map(|(k, v)| {
            let v = match &v.kind {
                Some(Kind::StringValue(s)) => format!("{s:?}"),
                Some(Kind::NumberValue(n)) => format!("{n}"),
                Some(Kind::BoolValue(b)) => format!("{b}"),
                other => format!("{other:?}"),
            };
            format!("{k}={v}")
        })
        .collect();
    out.sort();
    out.join("; ")
}

/// The answer to the request headers: Ok(None) ends the stream cleanly.
async fn on_request_headers(
    cmd: &str,
    h: &ep::HttpHeaders,
    req: &ep::ProcessingRequest,
) -> Result<Option<ep::ProcessingResponse>, tonic::Status> {
    use core::header_value_option::HeaderAppendAction as A;
    let seen = describe(h, req);
    Ok(Some(match cmd {
        "immediate" => immediate(Some(418), "blocked by processor", "proc_said_no"),
        "immediate-nostatus" => immediate(None, "no status", ""),
        "error" => return Err(tonic::Status::internal("processor failed")),
        "close" => return Ok(None),
        "actions" => {
            let mut legacy = set("x-e", "legacy", A::AppendIfExistsOrAdd);
            // The deprecated field, which processors still send.
            #[allow(deprecated)]
            {
                legacy.append = Some(legate_proto::envoy_types::pb::google::protobuf::BoolValue {
                    value: false,
                });
            }
            headers_response(
                true,
                vec![
                    set("x-a", "new", A::AddIfAbsent),
                    set("x-b", "new", A::AddIfAbsent),
                    set("x-c", "new", A::OverwriteIfExists),
                    set("x-d", "new", A::OverwriteIfExists),
                    set("x-f", "new", A::OverwriteIfExistsOrAdd),
                    legacy,
                ],
                vec![],
                false,
            )
        }
        "attrs" => headers_response(
            true,
            vec![set(
                "x-proc-attrs",
                &attributes(req),
                A::OverwriteIfExistsOrAdd,
            )],
            vec![],
            false,
        ),
        "route" => headers_response(
            true,
            vec![set("x-route", "b", A::OverwriteIfExistsOrAdd)],
            vec![],
            true,
        ),
        "pseudo" => headers_response(
            true,
            vec![set(":path", "/rewritten", A::OverwriteIfExistsOrAdd)],
            vec![],
            false,
        ),
        "forbidden" => headers_response(
            true,
            vec![
                set("host", "evil.example", A::OverwriteIfExistsOrAdd),
                set(":scheme", "ftp", A::OverwriteIfExistsOrAdd),
                set("x-envoy-bad", "1", A::OverwriteIfExistsOrAdd),
                set("x-fine", "1", A::OverwriteIfExistsOrAdd),
            ],
            vec![":method".into(), "host".into()],
            false,
        ),
        "badvalue" => headers_response(
            true,
            vec![set("x-bad", "a\nb", A::OverwriteIfExistsOrAdd)],
            vec![],
            false,
        ),
        _ => {
            if cmd == "slow" {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            headers_response(
                true,
                vec![
                    set("x-proc-seen", &seen, A::OverwriteIfExistsOrAdd),
                    set("x-user", "alice", A::AppendIfExistsOrAdd),
                ],
                vec!["x-remove-me".into()],
                false,
            )
        }
    }))
}

fn on_response_headers(
    cmd: &str,
    h: &ep::HttpHeaders,
    req: &ep::ProcessingRequest,
) -> Result<ep::ProcessingResponse, tonic::Status> {
    use core::header_value_option::HeaderAppendAction as A;
    Ok(match cmd {
        "resp-immediate" => immediate(Some(503), "replaced by processor", "proc_resp"),
        "resp-error" => return Err(tonic::Status::internal("processor failed")),
        "resp-status" => headers_response(
            false,
            vec![set(":status", "202", A::OverwriteIfExistsOrAdd)],
            vec![],
            false,
        ),
        "resp-remove" => headers_response(false, vec![], vec!["content-type".into()], false),
        _ => headers_response(
            false,
            vec![
                set(
                    "x-proc-resp-seen",
                    &describe(h, req),
                    A::OverwriteIfExistsOrAdd,
                ),
                set("x-resp-added", "1", A::AppendIfExistsOrAdd),
            ],
            vec![],
            false,
        ),
    })
}

/// The answer to a buffered request body: `x-body-seen` (its length, end
/// of stream, the protocol config if this is the first message) always;
/// `body-replace` replaces it, `body-clear` clears it, `body-immediate`
/// answers 403.
fn on_request_body(
    cmd: &str,
    b: &ep::HttpBody,
    req: &ep::ProcessingRequest,
) -> ep::ProcessingResponse {
    use core::header_value_option::HeaderAppendAction as A;
    if cmd == "body-immediate" {
        return immediate(Some(403), "body refused", "proc_body");
    }
    let config = req
        .protocol_config
        .as_ref()
        .map_or("none".to_string(), |c| {
            format!("{}/{}", c.request_body_mode, c.response_body_mode)
        });
    let seen = format!("{} eos={} config={config}", b.body.len(), b.end_of_stream);
    use ep::body_mutation::Mutation as M;
    let mutation = match cmd {
        "body-replace" => Some(M::Body(
            [b"replaced:".as_slice(), b.body.as_slice()].concat(),
        )),
        "body-clear" => Some(M::ClearBody(true)),
        _ => None,
    };
    ep::ProcessingResponse {
        response: Some(ep::processing_response::Response::RequestBody(
            ep::BodyResponse {
                response: Some(ep::CommonResponse {
                    header_mutation: Some(ep::HeaderMutation {
                        set_headers: vec![set("x-body-seen", &seen, A::OverwriteIfExistsOrAdd)],
                        remove_headers: vec![],
                    }),
                    body_mutation: mutation.map(|m| ep::BodyMutation { mutation: Some(m) }),
                    ..Default::default()
                }),
            },
        )),
        ..Default::default()
    }
}

/// One stream: answers each headers message, remembering the request's
/// command for the response.
async fn serve_stream(
    mut inbound: tonic::Streaming<ep::ProcessingRequest>,
    tx: tokio::sync::mpsc::Sender<Out>,
) {
    let mut cmd = String::new();
    while let Some(Ok(req)) = inbound.next().await {
        use ep::processing_request::Request as Rq;
        let answer = match &req.request {
            Some(Rq::RequestHeaders(h)) => {
                cmd = h
                    .headers
                    .as_ref()
                    .and_then(|m| m.headers.iter().find(|h| h.key == "x-proc"))
                    .map(header_value)
                    .unwrap_or_default();
                match on_request_headers(&cmd, h, &req).await {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) => return,
                    Err(e) => Err(e),
                }
            }
            Some(Rq::ResponseHeaders(h)) => on_response_headers(&cmd, h, &req),
            Some(Rq::RequestBody(b)) => Ok(on_request_body(&cmd, b, &req)),
            _ => Err(tonic::Status::unimplemented("only headers are processed")),
        };
        let failed = answer.is_err();
        if tx.send(answer).await.is_err() || failed {
            return;
        }
    }
}

#[tonic::async_trait]
impl ep::external_processor_server::ExternalProcessor for Service {
    type ProcessStream = Pin<Box<dyn tokio_stream::Stream<Item = Out> + Send>>;

    async fn process(
        &self,
        request: tonic::Request<tonic::Streaming<ep::ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(serve_stream(request.into_inner(), tx));
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Starts the processor (h2c) on `addr`.
pub async fn start(addr: SocketAddr) -> anyhow::Result<Processor> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let addr = l.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ep::external_processor_server::ExternalProcessorServer::new(
                Service,
            ))
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(Processor { addr, task })
}
