//! Istio's TCP metadata exchange (`envoy.tcp.metadataexchange.config.
//! MetadataExchange`, named `istio.metadata_exchange` by istiod), as a
//! listener's network filter (the downstream side) and in `Cluster.filters`
//! (the upstream side). When the connection's TLS handshake settled on the
//! configured ALPN `protocol` (`istio-peer-exchange`), each side sends,
//! before any of its own bytes, one frame saying who it is, and reads the
//! other's from the front of what it receives:
//!
//! - 4 bytes of magic `0x3D230467` and a 4-byte length, both big-endian;
//! - that many bytes of a `google.protobuf.Any` holding a `Struct` with
//!   `x-envoy-peer-metadata` (the flat node) and `x-envoy-peer-metadata-id`
//!   (the node id).
//!
//! A connection on any other protocol (plaintext among them) passes through
//! untouched, as do bytes that do not start with the magic. The peer read
//! is what `istio.stats` labels the connection's metrics with.
//! `enable_discovery` asks Istio's workload metadata service, which a proxy
//! has only with its bootstrap extension (waypoints, ambient): as in Istio's
//! proxy without it, it finds nothing.
//!
//! In Legate the exchange runs on `tcp_proxy` connections, where Istio uses
//! it; a listener chain whose connection manager could negotiate the
//! protocol is refused, and HTTP connections to a cluster with the filter
//! never run it (Istio's HTTP connections offer `istio-h2` and the like,
//! through `istio.alpn`, so the exchange never applies to them there).

use super::peer::{encode_sorted, Workload};
use crate::config::wkt::{value::Kind, Struct, Value};
use crate::config::{ConfigError, Result};
use crate::registry::MessageSupport;
use crate::stats;
use bytes::Bytes;
use legate_proto::envoy_types::pb::google::protobuf::Any;
use legate_proto::istio::METADATA_EXCHANGE as TYPE;
use legate_proto::prost_reflect::Value as DynValue;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

pub const MAGIC: u32 = 0x3D23_0467;
const STRUCT_URL: &str = "type.googleapis.com/google.protobuf.Struct";
/// A frame larger than this is not believed (Istio's proxies send a few
/// hundred bytes).
const MAX_FRAME: usize = 64 * 1024;

pub static REGISTRY: &[MessageSupport] = &[MessageSupport {
    message: TYPE,
    supported: &["protocol", "enable_discovery", "additional_labels"],
    warn: &[],
}];

#[derive(Debug, PartialEq)]
pub struct Exchange {
    pub protocol: String,
    additional: Vec<String>,
    /// This proxy's frame, made once.
    frame: Bytes,
}

impl Exchange {
    pub fn from_any(a: &Any, path: &str) -> Result<Exchange> {
        let m = legate_proto::walk::decode_any(&a.type_url, &a.value, path)
            .map_err(|e| ConfigError::new(path, e.to_string()))?;
        let protocol = m
            .get_field_by_name("protocol")
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        if protocol.is_empty() {
            return Err(ConfigError::new(
                crate::config::join(path, "protocol"),
                "protocol is required",
            ));
        }
        let additional: Vec<String> = match m.get_field_by_name("additional_labels").as_deref() {
            Some(DynValue::List(l)) => l
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        };
        let frame = frame(
            &super::peer::local(&additional),
            &crate::config::local_node().id,
        );
        Ok(Exchange {
            protocol,
            additional,
            frame,
        })
    }

    /// Whether a connection that negotiated `alpn` runs the exchange;
    /// counts as Istio's proxy does.
    pub fn active(&self, alpn: Option<&[u8]>) -> bool {
        let found = alpn == Some(self.protocol.as_bytes());
        count(if found {
            "alpn_protocol_found"
        } else {
            "alpn_protocol_not_found"
        });
        found
    }

    /// This proxy's frame, to send first.
    pub fn frame(&self) -> Bytes {
        count("metadata_added");
        self.frame.clone()
    }

    /// Reads the peer's frame from the front of `r`: the peer, if one was
    /// read, and the bytes read that are not part of a frame (to pass on).
    /// A failed read is `Err`, with the bytes read before it.
    pub async fn read_peer<R: AsyncRead + Unpin>(&self, r: &mut R) -> Read {
        let mut buf = Vec::with_capacity(512);
        // Until the end, or `want` bytes are in.
        // None: the read failed.
        async fn fill<R: AsyncRead + Unpin>(
            r: &mut R,
            buf: &mut Vec<u8>,
            want: usize,
        ) -> Option<bool> {
            while buf.len() < want {
                match r.read_buf(buf).await {
                    Ok(0) => return Some(false),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            Some(true)
        }
        match fill(r, &mut buf, 8).await {
            None => return Err(buf),
            Some(false) => return Ok((None, buf)),
            Some(true) => {}
        }
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if magic != MAGIC {
            count("initial_header_not_found");
            return Ok((None, buf));
        }
        let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        if len > MAX_FRAME {
            count("header_not_found");
            return Ok((None, buf));
        }
        match fill(r, &mut buf, 8 + len).await {
            None => return Err(buf),
            Some(false) => return Ok((None, buf)),
            Some(true) => {}
        }
        let rest = buf.split_off(8 + len);
        match parse(&buf[8..], &self.additional) {
            Some(w) => Ok((Some(w), rest)),
            None => {
                count("header_not_found");
                Ok((None, rest))
            }
        }
    }
}

/// What reading the peer's frame gave: (the peer, bytes to pass on), or
/// the bytes read before the read failed.
pub type Read = std::result::Result<(Option<Workload>, Vec<u8>), Vec<u8>>;

fn count(name: &str) {
    stats::counter(format!("metadata_exchange.{name}")).increment(1);
}

/// A proxy's frame: header, then the `Any` of its `Struct`.
pub fn frame(w: &Workload, id: &str) -> Bytes {
    let mut s = Struct::default();
    s.fields.insert(
        super::peer_metadata::METADATA.into(),
        Value {
            kind: Some(Kind::StructValue(w.to_struct())),
        },
    );
    if !id.is_empty() {
        s.fields.insert(
            super::peer_metadata::METADATA_ID.into(),
            Value {
                kind: Some(Kind::StringValue(id.into())),
            },
        );
    }
    let any = Any {
        type_url: STRUCT_URL.into(),
        value: encode_sorted(&s),
    }
    .encode_to_vec();
    let mut out = Vec::with_capacity(8 + any.len());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&(any.len() as u32).to_be_bytes());
    out.extend_from_slice(&any);
    out.into()
}

/// The peer in a frame's payload.
fn parse(payload: &[u8], additional: &[String]) -> Option<Workload> {
    let any = Any::decode(payload).ok()?;
    let s = Struct::decode(any.value.as_slice()).ok()?;
    match s
        .fields
        .get(super::peer_metadata::METADATA)?
        .kind
        .as_ref()?
    {
        Kind::StructValue(flat) => Some(Workload::from_struct(flat, additional)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange() -> Exchange {
        Exchange {
            protocol: "istio-peer-exchange".into(),
            additional: Vec::new(),
            frame: Bytes::new(),
        }
    }

    #[tokio::test]
    async fn a_frame_is_read_off_the_front() {
        let w = Workload {
            workload_name: "ratings-v1".into(),
            namespace: "legate".into(),
            ..Default::default()
        };
        let mut bytes = frame(&w, "sidecar~1").to_vec();
        assert_eq!(&bytes[..4], &MAGIC.to_be_bytes());
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (peer, rest) = exchange().read_peer(&mut bytes.as_slice()).await.unwrap();
        assert_eq!(peer, Some(w));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn other_bytes_pass_through() {
        let (peer, rest) = exchange()
            .read_peer(&mut &b"hello, world"[..])
            .await
            .unwrap();
        assert_eq!((peer, rest.as_slice()), (None, &b"hello, world"[..]));
        // Shorter than a header, then the end.
        let (peer, rest) = exchange().read_peer(&mut &b"hi"[..]).await.unwrap();
        assert_eq!((peer, rest.as_slice()), (None, &b"hi"[..]));
    }

    #[test]
    fn only_the_configured_protocol_activates() {
        let e = exchange();
        assert!(e.active(Some(b"istio-peer-exchange")));
        assert!(!e.active(Some(b"h2")));
        assert!(!e.active(None));
    }
}
