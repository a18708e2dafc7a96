//! The client: which stream serves which type, started on first use.

use crate::{delta::Delta, sotw::Sotw, Handler, Interest, Node};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Where a management server listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Tcp(SocketAddr),
    /// A Unix socket (Istio's `pipe` addresses).
    Unix(PathBuf),
    /// TCP with TLS (gRPC only).
    Tls(TlsTarget),
}

/// A TLS management server: the handshake uses `config` (its ALPN must
/// offer `h2`, which gRPC servers require) for `name`.
#[derive(Clone, Debug)]
pub struct TlsTarget {
    pub addr: SocketAddr,
    pub name: rustls::pki_types::ServerName<'static>,
    pub config: Arc<rustls::ClientConfig>,
}

/// Two targets are the same server when the address, name and TLS context
/// (by identity) are.
impl PartialEq for TlsTarget {
    fn eq(&self, o: &Self) -> bool {
        self.addr == o.addr && self.name == o.name && Arc::ptr_eq(&self.config, &o.config)
    }
}

impl Eq for TlsTarget {}

impl std::hash::Hash for TlsTarget {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.addr.hash(h);
        self.name.hash(h);
        Arc::as_ptr(&self.config).hash(h);
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Transport {
    /// A gRPC stream: SotW, or Delta.
    Grpc { delta: bool },
    /// REST polling every `refresh`.
    Rest { refresh: Duration },
}

/// One `api_config_source`.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub target: Target,
    pub transport: Transport,
    pub node_first_only: bool,
}

/// How a type is fetched: over the ADS stream or its own source.
#[derive(Clone, Debug, PartialEq)]
pub enum Via {
    Ads,
    Source(Source),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClientError {
    #[error("a config source uses ADS but the bootstrap has no ads_config")]
    NoAds,
    #[error("{type_url} cannot be fetched over {how}")]
    Unsupported { type_url: String, how: &'static str },
}

type Command = (String, Interest);

pub struct XdsClient {
    node: Node,
    handler: Arc<dyn Handler>,
    ads: Option<Source>,
    streams: Mutex<HashMap<String, mpsc::UnboundedSender<Command>>>,
}

impl XdsClient {
    pub fn new(node: Node, handler: Arc<dyn Handler>, ads: Option<Source>) -> Arc<Self> {
        Arc::new(Self {
            node,
            handler,
            ads,
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// Sets what a type subscribes to, starting its stream on first use.
    /// Must be called inside a Tokio runtime.
    pub fn watch(&self, type_url: &str, via: &Via, interest: Interest) -> Result<(), ClientError> {
        let (key, source, per_type) = match via {
            Via::Ads => (
                "ads".to_string(),
                self.ads.clone().ok_or(ClientError::NoAds)?,
                None,
            ),
            Via::Source(s) => (
                format!("{:?}|{:?}|{type_url}", s.target, s.transport),
                s.clone(),
                Some(type_url.to_string()),
            ),
        };
        let mut streams = self.streams.lock().expect("stream table");
        if let Some(tx) = streams.get(&key) {
            if tx.send((type_url.to_string(), interest.clone())).is_ok() {
                return Ok(());
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send((type_url.to_string(), interest))
            .expect("receiver is alive");
        let handler = self.handler.clone();
        let node = self.node.clone();
        match source.transport {
            Transport::Grpc { delta } => {
                let path =
                    crate::types::grpc_path(per_type.as_deref(), delta).ok_or_else(|| {
                        ClientError::Unsupported {
                            type_url: type_url.to_string(),
                            how: "state-of-the-world gRPC",
                        }
                    })?;
                let target = source.target.clone();
                if delta {
                    let core = Delta::new(node, source.node_first_only);
                    tokio::spawn(crate::grpc::run(core, target, path, handler, rx));
                } else {
                    let core = Sotw::new(node, source.node_first_only);
                    tokio::spawn(crate::grpc::run(core, target, path, handler, rx));
                }
            }
            Transport::Rest { refresh } => {
                let Some(rest) = crate::types::info(type_url).and_then(|i| i.rest) else {
                    return Err(ClientError::Unsupported {
                        type_url: type_url.to_string(),
                        how: "REST",
                    });
                };
                if per_type.is_none() {
                    return Err(ClientError::Unsupported {
                        type_url: type_url.to_string(),
                        how: "REST ADS",
                    });
                }
                tokio::spawn(crate::rest::run(
                    Sotw::new(node, false),
                    source.target.clone(),
                    type_url.to_string(),
                    rest,
                    refresh,
                    handler,
                    rx,
                ));
            }
        }
        streams.insert(key, tx);
        Ok(())
    }
}
