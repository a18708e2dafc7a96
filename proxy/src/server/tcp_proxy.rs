//! `tcp_proxy`: one upstream connection per downstream connection, bytes
//! copied both ways. A half-close is passed on (`shutdown(SHUT_WR)`) and the
//! other direction keeps flowing, as Envoy does.

use crate::cluster_manager::ClusterManager;
use crate::config::listener::TcpProxy;
use crate::stats;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

pub async fn serve(
    mut down: TcpStream,
    peer: SocketAddr,
    t: Arc<TcpProxy>,
    clusters: Arc<ClusterManager>,
) {
    let prefix = format!("tcp.{}.", t.stat_prefix);
    stats::counter(format!("{prefix}downstream_cx_total")).increment(1);
    let Some(cluster) = clusters.get(&t.cluster) else {
        // Envoy closes the connection when the cluster does not exist.
        stats::counter(format!("{prefix}downstream_cx_no_route")).increment(1);
        tracing::debug!(%peer, cluster = %t.cluster, "tcp_proxy: unknown cluster");
        return;
    };
    let snap = cluster.snapshot();
    let Some(host) = snap.pick(None, rand::random(), &|_| false, None) else {
        stats::counter(format!("cluster.{}.upstream_cx_none_healthy", t.cluster)).increment(1);
        return;
    };
    let connect = tokio::time::timeout(
        cluster.config.connect_timeout,
        TcpStream::connect(host.addr),
    );
    let mut up = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats::counter(format!("cluster.{}.upstream_cx_connect_fail", t.cluster)).increment(1);
            tracing::debug!(%peer, upstream = %host.addr, error = %e, "tcp_proxy: connect failed");
            return;
        }
        Err(_) => {
            stats::counter(format!("cluster.{}.upstream_cx_connect_timeout", t.cluster))
                .increment(1);
            return;
        }
    };
    stats::counter(format!("cluster.{}.upstream_cx_total", t.cluster)).increment(1);
    let _ = up.set_nodelay(true);
    host.active_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let result = tokio::io::copy_bidirectional(&mut down, &mut up).await;
    host.active_requests
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    if let Ok((rx, tx)) = result {
        stats::counter(format!("{prefix}downstream_cx_rx_bytes_total")).increment(rx);
        stats::counter(format!("{prefix}downstream_cx_tx_bytes_total")).increment(tx);
    }
}
