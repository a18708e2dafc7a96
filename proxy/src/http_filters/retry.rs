//! A side call's `retry_policy` (`envoy.config.core.v3.RetryPolicy`), as
//! Envoy turns it into a route retry policy for its async client: JWKS
//! fetches and ext_authz HTTP checks use it.

use crate::config::{join, ConfigError, Result};
use std::time::Duration;

/// `retry_policy`: Envoy turns it into a route retry policy whose
/// `retry_on` defaults to `5xx,gateway-error,connect-failure,reset`, with
/// jittered exponential back-off (1 s base, ten times that at most, unless
/// set). The fetch's `timeout` covers every attempt.
#[derive(Debug, Clone)]
pub struct Retry {
    pub num_retries: u32,
    base: Duration,
    max: Duration,
    on_5xx: bool,
    on_gateway: bool,
    on_connect: bool,
    on_reset: bool,
    /// gRPC status codes retried (`cancelled` 1, `deadline-exceeded` 4,
    /// `resource-exhausted` 8, `internal` 13, `unavailable` 14): they match
    /// only gRPC answers.
    grpc_codes: Vec<i32>,
}

impl Retry {
    /// `what`: the calls retried, for the error naming an unsupported
    /// condition. gRPC status conditions (`unavailable`, ...) match only
    /// gRPC answers: on plain HTTP calls they never retry.
    pub fn from_proto(
        p: &legate_proto::envoy_types::pb::envoy::config::core::v3::RetryPolicy,
        path: &str,
        what: &str,
    ) -> Result<Retry> {
        use crate::config::Wrapped;
        let on = if p.retry_on.is_empty() {
            "5xx,gateway-error,connect-failure,reset"
        } else {
            p.retry_on.as_str()
        };
        let mut r = Retry {
            num_retries: p.num_retries.val().unwrap_or(1),
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
            on_5xx: false,
            on_gateway: false,
            on_connect: false,
            on_reset: false,
            grpc_codes: Vec::new(),
        };
        for c in on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match c {
                "5xx" => r.on_5xx = true,
                "gateway-error" => r.on_gateway = true,
                "connect-failure" => r.on_connect = true,
                "reset" => r.on_reset = true,
                "cancelled" => r.grpc_codes.push(1),
                "deadline-exceeded" => r.grpc_codes.push(4),
                "resource-exhausted" => r.grpc_codes.push(8),
                "internal" => r.grpc_codes.push(13),
                "unavailable" => r.grpc_codes.push(14),
                other => {
                    return Err(ConfigError::new(
                        join(path, "retry_on"),
                        format!("'{other}' is not supported for {what}"),
                    ))
                }
            }
        }
        if let Some(b) = &p.retry_back_off {
            let bp = join(path, "retry_back_off");
            if let Some(d) = &b.base_interval {
                r.base = crate::config::duration(d, &join(&bp, "base_interval"))?;
                r.max = r.base.saturating_mul(10);
            }
            if let Some(d) = &b.max_interval {
                r.max = crate::config::duration(d, &join(&bp, "max_interval"))?;
            }
            // Envoy's bounds: a base of at least 1 ms, a max no smaller.
            if r.base < Duration::from_millis(1) {
                return Err(ConfigError::new(
                    join(&bp, "base_interval"),
                    "must be at least 1ms",
                ));
            }
            if r.max < r.base {
                return Err(ConfigError::new(
                    join(&bp, "max_interval"),
                    "must be at least base_interval",
                ));
            }
        }
        Ok(r)
    }

    /// Whether a failed attempt is retried: a 5xx status (502-504 for
    /// gateway-error), or a connection that failed or was reset (which
    /// `5xx` and `gateway-error` cover too, as in Envoy).
    pub fn retries(&self, f: &Failure) -> bool {
        match f {
            Failure::Status(s) => {
                (self.on_5xx && *s >= 500) || (self.on_gateway && matches!(s, 502..=504))
            }
            Failure::Connect => self.on_connect || self.on_5xx || self.on_gateway,
            Failure::Reset => self.on_reset || self.on_5xx || self.on_gateway,
            Failure::Grpc(code) => self.grpc_codes.contains(code),
            Failure::Unusable => false,
        }
    }

    /// The longest back-off: Envoy's async client also takes it as the
    /// per-try timeout of a side call with a retry policy.
    pub fn max_interval(&self) -> Duration {
        self.max
    }

    /// The back-off before retry `n` (from 0): a random share of
    /// `base * 2^n`, at most `max`.
    pub fn backoff(&self, n: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << n.min(20))
            .min(self.max)
            .as_millis() as u64;
        // At least 1 ms: a retry never follows a failure at once.
        Duration::from_millis((rand::random::<u64>() % ceiling.max(1)).max(1))
    }
}

/// Why one attempt failed.
pub enum Failure {
    Status(u16),
    /// A gRPC answer with this non-OK status code.
    Grpc(i32),
    Connect,
    Reset,
    /// A 200 whose body is no usable JWKS, or no host: not retried.
    Unusable,
}
