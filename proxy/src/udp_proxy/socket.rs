//! The listener's UDP socket: datagrams are read with the address they
//! were sent to (`IP_PKTINFO` / `IPV6_RECVPKTINFO`), and replies leave from
//! that address, so a listener on a wildcard address answers from the
//! address the client dialled, as Envoy's does.

use crate::config::socket_options::{SocketOpt, Stage};
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// One datagram as read from the listener.
pub struct Received {
    pub len: usize,
    pub peer: SocketAddr,
    /// Where the client sent it: the destination address and the
    /// listener's port.
    pub local: SocketAddr,
    /// Longer than the buffer: the kernel cut it short.
    pub truncated: bool,
}

/// Binds a listener's socket with packet info on.
pub fn bind(addr: SocketAddr, opts: &[SocketOpt]) -> std::io::Result<std::net::UdpSocket> {
    let s = crate::config::socket_options::listening_socket(addr, false, opts)?;
    if addr.is_ipv6() {
        setsockopt(&s, sockopt::Ipv6RecvPacketInfo, &true)?;
    } else {
        setsockopt(&s, sockopt::Ipv4PacketInfo, &true)?;
    }
    s.bind(&addr.into())?;
    // A UDP socket does not listen: Envoy sets listening-stage options
    // once it is bound too.
    SocketOpt::apply_all(opts, Stage::Bound, &s, false, addr.is_ipv6())?;
    SocketOpt::apply_all(opts, Stage::Listening, &s, false, addr.is_ipv6())?;
    Ok(s.into())
}

/// Reads one datagram into `buf`.
pub async fn recv(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Received> {
    let port = sock.local_addr()?.port();
    let fallback = sock.local_addr()?;
    let cap = buf.len();
    sock.async_io(Interest::READABLE, || {
        let mut iov = [IoSliceMut::new(buf)];
        // Room for more than the packet info: socket_options may turn on
        // other control messages (timestamps, TOS), which must not truncate
        // it.
        let mut cmsg = vec![0u8; 256];
        let msg = recvmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_TRUNC,
        )
        .map_err(std::io::Error::from)?;
        let peer = msg
            .address
            .as_ref()
            .and_then(to_std)
            .ok_or_else(|| std::io::Error::other("a datagram without a source address"))?;
        let mut local = fallback;
        // Truncated control data (MSG_CTRUNC): the bound address stands.
        for c in msg.cmsgs().into_iter().flatten() {
            match c {
                ControlMessageOwned::Ipv4PacketInfo(i) => {
                    let ip = std::net::Ipv4Addr::from(u32::from_be(i.ipi_addr.s_addr));
                    local = SocketAddr::new(IpAddr::V4(ip), port);
                }
                ControlMessageOwned::Ipv6PacketInfo(i) => {
                    let ip = std::net::Ipv6Addr::from(i.ipi6_addr.s6_addr);
                    local = SocketAddr::new(IpAddr::V6(ip), port);
                }
                _ => {}
            }
        }
        Ok(Received {
            len: msg.bytes.min(cap),
            truncated: msg.bytes > cap || msg.flags.contains(MsgFlags::MSG_TRUNC),
            peer,
            local,
        })
    })
    .await
}

/// Sends `data` to `peer` from `local` (the address the session's client
/// sent to). Does not wait for room: a full socket buffer is an error, as
/// in Envoy, which drops the datagram. The socket is non-blocking and sent
/// on directly: tokio's `try_*` calls refuse until the reactor has seen the
/// socket writable, which would drop a new socket's first datagrams.
pub fn send_from(
    sock: &UdpSocket,
    data: &[u8],
    local: SocketAddr,
    peer: SocketAddr,
) -> std::io::Result<usize> {
    let iov = [IoSlice::new(data)];
    let to = SockaddrStorage::from(peer);
    {
        let r = match local.ip() {
            IpAddr::V4(ip) if !ip.is_unspecified() => {
                let info = nix::libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: nix::libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: nix::libc::in_addr { s_addr: 0 },
                };
                sendmsg(
                    sock.as_raw_fd(),
                    &iov,
                    &[ControlMessage::Ipv4PacketInfo(&info)],
                    MsgFlags::empty(),
                    Some(&to),
                )
            }
            IpAddr::V6(ip) if !ip.is_unspecified() => {
                let info = nix::libc::in6_pktinfo {
                    ipi6_addr: nix::libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                sendmsg(
                    sock.as_raw_fd(),
                    &iov,
                    &[ControlMessage::Ipv6PacketInfo(&info)],
                    MsgFlags::empty(),
                    Some(&to),
                )
            }
            _ => sendmsg(sock.as_raw_fd(), &iov, &[], MsgFlags::empty(), Some(&to)),
        };
        r.map_err(std::io::Error::from)
    }
}

/// Sends on a connected non-blocking socket (see [`send_from`] for why not
/// through tokio).
pub fn send(sock: &UdpSocket, data: &[u8]) -> std::io::Result<usize> {
    nix::sys::socket::send(sock.as_raw_fd(), data, MsgFlags::empty()).map_err(std::io::Error::from)
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reply_leaves_from_the_address_the_client_dialled() {
        // Bound to the wildcard: 127.0.0.2 (on lo) must answer as itself,
        // or a connected client drops the reply.
        let l = UdpSocket::from_std(bind("0.0.0.0:0".parse().unwrap(), &[]).unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(("127.0.0.2", port)).unwrap();
        client.send(b"ping").unwrap();
        let mut buf = [0u8; 2];
        let r = recv(&l, &mut buf).await.unwrap();
        assert_eq!(r.local, SocketAddr::from(([127, 0, 0, 2], port)));
        assert_eq!(r.peer, client.local_addr().unwrap());
        assert!(r.truncated, "4 bytes into 2 is cut short");
        send_from(&l, b"pong", r.local, r.peer).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut got = [0u8; 8];
        let n = client.recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"pong");
    }
}
