//! Runs a SotW or Delta core over one gRPC stream, reconnecting with
//! jittered exponential backoff. While the server is away the handler keeps
//! whatever it last applied.

use crate::backoff::Backoff;
use crate::client::Target;
use crate::{Handler, Interest};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// A protocol core (SotW or Delta) as the stream driver sees it.
pub(crate) trait Protocol: Send + 'static {
    type Req: prost::Message + Send + Sync + 'static;
    type Resp: prost::Message + Default + Send + 'static;
    fn set_interest(&mut self, type_url: &str, interest: Interest) -> Option<Self::Req>;
    fn on_connect(&mut self) -> Vec<Self::Req>;
    fn on_response(&mut self, resp: Self::Resp, handler: &dyn Handler) -> Option<Self::Req>;
}

impl Protocol for crate::sotw::Sotw {
    type Req = crate::DiscoveryRequest;
    type Resp = crate::DiscoveryResponse;
    fn set_interest(&mut self, t: &str, i: Interest) -> Option<Self::Req> {
        crate::sotw::Sotw::set_interest(self, t, i)
    }
    fn on_connect(&mut self) -> Vec<Self::Req> {
        crate::sotw::Sotw::on_connect(self)
    }
    fn on_response(&mut self, r: Self::Resp, h: &dyn Handler) -> Option<Self::Req> {
        crate::sotw::Sotw::on_response(self, r, h)
    }
}

impl Protocol for crate::delta::Delta {
    type Req = crate::DeltaDiscoveryRequest;
    type Resp = crate::DeltaDiscoveryResponse;
    fn set_interest(&mut self, t: &str, i: Interest) -> Option<Self::Req> {
        crate::delta::Delta::set_interest(self, t, i)
    }
    fn on_connect(&mut self) -> Vec<Self::Req> {
        crate::delta::Delta::on_connect(self)
    }
    fn on_response(&mut self, r: Self::Resp, h: &dyn Handler) -> Option<Self::Req> {
        crate::delta::Delta::on_response(self, r, h)
    }
}

pub(crate) async fn channel(target: &Target) -> Result<tonic::transport::Channel, String> {
    match target {
        Target::Tcp(addr) => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("{addr}: {e}")),
        Target::Tls(target) => {
            let (t, addr) = (target.clone(), target.addr);
            tonic::transport::Endpoint::from_static("http://localhost")
                .connect_timeout(std::time::Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let t = t.clone();
                    async move {
                        let tcp = tokio::net::TcpStream::connect(t.addr).await?;
                        tcp.set_nodelay(true)?;
                        let tls = tokio_rustls::TlsConnector::from(t.config)
                            .connect(t.name, tcp)
                            .await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                    }
                }))
                .await
                .map_err(|e| format!("{addr}: {e}"))
        }
        Target::Unix(path) => {
            let path = path.clone();
            tonic::transport::Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .map_err(|e| e.to_string())
        }
    }
}

enum End {
    /// The stream ended or failed; `progress`: a response had arrived.
    Lost { progress: bool },
    /// The client is gone: stop.
    Closed,
}

pub(crate) async fn run<P: Protocol>(
    mut core: P,
    target: Target,
    path: String,
    handler: Arc<dyn Handler>,
    mut cmds: mpsc::UnboundedReceiver<(String, Interest)>,
) {
    let mut backoff = Backoff::default();
    loop {
        while let Ok((t, i)) = cmds.try_recv() {
            core.set_interest(&t, i);
        }
        match session(&mut core, &target, &path, &*handler, &mut cmds).await {
            End::Closed => return,
            End::Lost { progress } => {
                if progress {
                    backoff.reset();
                }
            }
        }
        handler.connected(false);
        let wait = backoff.next_wait(rand::random());
        tracing::debug!(?target, %path, ?wait, "xDS stream lost; reconnecting");
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                c = cmds.recv() => match c {
                    Some((t, i)) => { core.set_interest(&t, i); }
                    None => return,
                },
            }
        }
    }
}

async fn session<P: Protocol>(
    core: &mut P,
    target: &Target,
    path: &str,
    handler: &dyn Handler,
    cmds: &mut mpsc::UnboundedReceiver<(String, Interest)>,
) -> End {
    let lost = End::Lost { progress: false };
    let ch = match channel(target).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(?target, error = %e, "cannot connect to the xDS server");
            return lost;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel::<P::Req>();
    for r in core.on_connect() {
        let _ = tx.send(r);
    }
    let mut grpc = tonic::client::Grpc::new(ch);
    if let Err(e) = grpc.ready().await {
        tracing::warn!(error = %e, "xDS channel not ready");
        return lost;
    }
    let Ok(path) = http::uri::PathAndQuery::try_from(path) else {
        return End::Closed;
    };
    let codec = tonic_prost::ProstCodec::<P::Req, P::Resp>::default();
    let resp = match grpc
        .streaming(
            tonic::Request::new(UnboundedReceiverStream::new(rx)),
            path,
            codec,
        )
        .await
    {
        Ok(r) => r,
        Err(status) => {
            tracing::warn!(%status, "xDS stream refused");
            return lost;
        }
    };
    handler.connected(true);
    let mut inbound = resp.into_inner();
    let mut progress = false;
    loop {
        tokio::select! {
            c = cmds.recv() => match c {
                Some((t, i)) => {
                    if let Some(r) = core.set_interest(&t, i) {
                        let _ = tx.send(r);
                    }
                }
                None => return End::Closed,
            },
            m = inbound.message() => match m {
                Ok(Some(resp)) => {
                    progress = true;
                    if let Some(r) = core.on_response(resp, handler) {
                        let _ = tx.send(r);
                    }
                }
                Ok(None) => {
                    tracing::info!("xDS stream closed by the server");
                    return End::Lost { progress };
                }
                Err(status) => {
                    tracing::warn!(%status, "xDS stream failed");
                    return End::Lost { progress };
                }
            },
        }
    }
}
