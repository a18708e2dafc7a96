//! A scripted ADS control plane (SotW and Delta) for tests: a real gRPC server that
//! records every request it receives and answers each type with the
//! resources the test set for it, as a snapshot cache does. It can be shut
//! down and restarted on the same port to test reconnects.

use legate_proto::envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use legate_proto::envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use legate_proto::envoy_types::pb::google::protobuf::Any;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// A JSON resource as an `Any` of `type_url` (the message name after the
/// last '/'), through the Envoy descriptor pool.
pub fn any(type_url: &str, value: serde_json::Value) -> Any {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let msg = legate_proto::json::to_dynamic(value, name, true).expect("resource JSON");
    Any {
        type_url: type_url.to_string(),
        value: prost::Message::encode_to_vec(&msg),
    }
}

type Tx = mpsc::UnboundedSender<Result<DiscoveryResponse, Status>>;
type DeltaTx = mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>;

/// One type's subscription on a Delta stream.
#[derive(Default)]
struct DeltaSub {
    wildcard: bool,
    names: HashSet<String>,
    /// What the client holds: name → encoded resource.
    sent: HashMap<String, Vec<u8>>,
}

/// A resource's name, read with the Envoy descriptor pool.
fn name_of(a: &Any) -> String {
    legate_proto::walk::decode_any(&a.type_url, &a.value, "")
        .ok()
        .and_then(|m| {
            ["name", "cluster_name"].iter().find_map(|f| {
                m.get_field_by_name(f)
                    .and_then(|v| v.as_str().map(str::to_string))
                    .filter(|s| !s.is_empty())
            })
        })
        .unwrap_or_default()
}

#[derive(Default)]
struct Shared {
    /// Every request, in order, with the stream it came on.
    requests: Vec<(u64, DiscoveryRequest)>,
    /// What each type should hold: (version, resources).
    snapshot: HashMap<String, (String, Vec<Any>)>,
    stream: Option<(u64, Tx, HashSet<String>)>,
    /// Delta requests, in order, with their stream.
    delta_requests: Vec<(u64, DeltaDiscoveryRequest)>,
    delta: Option<(u64, DeltaTx, HashMap<String, DeltaSub>)>,
    streams: u64,
    nonce: u64,
}

#[derive(Clone, Default)]
struct Service(Arc<Mutex<Shared>>);

fn respond(s: &mut Shared, type_url: &str) {
    let Some((version, resources)) = s.snapshot.get(type_url).cloned() else {
        return;
    };
    s.nonce += 1;
    let nonce = s.nonce.to_string();
    if let Some((_, tx, _)) = &s.stream {
        let _ = tx.send(Ok(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        }));
    }
}

/// Sends a Delta client what changed for a type since it last heard.
fn respond_delta(s: &mut Shared, type_url: &str) {
    let Some((version, resources)) = s.snapshot.get(type_url).cloned() else {
        return;
    };
    let next_nonce = (s.nonce + 1).to_string();
    let Some((_, tx, subs)) = &mut s.delta else {
        return;
    };
    let Some(sub) = subs.get_mut(type_url) else {
        return;
    };
    let mut out = Vec::new();
    let mut present = HashSet::new();
    for a in resources {
        let name = name_of(&a);
        if !(sub.wildcard || sub.names.contains(&name)) {
            continue;
        }
        present.insert(name.clone());
        if sub.sent.get(&name) != Some(&a.value) {
            sub.sent.insert(name.clone(), a.value.clone());
            out.push(
                legate_proto::envoy_types::pb::envoy::service::discovery::v3::Resource {
                    name,
                    version: version.clone(),
                    resource: Some(a),
                    ..Default::default()
                },
            );
        }
    }
    let removed: Vec<String> = sub
        .sent
        .keys()
        .filter(|n| !present.contains(*n))
        .cloned()
        .collect();
    for n in &removed {
        sub.sent.remove(n);
    }
    if out.is_empty() && removed.is_empty() {
        return;
    }
    let _ = tx.send(Ok(DeltaDiscoveryResponse {
        system_version_info: version,
        resources: out,
        type_url: type_url.to_string(),
        removed_resources: removed,
        nonce: next_nonce,
        ..Default::default()
    }));
    s.nonce += 1;
}

/// SDS as its own service (Istio's `sds-grpc`): the same streams as ADS,
/// carrying only secrets.
#[tonic::async_trait]
impl legate_proto::envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService for Service {
    type StreamSecretsStream = <Self as AggregatedDiscoveryService>::StreamAggregatedResourcesStream;
    type DeltaSecretsStream = <Self as AggregatedDiscoveryService>::DeltaAggregatedResourcesStream;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        self.stream_aggregated_resources(request).await
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        self.delta_aggregated_resources(request).await
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("REST SDS is not scripted"))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
    type DeltaAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut s = self.0.lock().unwrap();
            s.streams += 1;
            let id = s.streams;
            s.stream = Some((id, tx, HashSet::new()));
            id
        };
        let shared = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let mut s = shared.lock().unwrap();
                let type_url = req.type_url.clone();
                let first = match &mut s.stream {
                    Some((sid, _, seen)) if *sid == id => seen.insert(type_url.clone()),
                    _ => false,
                };
                // Answer a type's first request when it is behind (a
                // snapshot cache's behaviour); later ones are ACKs/NACKs.
                let behind = s
                    .snapshot
                    .get(&type_url)
                    .is_some_and(|(v, _)| *v != req.version_info);
                s.requests.push((id, req));
                if first && behind {
                    respond(&mut s, &type_url);
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut s = self.0.lock().unwrap();
            s.streams += 1;
            let id = s.streams;
            s.delta = Some((id, tx, HashMap::new()));
            id
        };
        let shared = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let mut s = shared.lock().unwrap();
                let type_url = req.type_url.clone();
                let version = s.snapshot.get(&type_url).map(|(v, _)| v.clone());
                let snapshot: Vec<Any> = s
                    .snapshot
                    .get(&type_url)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_default();
                let changed = match &mut s.delta {
                    Some((sid, _, subs)) if *sid == id => {
                        let first = !subs.contains_key(&type_url);
                        let sub = subs.entry(type_url.clone()).or_default();
                        if first {
                            sub.wildcard = req.resource_names_subscribe.is_empty();
                            // What the client already holds at the current
                            // version is not sent again.
                            for a in &snapshot {
                                let n = name_of(a);
                                if version.is_some()
                                    && req.initial_resource_versions.get(&n) == version.as_ref()
                                {
                                    sub.sent.insert(n, a.value.clone());
                                }
                            }
                        }
                        for n in &req.resource_names_subscribe {
                            if n == "*" {
                                sub.wildcard = true;
                            } else {
                                sub.names.insert(n.clone());
                            }
                        }
                        for n in &req.resource_names_unsubscribe {
                            if n == "*" {
                                sub.wildcard = false;
                            } else {
                                sub.names.remove(n);
                                sub.sent.remove(n);
                            }
                        }
                        first || !req.resource_names_subscribe.is_empty()
                    }
                    _ => false,
                };
                s.delta_requests.push((id, req));
                if changed {
                    respond_delta(&mut s, &type_url);
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }
}

/// Polls `find` until it finds a request or `timeout` passes.
async fn poll<R>(timeout: Duration, find: impl Fn() -> Option<(u64, R)>) -> Option<R> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((_, r)) = find() {
            return Some(r);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The running server.
pub struct ScriptedAds {
    pub addr: SocketAddr,
    service: Service,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ScriptedAds {
    /// Starts on `addr` (port 0 picks one).
    pub async fn start(addr: SocketAddr) -> Self {
        Self::serve(addr, Service::default()).await
    }

    /// Starts on a Unix socket (Istio's `pipe` xDS clusters). The returned
    /// `addr` is meaningless; restarts are not supported.
    pub async fn start_unix(path: &std::path::Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).expect("bind xDS socket");
        Self::run(
            "0.0.0.0:0".parse().unwrap(),
            Service::default(),
            tokio_stream::wrappers::UnixListenerStream::new(listener),
        )
    }

    /// Starts on `addr` with TLS (`config`): a secured management server.
    /// Restarts come back without TLS.
    pub async fn start_tls(addr: SocketAddr, config: Arc<rustls::ServerConfig>) -> Self {
        use futures_util::StreamExt;
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind xDS");
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        // Handshakes one at a time; a failed one is dropped, not fatal.
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
            .then(move |tcp| {
                let acceptor = acceptor.clone();
                async move { acceptor.accept(tcp?).await.map(TlsIo) }
            })
            .filter(|r| std::future::ready(r.is_ok()));
        Self::run(addr, Service::default(), Box::pin(incoming))
    }

    async fn serve(addr: SocketAddr, service: Service) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind xDS");
        let addr = listener.local_addr().unwrap();
        Self::run(
            addr,
            service,
            tokio_stream::wrappers::TcpListenerStream::new(listener),
        )
    }

    /// Serves ADS on `incoming` until shut down.
    fn run<S, IO>(addr: SocketAddr, service: Service, incoming: S) -> Self
    where
        S: Stream<Item = std::io::Result<IO>> + Send + 'static,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(service.clone());
        let sds = legate_proto::envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer::new(service.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .add_service(sds)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            service,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Kills the server (the stream breaks); its state is kept for a restart.
    pub async fn shutdown(&mut self) {
        {
            let mut s = self.service.0.lock().unwrap();
            s.stream = None;
            s.delta = None;
        }
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Starts again on the same port with the same state.
    pub async fn restart(&mut self) {
        let again = Self::serve(self.addr, self.service.clone()).await;
        self.stop = again.stop;
        self.task = again.task;
    }

    /// Sets a type's resources and pushes them on the open stream.
    pub fn set(&self, type_url: &str, version: &str, resources: Vec<Any>) {
        let mut s = self.service.0.lock().unwrap();
        s.snapshot
            .insert(type_url.to_string(), (version.to_string(), resources));
        let subscribed = s
            .stream
            .as_ref()
            .is_some_and(|(_, _, seen)| seen.contains(type_url));
        if subscribed {
            respond(&mut s, type_url);
        }
        respond_delta(&mut s, type_url);
    }

    /// Every Delta request so far: (stream number, request).
    pub fn delta_requests(&self) -> Vec<(u64, DeltaDiscoveryRequest)> {
        self.service.0.lock().unwrap().delta_requests.clone()
    }

    /// Waits for a Delta request matching `pred`.
    pub async fn wait_for_delta(
        &self,
        timeout: Duration,
        pred: impl Fn(u64, &DeltaDiscoveryRequest) -> bool,
    ) -> Option<DeltaDiscoveryRequest> {
        poll(timeout, || {
            self.delta_requests().into_iter().find(|(s, r)| pred(*s, r))
        })
        .await
    }

    /// Every request so far: (stream number, request).
    pub fn requests(&self) -> Vec<(u64, DiscoveryRequest)> {
        self.service.0.lock().unwrap().requests.clone()
    }

    /// Waits for a request matching `pred` and returns it.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(u64, &DiscoveryRequest) -> bool,
    ) -> Option<DiscoveryRequest> {
        poll(timeout, || {
            self.requests().into_iter().find(|(s, r)| pred(*s, r))
        })
        .await
    }

    /// The nonce of the last response sent.
    pub fn last_nonce(&self) -> String {
        self.service.0.lock().unwrap().nonce.to_string()
    }
}

/// A server-side TLS connection as tonic's incoming stream wants it.
struct TlsIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
