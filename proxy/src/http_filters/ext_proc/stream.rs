//! One request's conversation with the processor: a bidirectional gRPC
//! stream opened at the first message the filter sends (never, when it
//! sends none), each message answered within `message_timeout`, closed
//! when the filter expects nothing more (dropping it half-closes and
//! resets, as Envoy's close does).

use super::{Service, Stats};
use legate_proto::envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use std::time::Duration;
use tokio::sync::mpsc;

/// How an exchange ended.
pub enum Reply {
    Message(Box<ep::ProcessingResponse>),
    /// The processor ended the stream cleanly: processing is complete.
    Closed,
    Failed(Failure),
}

/// Why the processor did not answer.
#[derive(Debug)]
pub enum Failure {
    /// The stream failed with this status (one the processor sent, or
    /// tonic's for a transport failure).
    Grpc(tonic::Status),
    /// No answer within `message_timeout`.
    Timeout,
    /// No host of the processor's cluster to call.
    NoHost,
}

struct Open {
    tx: mpsc::Sender<ep::ProcessingRequest>,
    rx: tonic::Streaming<ep::ProcessingResponse>,
}

/// The stream, opened at the first message.
pub struct Conversation {
    open: Option<Open>,
    /// The first message has been sent (it carries `protocol_config`).
    started: bool,
    /// The request body mode `protocol_config` states.
    request_body_mode: i32,
}

impl Conversation {
    pub fn new(request_body_mode: i32) -> Conversation {
        Conversation {
            open: None,
            started: false,
            request_body_mode,
        }
    }

    /// Sends `msg` and waits for the processor's answer. A message the
    /// processor sends only to extend its timer (`override_message_timeout`)
    /// is counted as ignored, as Envoy's is without `max_message_timeout`,
    /// and the wait goes on.
    pub async fn exchange(
        &mut self,
        mut msg: ep::ProcessingRequest,
        service: &Service,
        stats: &Stats,
        clusters: &crate::cluster_manager::ClusterManager,
        timeout: Duration,
    ) -> Reply {
        if !self.started {
            msg.protocol_config = Some(ep::ProtocolConfiguration {
                request_body_mode: self.request_body_mode,
                ..Default::default()
            });
            self.started = true;
        }
        let wait = async {
            if let Some(o) = &self.open {
                if o.tx.send(msg).await.is_err() {
                    return Reply::Failed(Failure::Grpc(tonic::Status::unavailable(
                        "stream closed",
                    )));
                }
                stats.stream_msgs_sent.increment(1);
            } else {
                match open(msg, service, clusters).await {
                    Ok(o) => {
                        stats.streams_started.increment(1);
                        stats.stream_msgs_sent.increment(1);
                        self.open = Some(o);
                    }
                    Err(f) => return Reply::Failed(f),
                }
            }
            let Some(o) = self.open.as_mut() else {
                return Reply::Closed;
            };
            loop {
                match o.rx.message().await {
                    Ok(Some(m)) => {
                        stats.stream_msgs_received.increment(1);
                        if m.override_message_timeout.is_some() {
                            stats.override_message_timeout_ignored.increment(1);
                            continue;
                        }
                        return Reply::Message(Box::new(m));
                    }
                    Ok(None) => return Reply::Closed,
                    Err(s) => return Reply::Failed(Failure::Grpc(s)),
                }
            }
        };
        let reply = match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Reply::Failed(Failure::Timeout),
        };
        if !matches!(reply, Reply::Message(_)) {
            self.open = None;
        }
        reply
    }

    /// Whether a stream is open (closing it is Envoy's `streams_closed`).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Half-closes and drops the stream.
    pub fn close(&mut self) {
        self.open = None;
    }
}

/// Opens the stream with `first` queued on it, tried again as the
/// service's `retry_policy` says when the stream cannot be opened.
async fn open(
    first: ep::ProcessingRequest,
    service: &Service,
    clusters: &crate::cluster_manager::ClusterManager,
) -> Result<Open, Failure> {
    let mut n = 0;
    loop {
        let failure = match open_once(first.clone(), service, clusters).await {
            Ok(o) => return Ok(o),
            Err(f) => f,
        };
        let retried = match (&service.retry, &failure) {
            (Some(r), Failure::Grpc(s)) if n < r.num_retries => {
                // A status tonic made from a transport error is the
                // connection failing, which Envoy's router sees as a reset.
                let f = if std::error::Error::source(s).is_some() {
                    crate::http_filters::retry::Failure::Reset
                } else {
                    crate::http_filters::retry::Failure::Grpc(s.code() as i32)
                };
                r.retries(&f).then(|| r.backoff(n))
            }
            _ => None,
        };
        match retried {
            Some(backoff) => {
                tokio::time::sleep(backoff).await;
                n += 1;
            }
            None => return Err(failure),
        }
    }
}

async fn open_once(
    first: ep::ProcessingRequest,
    service: &Service,
    clusters: &crate::cluster_manager::ClusterManager,
) -> Result<Open, Failure> {
    let addr = crate::http_filters::side::plaintext_host(clusters, &service.cluster)
        .ok_or(Failure::NoHost)?;
    let channel = service.channels.get(addr).ok_or(Failure::NoHost)?;
    let (tx, rx) = mpsc::channel(2);
    // Queued before the call starts, so that a processor that answers its
    // headers only with its first message does not wait for us.
    let _ = tx.send(first).await;
    let mut client = ep::external_processor_client::ExternalProcessorClient::new(channel);
    let call = service
        .metadata
        .request(tokio_stream::wrappers::ReceiverStream::new(rx));
    let rx = client
        .process(call)
        .await
        .map_err(Failure::Grpc)?
        .into_inner();
    Ok(Open { tx, rx })
}
