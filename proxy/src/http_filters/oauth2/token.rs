//! Calls to the token endpoint: the authorization code and the refresh
//! token exchanged for tokens, in the forms Envoy's OAuth client sends,
//! and the answer read as Envoy reads it.

use super::config::{AuthType, Config, TokenEndpoint};
use super::crypto::form_encode;
use crate::cluster_manager::ClusterManager;

/// What the token endpoint gave.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tokens {
    pub access: String,
    pub id: String,
    pub refresh: String,
    pub expires_in: u64,
}

/// Why an exchange failed, in Envoy's words (its response details).
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("Token endpoint cluster not found")]
    NoCluster,
    /// The call failed (no connection, a reset, the timeout).
    #[error("Failed to get access token due to HTTP request failure")]
    Transport,
    #[error("Failed to get access token: response code: {0}, response body: {1}")]
    Status(u16, String),
    #[error(
        "Failed to parse oauth response body: response body: {0}, exception: not a token response"
    )]
    Parse(String),
    #[error("No access token found in the token exchange response: response body: {0}")]
    NoAccessToken(String),
    #[error("No default or explicit access token expiration found in the token exchange response: response body: {0}")]
    NoExpiry(String),
}

impl ExchangeError {
    /// Whether the exchange itself failed (a refresh then sends the user
    /// to log in again) rather than its answer being unusable.
    pub fn is_call_failure(&self) -> bool {
        matches!(self, Self::Transport | Self::Status(..))
    }
}

/// What a request to the token endpoint asks.
pub enum Grant<'a> {
    Code {
        code: &'a str,
        redirect_uri: &'a str,
        verifier: &'a str,
    },
    Refresh {
        token: &'a str,
    },
}

/// The form body for `grant` and the Basic credentials, if sent that way.
pub fn form(c: &Config, secret: &str, grant: &Grant<'_>) -> (String, Option<String>) {
    let id = form_encode(&c.client_id);
    let s = form_encode(secret);
    let basic = (c.auth_type == AuthType::BasicAuth).then(|| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{secret}", c.client_id))
    });
    let body = match (grant, c.auth_type) {
        (
            Grant::Code {
                code,
                redirect_uri,
                verifier,
            },
            t,
        ) => {
            let cb = form_encode(redirect_uri);
            match t {
                AuthType::UrlEncodedBody => format!("grant_type=authorization_code&code={code}&client_id={id}&client_secret={s}&redirect_uri={cb}&code_verifier={verifier}"),
                AuthType::BasicAuth => format!("grant_type=authorization_code&code={code}&redirect_uri={cb}&code_verifier={verifier}"),
                AuthType::TlsClientAuth => format!("grant_type=authorization_code&code={code}&client_id={id}&redirect_uri={cb}&code_verifier={verifier}"),
            }
        }
        (Grant::Refresh { token }, t) => {
            let rt = form_encode(token);
            match t {
                AuthType::UrlEncodedBody => format!(
                    "grant_type=refresh_token&refresh_token={rt}&client_id={id}&client_secret={s}"
                ),
                AuthType::BasicAuth => format!("grant_type=refresh_token&refresh_token={rt}"),
                AuthType::TlsClientAuth => {
                    format!("grant_type=refresh_token&refresh_token={rt}&client_id={id}")
                }
            }
        }
    };
    (body, basic)
}

/// Sends `grant` and reads the tokens, retrying as `retry_policy` says.
pub async fn exchange(
    c: &Config,
    clusters: &ClusterManager,
    secret: &str,
    grant: &Grant<'_>,
) -> Result<Tokens, ExchangeError> {
    let ep = c.token.as_ref().ok_or(ExchangeError::NoCluster)?;
    if clusters.get(&ep.cluster).is_none() {
        return Err(ExchangeError::NoCluster);
    }
    let (body, basic) = form(c, secret, grant);
    // With a retry policy each try has its own timeout (the longest
    // back-off, as Envoy's async client sets it); the whole exchange has
    // the endpoint's.
    let per_try = c
        .retry
        .as_ref()
        .map_or(ep.timeout, |r| r.max_interval().min(ep.timeout));
    let work = attempts(c, ep, clusters, &body, basic.as_deref(), per_try);
    let (status, answer) = tokio::time::timeout(ep.timeout, work)
        .await
        .map_err(|_| ExchangeError::Transport)??;
    let text = String::from_utf8_lossy(&answer).into_owned();
    if status != 200 {
        return Err(ExchangeError::Status(status, text));
    }
    parse(&text, c.default_expires_in)
}

async fn attempts(
    c: &Config,
    ep: &TokenEndpoint,
    clusters: &ClusterManager,
    body: &str,
    basic: Option<&str>,
    per_try: std::time::Duration,
) -> Result<(u16, bytes::Bytes), ExchangeError> {
    let mut n = 0;
    loop {
        let attempt = call(ep, clusters, body, basic, per_try).await;
        let failure = match &attempt {
            Ok((s, _)) => crate::http_filters::retry::Failure::Status(*s),
            Err(crate::http_filters::side::CallError::Connect(..))
            | Err(crate::http_filters::side::CallError::NoHost(_)) => {
                crate::http_filters::retry::Failure::Connect
            }
            Err(_) => crate::http_filters::retry::Failure::Reset,
        };
        match &c.retry {
            Some(r) if n < r.num_retries && r.retries(&failure) => {
                tokio::time::sleep(r.backoff(n)).await;
                n += 1;
            }
            _ => return attempt.map_err(|_| ExchangeError::Transport),
        }
    }
}

async fn call(
    ep: &TokenEndpoint,
    clusters: &ClusterManager,
    body: &str,
    basic: Option<&str>,
    per_try: std::time::Duration,
) -> Result<(u16, bytes::Bytes), crate::http_filters::side::CallError> {
    // As Envoy's async client through its router: the timeout it expects
    // and the internal mark.
    let mut b = http::Request::post(ep.uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len().to_string())
        .header(
            "x-envoy-expected-rq-timeout-ms",
            per_try.as_millis().to_string(),
        )
        .header("x-envoy-internal", "true");
    if let Some(basic) = basic {
        b = b.header(http::header::AUTHORIZATION, format!("Basic {basic}"));
    }
    let req = b.body(bytes::Bytes::from(body.to_string()))?;
    crate::http_filters::side::http_request(clusters, &ep.cluster, &ep.uri, req, per_try).await
}

/// A token response: `access_token` required, `expires_in` a number or a
/// numeric string (else `default_expires_in`), unknown fields ignored.
pub fn parse(body: &str, default_expires_in: u64) -> Result<Tokens, ExchangeError> {
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|_| ExchangeError::Parse(body.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ExchangeError::Parse(body.to_string()))?;
    let string = |k: &str| -> Result<String, ExchangeError> {
        match obj.get(k) {
            None | Some(serde_json::Value::Null) => Ok(String::new()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(ExchangeError::Parse(body.to_string())),
        }
    };
    let access = match obj.get("access_token") {
        None | Some(serde_json::Value::Null) => {
            return Err(ExchangeError::NoAccessToken(body.to_string()))
        }
        _ => string("access_token")?,
    };
    let expires_in = match obj.get("expires_in") {
        None | Some(serde_json::Value::Null) => default_expires_in,
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| ExchangeError::Parse(body.to_string()))?,
        Some(serde_json::Value::String(s)) => s
            .parse()
            .map_err(|_| ExchangeError::Parse(body.to_string()))?,
        Some(_) => return Err(ExchangeError::Parse(body.to_string())),
    };
    if expires_in == 0 {
        return Err(ExchangeError::NoExpiry(body.to_string()));
    }
    Ok(Tokens {
        access,
        id: string("id_token")?,
        refresh: string("refresh_token")?,
        expires_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_answers_as_envoy_reads_them() {
        let t = parse(
            r#"{"access_token":"a","expires_in":"30","token_type":"Bearer","id_token":"i"}"#,
            0,
        )
        .unwrap();
        assert_eq!(
            (t.access.as_str(), t.id.as_str(), t.expires_in),
            ("a", "i", 30)
        );
        assert!(matches!(
            parse(r#"{"expires_in":5}"#, 0),
            Err(ExchangeError::NoAccessToken(_))
        ));
        assert!(matches!(
            parse(r#"{"access_token":"a"}"#, 0),
            Err(ExchangeError::NoExpiry(_))
        ));
        assert_eq!(parse(r#"{"access_token":"a"}"#, 9).unwrap().expires_in, 9);
        assert!(matches!(parse("nope", 9), Err(ExchangeError::Parse(_))));
    }
}
