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
