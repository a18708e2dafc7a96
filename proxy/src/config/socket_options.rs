//! A listener's `socket_options`: raw `setsockopt` calls on its listening
//! socket, before bind, after bind or once listening (`state`), as Envoy
//! makes them. Accepted connections inherit what Linux copies from the
//! listening socket (keepalive settings, for one), as they do in Envoy.

use super::{index, join, ConfigError, Result};
use legate_proto::envoy_types::pb::envoy::config::core::v3::{socket_option, SocketOption};
use std::os::fd::AsRawFd;

/// A new non-blocking listening socket for `addr` (TCP or UDP), address
/// reuse on, IPv6 sockets v6-only, with the pre-bind `opts` already set.
pub fn listening_socket(
    addr: std::net::SocketAddr,
    stream: bool,
    opts: &[SocketOpt],
) -> std::io::Result<socket2::Socket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let (ty, proto) = if stream {
        (socket2::Type::STREAM, socket2::Protocol::TCP)
    } else {
        (socket2::Type::DGRAM, socket2::Protocol::UDP)
    };
    let s = socket2::Socket::new(domain, ty, Some(proto))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    SocketOpt::apply_all(opts, Stage::Prebind, &s, stream, addr.is_ipv6())?;
    Ok(s)
}

/// When an option is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stage {
    Prebind,
    Bound,
    Listening,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SocketOpt {
    level: i32,
    name: i32,
    value: Vec<u8>,
    stage: Stage,
    /// Only on stream (TCP) or only on datagram (UDP) sockets.
    stream_only: Option<bool>,
    /// Only on IPv4 (false) or only on IPv6 (true) sockets.
    v6_only: Option<bool>,
}

pub fn list(opts: &[SocketOption], path: &str) -> Result<Vec<SocketOpt>> {
    opts.iter()
        .enumerate()
        .map(|(i, o)| SocketOpt::from_proto(o, &index(path, "socket_options", i)))
        .collect()
}

impl SocketOpt {
    fn from_proto(o: &SocketOption, path: &str) -> Result<Self> {
        use socket_option::{SocketIpVersion as Ip, SocketState as S, Value};
        let int = |v: i64, f: &str| {
            i32::try_from(v).map_err(|_| ConfigError::new(join(path, f), "out of range"))
        };
        let value = match &o.value {
            Some(Value::IntValue(v)) => int(*v, "int_value")?.to_ne_bytes().to_vec(),
            Some(Value::BufValue(b)) => b.clone(),
            None => {
                return Err(ConfigError::new(
                    join(path, "int_value"),
                    "int_value or buf_value is required",
                ))
            }
        };
        let stage = match S::try_from(o.state) {
            Ok(S::StatePrebind) => Stage::Prebind,
            Ok(S::StateBound) => Stage::Bound,
            Ok(S::StateListening) => Stage::Listening,
            Err(_) => return Err(ConfigError::new(join(path, "state"), "unknown state")),
        };
        let stream_only = match o.r#type.as_ref().map(|t| (t.stream, t.datagram)) {
            Some((Some(_), None)) => Some(true),
            Some((None, Some(_))) => Some(false),
            Some((Some(_), Some(_))) => {
                return Err(ConfigError::new(
                    join(path, "type"),
                    "only one of stream or datagram may be set",
                ))
            }
            _ => None,
        };
        let v6_only = match Ip::try_from(o.ip_version) {
            Ok(Ip::Ipv4) => Some(false),
            Ok(Ip::Ipv6) => Some(true),
            _ => None,
        };
        Ok(Self {
            level: int(o.level, "level")?,
            name: int(o.name, "name")?,
            value,
            stage,
            stream_only,
            v6_only,
        })
    }

    /// Sets the options of `stage` that apply to this kind of socket.
    pub fn apply_all(
        opts: &[SocketOpt],
        stage: Stage,
        sock: &socket2::Socket,
        stream: bool,
        v6: bool,
    ) -> std::io::Result<()> {
        for o in opts.iter().filter(|o| {
            o.stage == stage
                && o.stream_only.is_none_or(|s| s == stream)
                && o.v6_only.is_none_or(|v| v == v6)
        }) {
            o.apply(sock)?;
        }
        Ok(())
    }

    /// A raw setsockopt: the level, name and value are the config's own,
    /// which no typed wrapper can express.
    #[allow(unsafe_code)]
    fn apply(&self, sock: &socket2::Socket) -> std::io::Result<()> {
        // SAFETY: the pointer and length describe `self.value`, which
        // outlives the call; the kernel copies the value.
        let rc = unsafe {
            nix::libc::setsockopt(
                sock.as_raw_fd(),
                self.level,
                self.name,
                self.value.as_ptr().cast(),
                self.value.len() as nix::libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            let e = std::io::Error::last_os_error();
            Err(std::io::Error::new(
                e.kind(),
                format!(
                    "setting socket option (level {}, name {}) failed: {e}",
                    self.level, self.name
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_on_a_listening_socket_reaches_accepted_connections() {
        let json = legate_proto::json::parse_yaml(
            "[{level: 1, name: 9, int_value: 1}, {level: 6, name: 4, int_value: 7, state: STATE_LISTENING}]",
        )
        .unwrap();
        let protos: Vec<SocketOption> = json
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                legate_proto::json::to_message(v.clone(), "envoy.config.core.v3.SocketOption", true)
                    .unwrap()
            })
            .collect();
        let opts = list(&protos, "l").unwrap();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        SocketOpt::apply_all(&opts, Stage::Prebind, &s, true, false).unwrap();
        s.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        s.listen(8).unwrap();
        SocketOpt::apply_all(&opts, Stage::Listening, &s, true, false).unwrap();
        let addr = s.local_addr().unwrap().as_socket().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = s.accept().unwrap();
        assert!(accepted.keepalive().unwrap());
        assert_eq!(accepted.keepalive_time().unwrap().as_secs(), 7);
    }

    #[test]
    fn a_failing_option_is_an_error() {
        let o = SocketOpt {
            level: 12345,
            name: 1,
            value: 1i32.to_ne_bytes().to_vec(),
            stage: Stage::Prebind,
            stream_only: None,
            v6_only: None,
        };
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        assert!(SocketOpt::apply_all(&[o], Stage::Prebind, &s, true, false).is_err());
    }
}
