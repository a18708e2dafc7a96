//! The `tls_inspector` listener filter's parser: is the first flight a TLS
//! ClientHello, and if so which SNI and ALPN does it carry. Pure, over the
//! bytes peeked so far, so it can be property-tested and fuzzed.

/// Envoy's default `max_client_hello_size`.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not enough bytes yet to decide.
    NeedMore,
    /// Not TLS (or not a ClientHello): `raw_buffer`.
    NotTls,
    /// A ClientHello larger than [`MAX_CLIENT_HELLO`]: Envoy closes these.
    TooLarge,
    Tls {
        sni: Option<String>,
        alpn: Vec<String>,
    },
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SNI: u16 = 0;
const EXT_ALPN: u16 = 16;

/// Parses the ClientHello at the start of `buf`, which may span several TLS
/// records.
pub fn parse(buf: &[u8]) -> Hello {
    // Reassemble the handshake message from the records' payloads.
    let mut msg = Vec::new();
    let mut rest = buf;
    loop {
        if rest.is_empty() {
            return Hello::NeedMore;
        }
        if rest[0] != HANDSHAKE {
            return Hello::NotTls;
        }
        if rest.len() < 5 {
            return Hello::NeedMore;
        }
        // SSLv3 framing (major 3) only; SSLv2 hellos are not TLS to Envoy.
        if rest[1] != 3 {
            return Hello::NotTls;
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 {
            return Hello::NotTls;
        }
        let Some(payload) = rest.get(5..5 + len) else {
            return Hello::NeedMore;
        };
        msg.extend_from_slice(payload);
        rest = &rest[5 + len..];
        if msg.len() >= 4 {
            if msg[0] != CLIENT_HELLO {
                return Hello::NotTls;
            }
            let body = u32::from_be_bytes([0, msg[1], msg[2], msg[3]]) as usize;
            if body + 4 > MAX_CLIENT_HELLO {
                return Hello::TooLarge;
            }
            if msg.len() >= body + 4 {
                return match client_hello(&msg[4..4 + body]) {
                    Some((sni, alpn)) => Hello::Tls { sni, alpn },
                    None => Hello::NotTls,
                };
            }
        }
    }
}

/// A cursor over length-prefixed TLS vectors.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

type Found = (Option<String>, Vec<String>);

fn client_hello(body: &[u8]) -> Option<Found> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let (mut sni, mut alpn) = (None, Vec::new());
    if r.0.is_empty() {
        return Some((sni, alpn)); // no extensions at all
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let mut data = Reader(exts.vec16()?);
        match ty {
            EXT_SNI => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    let kind = list.u8()?;
                    let name = list.vec16()?;
                    if kind == 0 && sni.is_none() {
                        sni = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
                    }
                }
            }
            EXT_ALPN => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    alpn.push(String::from_utf8_lossy(list.vec8()?).into_owned());
                }
            }
            _ => {}
        }
    }
    Some((sni, alpn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello, written by rustls.
    fn rustls_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), sni.to_string().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn finds_sni_and_alpn_in_a_real_hello() {
        let h = rustls_hello("Api.Example.com", &["h2", "http/1.1"]);
        assert_eq!(
            parse(&h),
            Hello::Tls {
                sni: Some("api.example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()]
            }
        );
    }

    #[test]
    fn every_prefix_needs_more_and_plaintext_is_not_tls() {
        let h = rustls_hello("a.test", &[]);
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Hello::NeedMore, "prefix {n}");
        }
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(b"PRI * HTTP/2.0\r\n"), Hello::NotTls);
    }

    #[test]
    fn a_hello_split_across_records_is_reassembled() {
        let h = rustls_hello("split.test", &["h2"]);
        let payload = &h[5..];
        let (a, b) = payload.split_at(40);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[22, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(
            parse(&two),
            Hello::Tls {
                sni: Some("split.test".into()),
                alpn: vec!["h2".into()]
            }
        );
    }

    #[test]
    fn oversized_hellos_are_refused() {
        let mut h = vec![22, 3, 1, 0x40, 0x00, CLIENT_HELLO, 0x01, 0x00, 0x00];
        h.resize(5 + 0x4000, 0);
        assert_eq!(parse(&h), Hello::TooLarge);
    }

    proptest::proptest! {
        /// Any bytes: never a panic, and only a handshake record is TLS.
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let r = parse(&b);
            if b.first().is_some_and(|x| *x != HANDSHAKE) {
                proptest::prop_assert_eq!(r, Hello::NotTls);
            }
        }

        /// Corrupting a real hello's bytes never panics either.
        #[test]
        fn mutated_hellos_never_panic(i in 0usize..200, v in proptest::num::u8::ANY) {
            let mut h = rustls_hello("m.test", &["h2"]);
            let i = i % h.len();
            h[i] = v;
            let _ = parse(&h);
        }
    }
}
