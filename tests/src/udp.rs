//! UDP upstreams and clients for the UDP proxy's tests.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

/// An upstream that answers each datagram with `<name>:<datagram>`;
/// `size:N` is answered with N bytes, `quiet` not at all.
pub fn naming_echo(sock: UdpSocket, name: impl Into<String>) {
    let name = name.into();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let answer = if let Some(size) = text.strip_prefix("size:") {
                vec![b'x'; size.parse().unwrap_or(0)]
            } else if text == "quiet" {
                continue;
            } else {
                format!("{name}:{text}").into_bytes()
            };
            let _ = sock.send_to(&answer, from);
        }
    });
}

/// Binds `n` naming upstreams on loopback: their addresses.
pub fn naming_echoes(names: &[&'static str]) -> std::io::Result<Vec<SocketAddr>> {
    names
        .iter()
        .map(|name| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            let a = s.local_addr()?;
            naming_echo(s, *name);
            Ok(a)
        })
        .collect()
}

/// A client socket connected to `to`: it takes replies only from there.
pub fn client(to: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(if to.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    })?;
    s.connect(to)?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(s)
}

/// Sends `payload` and returns the reply (a long one as `<N bytes>`), or
/// `none` when nothing came back in time.
pub fn ask(s: &UdpSocket, payload: &[u8]) -> String {
    if s.send(payload).is_err() {
        return "send failed".into();
    }
    let mut buf = vec![0u8; 65536];
    match s.recv(&mut buf) {
        Ok(n) if n > 64 => format!("<{n} bytes>"),
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => "none".into(),
    }
}

/// The upstream's name in a reply (`a:ping` is `a`).
pub fn host_of(reply: &str) -> &str {
    reply.split(':').next().unwrap_or(reply)
}
