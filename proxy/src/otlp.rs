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
