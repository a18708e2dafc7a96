//! What Legate's OTLP exporters (the OpenTelemetry access logger and the
//! OpenTelemetry tracer) share: items queued by requests are batched by a
//! task of their own, off the request path, and handed to a sender every
//! flush interval or as soon as a batch is full.

use std::time::Duration;
use tokio::sync::mpsc;

/// When a batch is full before its interval is up.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// Encoded size (`buffer_size_bytes` of access logs).
    Bytes(usize),
    /// Item count (`max_cache_size` of spans).
    Items(usize),
}

/// Batches what arrives on `rx` and hands each batch to `send`; sends what
/// is left when every sender is gone (the config was replaced).
pub async fn batch_loop<T: prost::Message>(
    mut rx: mpsc::Receiver<T>,
    flush_interval: Duration,
    limit: Limit,
    mut send: impl FnMut(Vec<T>),
) {
    let mut batch: Vec<T> = Vec::new();
    let mut bytes = 0;
    // A timer firing on every poll would spin the task.
    let mut tick = tokio::time::interval(flush_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let full = tokio::select! {
            r = rx.recv() => match r {
                Some(r) => {
                    bytes += r.encoded_len();
                    batch.push(r);
                    match limit {
                        Limit::Bytes(b) => bytes >= b,
                        Limit::Items(n) => batch.len() >= n,
                    }
                }
                None => {
                    if !batch.is_empty() {
                        send(std::mem::take(&mut batch));
                    }
                    return;
                }
            },
            _ = tick.tick() => true,
        };
        if full && !batch.is_empty() {
            send(std::mem::take(&mut batch));
            bytes = 0;
        }
    }
}

/// Export calls in flight at once per exporter; a batch finding none free
/// is dropped (and counted).
const IN_FLIGHT: usize = 16;

/// Where an exporter's batches go: a host of a cluster over gRPC, with the
/// service's call metadata and deadline, a bounded number of calls at once.
#[derive(Debug)]
pub struct Destination {
    pub cluster: String,
    pub channels: crate::http_filters::side::Channels,
    pub metadata: crate::http_filters::side::Metadata,
    pub timeout: Duration,
    slots: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Destination {
    pub fn new(
        cluster: String,
        channels: crate::http_filters::side::Channels,
        metadata: crate::http_filters::side::Metadata,
        timeout: Duration,
    ) -> Self {
        Self {
            cluster,
            channels,
            metadata,
            timeout,
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
        }
    }

    /// Sends one batch of `n` items with `call` (the service's export),
    /// off the caller's task; counts the outcome as `<stat>.<ok>` or
    /// `<stat>.<dropped>` (also when no host or no call slot is free).
    pub fn send<T, F, Fut, R>(
        &self,
        clusters: &crate::cluster_manager::ClusterManager,
        n: u64,
        message: T,
        (stat, ok, dropped): (&'static str, &'static str, &'static str),
        call: F,
    ) where
        T: Send + 'static,
        F: FnOnce(tonic::transport::Channel, tonic::Request<T>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<R, tonic::Status>> + Send,
    {
        let count = move |name: &str| crate::stats::counter(format!("{stat}.{name}")).increment(n);
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            return count(dropped);
        };
        let Some(channel) = crate::http_filters::side::plaintext_host(clusters, &self.cluster)
            .and_then(|addr| self.channels.get(addr))
        else {
            return count(dropped);
        };
        let mut request = self.metadata.request(message);
        let timeout = self.timeout;
        request.set_timeout(timeout);
        tokio::spawn(async move {
            let _permit = permit;
            let name = match tokio::time::timeout(timeout, call(channel, request)).await {
                Ok(Ok(_)) => ok,
                _ => dropped,
            };
            count(name);
        });
    }
}
