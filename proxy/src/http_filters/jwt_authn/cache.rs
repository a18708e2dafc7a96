//! `jwt_cache_config`: tokens a provider verified, kept (least recently
//! used first out) so that a token seen again skips its signature check.
//! Every other check still runs on a hit, as in Envoy.

use super::token::Jwt;
use legate_proto::envoy_types::pb::envoy::extensions::filters::http::jwt_authn::v3 as pb;

use std::sync::{Arc, Mutex};

const DEFAULT_SIZE: usize = 100;
const DEFAULT_MAX_TOKEN: usize = 4096;

#[derive(Debug)]
pub struct TokenCache {
    max_token: usize,
    /// Entries kept; the map grows to it as tokens come, rather than being
    /// allocated whole from a configured size.
    size: usize,
    tokens: Mutex<lru::LruCache<String, Arc<Jwt>>>,
}

impl TokenCache {
    pub fn new(c: &pb::JwtCacheConfig) -> TokenCache {
        let size = match c.jwt_cache_size {
            0 => DEFAULT_SIZE,
            n => n as usize,
        };
        TokenCache {
            max_token: match c.jwt_max_token_size {
                0 => DEFAULT_MAX_TOKEN,
                n => n as usize,
            },
            size: size.max(1),
            tokens: Mutex::new(lru::LruCache::unbounded()),
        }
    }

    /// A verified token, unless it has expired since (then it is
    /// dropped; the expiry check allows Envoy's default 60 s of skew).
    pub fn lookup(&self, token: &str, now: u64) -> Option<Arc<Jwt>> {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let jwt = t.get(token)?.clone();
        if jwt.check_time(now, 60) == Err(super::status::Status::JwtExpired) {
            t.pop(token);
            return None;
        }
        Some(jwt)
    }

    pub fn insert(&self, token: &str, jwt: Arc<Jwt>) {
        if token.len() <= self.max_token {
            let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            t.put(token.to_string(), jwt);
            while t.len() > self.size {
                t.pop_lru();
            }
        }
    }
}
