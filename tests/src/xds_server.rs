//! A scripted ADS control plane (SotW) for tests: a real gRPC server that
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

#[derive(Default)]
struct Shared {
    /// Every request, in order, with the stream it came on.
    requests: Vec<(u64, DiscoveryRequest)>,
    /// What each type should hold: (version, resources).
    snapshot: HashMap<String, (String, Vec<Any>)>,
    stream: Option<(u64, Tx, HashSet<String>)>,
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
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("the scripted server speaks SotW"))
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
        let service = Service::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(service.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        Self {
            addr: "0.0.0.0:0".parse().unwrap(),
            service,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn serve(addr: SocketAddr, service: Service) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind xDS");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let svc = AggregatedDiscoveryServiceServer::new(service.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
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
        self.service.0.lock().unwrap().stream = None;
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
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, r)) = self.requests().into_iter().find(|(s, r)| pred(*s, r)) {
                return Some(r);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The nonce of the last response sent.
    pub fn last_nonce(&self) -> String {
        self.service.0.lock().unwrap().nonce.to_string()
    }
}
