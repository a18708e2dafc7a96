//! `http_inspector`: tells HTTP/1.0, HTTP/1.1 and h2c (prior knowledge)
//! apart from the first bytes, for `application_protocols` in filter chain
//! matching. A pure function over the bytes peeked so far.

/// Envoy inspects at most this much before giving up.
pub const MAX_INSPECT: usize = 8192;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, PartialEq, Eq)]
pub enum Inspect {
    NeedMore,
    NotHttp,
    /// `http/1.0`, `http/1.1` or `h2c`, as Envoy names them.
    Found(&'static str),
}

/// RFC 9110 `tchar`: what a method is made of.
fn tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

pub fn inspect(b: &[u8]) -> Inspect {
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Inspect::Found("h2c")
        } else {
            Inspect::NeedMore
        };
    }
    // The method: tokens up to the first space, decided as soon as a byte
    // cannot belong to it (so TLS or binary data is told at once).
    match b.iter().position(|&c| !tchar(c)) {
        None if b.len() < MAX_INSPECT => return Inspect::NeedMore,
        Some(i) if i > 0 && b[i] == b' ' => {}
        _ => return Inspect::NotHttp,
    }
    let window = &b[..b.len().min(MAX_INSPECT)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if b.len() >= MAX_INSPECT {
            Inspect::NotHttp
        } else {
            Inspect::NeedMore
        };
    };
    let line = &b[..end];
    let mut parts = line.split(|&c| c == b' ');
    let (Some(_method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Inspect::NotHttp;
    };
    if target.is_empty() || target.iter().any(|c| c.is_ascii_control()) {
        return Inspect::NotHttp;
    }
    match version {
        b"HTTP/1.1" => Inspect::Found("http/1.1"),
        b"HTTP/1.0" => Inspect::Found("http/1.0"),
        _ => Inspect::NotHttp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tells_the_versions_apart() {
        assert_eq!(
            inspect(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Inspect::Found("http/1.1")
        );
        assert_eq!(
            inspect(b"POST /x?y HTTP/1.0\r\n"),
            Inspect::Found("http/1.0")
        );
        assert_eq!(inspect(H2_PREFACE), Inspect::Found("h2c"));
        assert_eq!(inspect(&H2_PREFACE[..10]), Inspect::NeedMore);
        assert_eq!(inspect(b"GET / HTTP/1.1"), Inspect::NeedMore);
        assert_eq!(inspect(b"GE"), Inspect::NeedMore);
        assert_eq!(inspect(b""), Inspect::NeedMore);
    }

    #[test]
    fn anything_else_is_not_http() {
        for b in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"GET / HTTP/2.0\r\n",
            b"GET /\r\n",
            b"GET  / HTTP/1.1\r\n",
            b" GET / HTTP/1.1\r\n",
            b"hello world\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
        ] {
            assert_eq!(
                inspect(b),
                Inspect::NotHttp,
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        let long = [b"GET /".as_slice(), &[b'a'; MAX_INSPECT]].concat();
        assert_eq!(inspect(&long), Inspect::NotHttp);
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = inspect(&b);
        }
    }
}
