//! Plain TCP upstreams for `tcp_proxy` tests and the conformance `l4`
//! tier: one answers with what it received, one with its name. Threads,
//! not tasks, so they serve the same from a test runtime, a harness
//! thread or inside a network namespace.

use std::io::{Read, Write};
use std::net::TcpListener;

/// FNV-1a over a byte stream: a transfer's checksum on both ends.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn feed(&mut self, b: &[u8]) {
        for x in b {
            self.0 = (self.0 ^ *x as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// What [`counting_upstream`] answers to `len` bytes summed into `sum`:
/// `"<bytes> <checksum>"`.
pub fn answer(len: u64, sum: Fnv) -> String {
    format!("{len} {:016x}", sum.0)
}

/// The answer for a payload sent whole.
pub fn answer_for(payload: &[u8]) -> String {
    let mut f = Fnv::default();
    f.feed(payload);
    answer(payload.len() as u64, f)
}

/// Reads until the client's half-close (streaming, so any size fits), then
/// answers "<bytes> <checksum>" and closes.
pub fn counting_upstream(l: TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let (mut n, mut f, mut buf) = (0u64, Fnv::default(), vec![0u8; 256 * 1024]);
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k as u64;
                            f.feed(&buf[..k]);
                        }
                    }
                }
                let _ = s.write_all(answer(n, f).as_bytes());
            });
        }
    });
}

/// Writes its name and closes.
pub fn naming_upstream(l: TcpListener, name: &'static str) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            let _ = s.write_all(name.as_bytes());
        }
    });
}

/// Sends back every byte it reads, and passes the client's half-close on
/// once all is sent back.
pub fn echo_upstream(l: TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            if s.write_all(&buf[..k]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// Sends `after` bytes, then resets the connection (linger 0, then close).
/// It first waits 200 ms, so the proxy has seen its connect succeed: a
/// reset racing the connect is a connect failure instead.
pub fn resetting_upstream(l: TcpListener, after: usize) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::sleep(std::time::Duration::from_millis(200));
            let _ = s.write_all(&vec![b'x'; after]);
            let _ = socket2::SockRef::from(&s).set_linger(Some(std::time::Duration::ZERO));
        }
    });
}

/// Sends `len` patterned bytes while reading what comes back on another
/// thread (an echoing upstream needs both at once), then half-closes.
/// Returns `"<bytes> <checksum>"` of what came back, or what failed.
pub fn echo_through(port: u16, len: usize) -> String {
    let s = match std::net::TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => return format!("connect failed: {e}"),
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let _ = s.set_write_timeout(Some(std::time::Duration::from_secs(30)));
    let mut r = s.try_clone().expect("a second handle on the socket");
    let reader = std::thread::spawn(move || {
        let (mut n, mut f, mut buf) = (0u64, Fnv::default(), vec![0u8; 256 * 1024]);
        loop {
            match r.read(&mut buf) {
                Ok(0) => return answer(n, f),
                Ok(k) => {
                    n += k as u64;
                    f.feed(&buf[..k]);
                }
                Err(e) => return format!("read failed after {n} bytes: {:?}", e.kind()),
            }
        }
    });
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let mut w = &s;
    let mut left = len;
    while left > 0 {
        let k = left.min(chunk.len());
        if let Err(e) = w.write_all(&chunk[..k]) {
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = reader.join();
            return format!("write failed after {} bytes: {:?}", len - left, e.kind());
        }
        left -= k;
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    reader.join().unwrap_or_else(|_| "reader panicked".into())
}

/// What a client that sends nothing sees, reading to the end:
/// `"fin after N bytes"`, or `"reset"` (how many bytes came before the
/// reset depends on when it overtook them).
pub fn read_outcome(port: u16) -> String {
    let mut s = match std::net::TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => return format!("connect failed: {e}"),
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let (mut n, mut buf) = (0usize, vec![0u8; 64 * 1024]);
    loop {
        match s.read(&mut buf) {
            Ok(0) => return format!("fin after {n} bytes"),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return "reset".into(),
            Err(e) => return format!("{:?} after {n} bytes", e.kind()),
        }
    }
}
