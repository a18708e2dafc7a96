//! Envoy's tracing decision for a request, as its UUID request id
//! extension makes it: a stable value from the request id's first eight hex
//! digits, the reason already packed in the id (its 15th character), then
//! `x-client-trace-id` (client sampling), `x-envoy-force-trace`, random
//! sampling, and last overall sampling. A changed reason is packed back
//! into the id, so the next hop sees it.

use super::config::Sampling;
use pingora_http::RequestHeader;

/// Why a request is (or is not) traced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    NotTraceable,
    Sampling,
    ServiceForced,
    ClientForced,
}

impl Reason {
    pub fn traced(self) -> bool {
        self != Reason::NotTraceable
    }

    /// The character the UUID extension packs at position 14.
    fn mark(self) -> u8 {
        match self {
            Reason::NotTraceable => b'4',
            Reason::Sampling => b'9',
            Reason::ServiceForced => b'a',
            Reason::ClientForced => b'b',
        }
    }

    fn of_mark(c: u8) -> Self {
        match c {
            b'9' => Reason::Sampling,
            b'a' => Reason::ServiceForced,
            b'b' => Reason::ClientForced,
            _ => Reason::NotTraceable,
        }
    }
}

/// The UUID extension's options.
#[derive(Debug, Clone, Copy)]
pub struct IdOptions {
    /// `pack_trace_reason` (default true).
    pub pack: bool,
    /// `use_request_id_for_trace_sampling` (default true).
    pub sample_by_id: bool,
}

impl Default for IdOptions {
    fn default() -> Self {
        Self {
            pack: true,
            sample_by_id: true,
        }
    }
}

/// Decides, and packs the reason into `x-request-id`. `random` is a fresh
/// random value (client sampling uses it, not the stable one).
pub fn decide(s: &Sampling, id: IdOptions, req: &mut RequestHeader, random: u64) -> Reason {
    if !id.sample_by_id {
        return Reason::Sampling;
    }
    let Some(mut rid) = req
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.as_bytes().to_vec())
    else {
        return Reason::NotTraceable;
    };
    let Some(stable) = rid
        .get(..8)
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| u64::from_str_radix(h, 16).ok())
    else {
        return Reason::NotTraceable;
    };
    let result = stable % 10_000;
    let uuid = rid.len() == 36;
    // A mark is read only where marks are written (pack_trace_reason).
    let mut reason = if uuid && id.pack {
        Reason::of_mark(rid[14])
    } else {
        Reason::NotTraceable
    };
    let before = reason;
    if reason == Reason::NotTraceable {
        if req.headers.contains_key("x-client-trace-id") && s.client.admits(random) {
            reason = Reason::ClientForced;
        } else if req.headers.contains_key("x-envoy-force-trace") {
            reason = Reason::ServiceForced;
        } else if s.random.admits(result) {
            reason = Reason::Sampling;
        }
    }
    if reason != Reason::NotTraceable && !s.overall.admits(result) {
        reason = Reason::NotTraceable;
    }
    if reason != before && id.pack && uuid {
        rid[14] = reason.mark();
        if let Ok(v) = String::from_utf8(rid) {
            let _ = req.insert_header("x-request-id", v);
        }
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::super::config::Fraction;
    use super::*;

    fn sampling(random: u64, overall: u64) -> Sampling {
        Sampling {
            client: Fraction::ALL,
            random: Fraction {
                numerator: random,
                denominator: 10_000,
            },
            overall: Fraction {
                numerator: overall,
                denominator: 10_000,
            },
        }
    }

    fn req(id: &str, extra: &[&str]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.insert_header("x-request-id", id).unwrap();
        for h in extra {
            r.insert_header(h.to_string(), "1").unwrap();
        }
        r
    }

    fn id_of(r: &RequestHeader) -> &str {
        r.headers["x-request-id"].to_str().unwrap()
    }

    #[test]
    fn the_stable_value_is_the_ids_first_eight_hex_digits() {
        // 0x00000fa0 = 4000: sampled at 40.01 %, not at 40 %.
        let id = "00000fa0-0000-4000-8000-000000000000";
        let mut r = req(id, &[]);
        assert_eq!(
            decide(&sampling(4001, 10_000), IdOptions::default(), &mut r, 0),
            Reason::Sampling
        );
        assert_eq!(id_of(&r), "00000fa0-0000-9000-8000-000000000000");
        let mut r = req(id, &[]);
        assert_eq!(
            decide(&sampling(4000, 10_000), IdOptions::default(), &mut r, 0),
            Reason::NotTraceable
        );
        assert_eq!(id_of(&r), id, "unchanged: nothing to pack");
    }

    #[test]
    fn overall_sampling_takes_back_a_sampled_request() {
        let mut r = req("00000001-0000-9000-8000-000000000000", &[]);
        assert_eq!(
            decide(&sampling(10_000, 0), IdOptions::default(), &mut r, 0),
            Reason::NotTraceable
        );
        assert_eq!(id_of(&r), "00000001-0000-4000-8000-000000000000");
    }

    #[test]
    fn forced_and_client_traces_and_ids_that_are_not_uuids() {
        let mut r = req(
            "00000001-0000-4000-8000-000000000000",
            &["x-envoy-force-trace"],
        );
        assert_eq!(
            decide(&sampling(0, 10_000), IdOptions::default(), &mut r, 0),
            Reason::ServiceForced
        );
        assert_eq!(&id_of(&r)[14..15], "a");
        let mut r = req(
            "00000001-0000-4000-8000-000000000000",
            &["x-client-trace-id"],
        );
        assert_eq!(
            decide(&sampling(0, 10_000), IdOptions::default(), &mut r, 0),
            Reason::ClientForced
        );
        assert_eq!(&id_of(&r)[14..15], "b");
        let mut r = req("00000001-not-a-uuid", &[]);
        assert_eq!(
            decide(&sampling(10_000, 10_000), IdOptions::default(), &mut r, 0),
            Reason::Sampling
        );
        assert_eq!(
            id_of(&r),
            "00000001-not-a-uuid",
            "only a 36-character id is rewritten"
        );
        let mut r = req("zzzz", &[]);
        assert_eq!(
            decide(&sampling(10_000, 10_000), IdOptions::default(), &mut r, 0),
            Reason::NotTraceable
        );
    }
}
