//! The `local_ratelimit` network filter: a token bucket over new
//! connections. Each connection takes a token; with none left it is closed
//! at once. Refills are discrete, `tokens_per_fill` every `fill_interval`,
//! up to `max_tokens`, as Envoy's timer-driven bucket.

use super::{join, ConfigError, Result, Wrapped};
use legate_proto::envoy_types::pb::envoy::extensions::filters::network::local_ratelimit::v3 as pb;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const LOCAL_RATELIMIT_TYPE: &str =
    "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit";

#[derive(Debug)]
pub struct LocalRateLimit {
    pub stat_prefix: String,
    max: u64,
    per_fill: u64,
    interval: Duration,
    /// (tokens, when the last fill happened).
    bucket: Mutex<(u64, Instant)>,
}

impl LocalRateLimit {
    pub fn from_proto(l: &pb::LocalRateLimit, path: &str) -> Result<Self> {
        if l.stat_prefix.is_empty() {
            return Err(ConfigError::new(
                join(path, "stat_prefix"),
                "stat_prefix is required",
            ));
        }
        if l.runtime_enabled.is_some() {
            return Err(ConfigError::new(
                join(path, "runtime_enabled"),
                "runtime switches for filters are not supported",
            ));
        }
        if !l.share_key.is_empty() {
            return Err(ConfigError::new(
                join(path, "share_key"),
                "sharing a bucket between filters is not supported",
            ));
        }
        let tb = l.token_bucket.as_ref().ok_or_else(|| {
            ConfigError::new(join(path, "token_bucket"), "token_bucket is required")
        })?;
        let tp = join(path, "token_bucket");
        if tb.max_tokens == 0 {
            return Err(ConfigError::new(
                join(&tp, "max_tokens"),
                "must be at least 1",
            ));
        }
        let interval = tb.fill_interval.as_ref().ok_or_else(|| {
            ConfigError::new(join(&tp, "fill_interval"), "fill_interval is required")
        })?;
        let interval = super::duration(interval, &join(&tp, "fill_interval"))?;
        // Envoy's own floor for connection buckets.
        if interval < Duration::from_millis(50) {
            return Err(ConfigError::new(
                join(&tp, "fill_interval"),
                "fill_interval must be at least 50ms",
            ));
        }
        Ok(Self {
            stat_prefix: l.stat_prefix.clone(),
            max: tb.max_tokens as u64,
            per_fill: tb.tokens_per_fill.val().unwrap_or(1) as u64,
            interval,
            bucket: Mutex::new((tb.max_tokens as u64, Instant::now())),
        })
    }

    /// Takes a token for a new connection at `now`; false: rate limited.
    pub fn try_take(&self, now: Instant) -> bool {
        let mut b = self.bucket.lock().unwrap();
        let fills =
            (now.saturating_duration_since(b.1).as_nanos() / self.interval.as_nanos()) as u64;
        if fills > 0 {
            b.0 = (b.0 + fills.saturating_mul(self.per_fill)).min(self.max);
            b.1 += self.interval * fills.min(u32::MAX as u64) as u32;
        }
        if b.0 == 0 {
            return false;
        }
        b.0 -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_then_refills_in_steps_up_to_the_max() {
        let l = pb::LocalRateLimit {
            stat_prefix: "p".into(),
            token_bucket: Some(
                legate_proto::envoy_types::pb::envoy::r#type::v3::TokenBucket {
                    max_tokens: 3,
                    tokens_per_fill: Some(crate::config::wkt::UInt32Value { value: 2 }),
                    fill_interval: Some(crate::config::wkt::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                },
            ),
            ..Default::default()
        };
        let r = LocalRateLimit::from_proto(&l, "f").unwrap();
        let t0 = r.bucket.lock().unwrap().1;
        assert!((0..3).all(|_| r.try_take(t0)));
        assert!(!r.try_take(t0 + Duration::from_millis(999)));
        // One fill: two tokens.
        let t1 = t0 + Duration::from_millis(1000);
        assert!(r.try_take(t1) && r.try_take(t1) && !r.try_take(t1));
        // Ten fills later the bucket holds its max, no more.
        let t2 = t1 + Duration::from_secs(10);
        assert!((0..3).all(|_| r.try_take(t2)));
        assert!(!r.try_take(t2));
    }

    #[test]
    fn short_intervals_are_refused() {
        let l = pb::LocalRateLimit {
            stat_prefix: "p".into(),
            token_bucket: Some(
                legate_proto::envoy_types::pb::envoy::r#type::v3::TokenBucket {
                    max_tokens: 1,
                    tokens_per_fill: None,
                    fill_interval: Some(crate::config::wkt::Duration {
                        seconds: 0,
                        nanos: 10_000_000,
                    }),
                },
            ),
            ..Default::default()
        };
        let e = LocalRateLimit::from_proto(&l, "f").unwrap_err();
        assert_eq!(e.path, "f.token_bucket.fill_interval");
    }
}
