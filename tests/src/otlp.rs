//! An OTLP collector: the real `LogsService/Export` and
//! `TraceService/Export` over gRPC (h2c, on tonic), keeping every request
//! it receives with the call's metadata, for comparing what Envoy and
//! Legate export.

use opentelemetry_proto::tonic::collector::logs::v1::{
    logs_service_server::{LogsService, LogsServiceServer},
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// One export call: its metadata (name, value; sorted) and its message.
#[derive(Debug, Clone)]
pub struct Export {
    pub metadata: Vec<(String, String)>,
    pub request: ExportLogsServiceRequest,
}

#[derive(Default, Clone)]
struct Sink(Arc<Mutex<Vec<Export>>>);

/// One trace export call: its metadata and its message.
#[derive(Debug, Clone)]
pub struct TraceExport {
    pub metadata: Vec<(String, String)>,
    pub request: ExportTraceServiceRequest,
}

#[derive(Default, Clone)]
struct TraceSink(Arc<Mutex<Vec<TraceExport>>>);

fn ascii_metadata(m: &tonic::metadata::MetadataMap) -> Vec<(String, String)> {
    let mut metadata: Vec<(String, String)> = m
        .iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                Some((k.to_string(), v.to_str().unwrap_or("").to_string()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect();
    metadata.sort();
    metadata
}

#[tonic::async_trait]
impl TraceService for TraceSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let metadata = ascii_metadata(request.metadata());
        self.0.lock().unwrap().push(TraceExport {
            metadata,
            request: request.into_inner(),
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let metadata = ascii_metadata(request.metadata());
        self.0.lock().unwrap().push(Export {
            metadata,
            request: request.into_inner(),
        });
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

/// A running collector, stopped on drop.
pub struct Collector {
    pub addr: SocketAddr,
    received: Sink,
    traces: TraceSink,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    /// Everything received so far, in arrival order.
    pub fn exports(&self) -> Vec<Export> {
        self.received.0.lock().unwrap().clone()
    }

    /// Trace exports received so far, in arrival order.
    pub fn trace_exports(&self) -> Vec<TraceExport> {
        self.traces.0.lock().unwrap().clone()
    }

    /// Spans received so far, over all exports.
    pub fn span_count(&self) -> usize {
        self.trace_exports()
            .iter()
            .flat_map(|e| &e.request.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum()
    }

    /// Log records received so far, over all exports.
    pub fn record_count(&self) -> usize {
        self.exports()
            .iter()
            .flat_map(|e| &e.request.resource_logs)
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum()
    }
}

/// Starts a collector on `addr` (port 0 for any).
pub async fn start(addr: SocketAddr) -> anyhow::Result<Collector> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let addr = l.local_addr()?;
    let received = Sink::default();
    let traces = TraceSink::default();
    let service = LogsServiceServer::new(received.clone());
    let trace_service = TraceServiceServer::new(traces.clone());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .add_service(trace_service)
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(Collector {
        addr,
        received,
        traces,
        task,
    })
}
