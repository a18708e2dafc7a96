//! REST polling: `POST /v3/discovery:<type>` with a proto3-JSON
//! DiscoveryRequest every `refresh_delay`; 200 carries a DiscoveryResponse,
//! 304 means nothing changed. The SotW core keeps versions as on a stream
//! (REST has no nonces and no ACK message: the next poll's version says it).

use crate::client::Target;
use crate::sotw::Sotw;
use crate::{DiscoveryRequest, DiscoveryResponse, Handler, Interest};
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const REQUEST: &str = "envoy.service.discovery.v3.DiscoveryRequest";
const RESPONSE: &str = "envoy.service.discovery.v3.DiscoveryResponse";

fn to_json(req: &DiscoveryRequest) -> Result<Vec<u8>, String> {
    let desc = legate_proto::json::descriptor(REQUEST).map_err(|e| e.to_string())?;
    let dynamic = legate_proto::prost_reflect::DynamicMessage::decode(
        desc,
        prost::Message::encode_to_vec(req).as_slice(),
    )
    .map_err(|e| e.to_string())?;
    serde_json::to_vec(&dynamic).map_err(|e| e.to_string())
}

async fn post(target: &Target, path: &str, body: Vec<u8>) -> Result<(u16, Vec<u8>), String> {
    let Target::Tcp(addr) = target else {
        return Err("REST needs a plain TCP management server".into());
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body.to_vec()))
}

/// A changed subscription polls with no version: a REST server compares
/// only versions (go-control-plane answers 304 to a known one), and Envoy's
/// REST subscriptions are per resource, each starting from no version.
fn fresh(mut r: DiscoveryRequest) -> DiscoveryRequest {
    r.version_info.clear();
    r
}

pub(crate) async fn run(
    mut core: Sotw,
    target: Target,
    type_url: String,
    rest: &'static str,
    refresh: Duration,
    handler: Arc<dyn Handler>,
    mut cmds: mpsc::UnboundedReceiver<(String, Interest)>,
) {
    let path = format!("/v3/discovery:{rest}");
    let mut request: Option<DiscoveryRequest> = None;
    let mut up: Option<bool> = None;
    loop {
        while let Ok((t, i)) = cmds.try_recv() {
            if let Some(r) = core.set_interest(&t, i) {
                request = Some(fresh(r));
            }
        }
        if let Some(req) = &request {
            let mut req = req.clone();
            req.response_nonce.clear();
            let result = match to_json(&req) {
                Ok(body) => post(&target, &path, body).await,
                Err(e) => Err(e),
            };
            let ok = match result {
                Ok((200, body)) => {
                    match serde_json::from_slice(&body)
                        .map_err(|e| e.to_string())
                        .and_then(|v| {
                            legate_proto::json::to_message::<DiscoveryResponse>(v, RESPONSE, false)
                                .map_err(|e| e.to_string())
                        }) {
                        Ok(resp) => {
                            if let Some(next) = core.on_response(resp, &*handler) {
                                // A NACK is not sent over REST: the next poll
                                // simply keeps the old version.
                                let mut next = next;
                                next.error_detail = None;
                                request = Some(next);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%path, %type_url, error = %e, "bad REST xDS response")
                        }
                    }
                    true
                }
                Ok((304, _)) => true,
                Ok((status, body)) => {
                    tracing::warn!(%path, status, body = %String::from_utf8_lossy(&body), "REST xDS error");
                    false
                }
                Err(e) => {
                    tracing::warn!(%path, error = %e, "REST xDS request failed");
                    false
                }
            };
            if up != Some(ok) {
                handler.connected(ok);
                up = Some(ok);
            }
        }
        let sleep = tokio::time::sleep(refresh);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                c = cmds.recv() => match c {
                    Some((t, i)) => {
                        if let Some(r) = core.set_interest(&t, i) {
                            request = Some(fresh(r));
                        }
                    }
                    None => return,
                },
            }
        }
    }
}
