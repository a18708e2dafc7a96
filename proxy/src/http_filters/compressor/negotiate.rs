//! Which compressor a response gets: the request's `accept-encoding`
//! against every compressor filter of the chain, as Envoy decides it once
//! for all of them.
//!
//! Tokens are read in order: the name before the first `;` (compared as
//! written), its `q` if the first parameter is one (a `q` that does not
//! parse drops the token), else 1. `name;q=0` takes that compressor out
//! (`*;q=0` takes out nothing). Among the candidates, `identity` and `*`,
//! a token wins over the current choice with a higher q, or an equal one
//! when its compressor says `choose_first`. `*` picks the alphabetically
//! first candidate.

/// A compressor filter of the chain, as registered for this request.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub encoding: &'static str,
    pub choose_first: bool,
}

/// The outcome, each counted under its own stat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `header_compressor_used` / `header_compressor_overshadowed`.
    Compressor(&'static str),
    /// `header_wildcard`: `*` chose this one.
    Wildcard(&'static str),
    /// `header_identity`.
    Identity,
    /// `header_not_valid`.
    NotValid,
}

impl Decision {
    /// The encoding chosen, if any.
    pub fn encoding(&self) -> Option<&'static str> {
        match self {
            Decision::Compressor(e) | Decision::Wildcard(e) => Some(e),
            _ => None,
        }
    }
}

/// (name, q) of each usable token.
fn tokens(accept: &str) -> Vec<(&str, f64)> {
    accept
        .split(',')
        .filter_map(|t| {
            let (name, params) = match t.split_once(';') {
                Some((n, p)) => (n.trim(), Some(p)),
                None => (t.trim(), None),
            };
            if name.is_empty() {
                return None;
            }
            let q = match params.map(str::trim) {
                Some(p) if p.starts_with(['q', 'Q']) => {
                    let v = p[1..].trim_start().strip_prefix('=')?;
                    let v = v.split(';').next().unwrap_or("").trim();
                    v.parse::<f64>().ok()?
                }
                _ => 1.0,
            };
            Some((name, q))
        })
        .collect()
}

/// Decides among `candidates` (in chain order) for `accept`.
pub fn decide(accept: &str, candidates: &[Candidate]) -> Decision {
    let toks = tokens(accept);
    let mut cands: Vec<&Candidate> = candidates.iter().collect();
    for (name, q) in &toks {
        if *q == 0.0 && *name != "*" {
            cands.retain(|c| c.encoding != *name);
        }
    }
    if toks.is_empty() || cands.is_empty() {
        return Decision::NotValid;
    }
    let mut best: Option<(&str, f64)> = None;
    for (name, q) in &toks {
        let known =
            *name == "identity" || *name == "*" || cands.iter().any(|c| c.encoding == *name);
        if !known {
            continue;
        }
        let first = cands.iter().any(|c| c.encoding == *name && c.choose_first);
        match best {
            Some((_, bq)) if *q < bq || (*q == bq && !first) => {}
            _ => best = Some((name, *q)),
        }
    }
    let Some((name, q)) = best else {
        return Decision::NotValid;
    };
    if q == 0.0 {
        return Decision::NotValid;
    }
    match name {
        "identity" => Decision::Identity,
        "*" => cands
            .iter()
            .map(|c| c.encoding)
            .min()
            .map_or(Decision::NotValid, Decision::Wildcard),
        _ => cands
            .iter()
            .find(|c| c.encoding == name)
            .map_or(Decision::NotValid, |c| Decision::Compressor(c.encoding)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Candidate> {
        ["br", "gzip", "zstd"]
            .into_iter()
            .map(|encoding| Candidate {
                encoding,
                choose_first: false,
            })
            .collect()
    }

    #[test]
    fn highest_q_then_first_listed() {
        assert_eq!(decide("gzip, br", &all()), Decision::Compressor("gzip"));
        assert_eq!(decide("gzip;q=0.5, br", &all()), Decision::Compressor("br"));
        assert_eq!(decide("deflate", &all()), Decision::NotValid);
        assert_eq!(decide("identity", &all()), Decision::Identity);
        assert_eq!(decide("*", &all()), Decision::Wildcard("br"));
        assert_eq!(decide("br;q=0, *", &all()), Decision::Wildcard("gzip"));
        assert_eq!(decide("gzip;q=0", &all()), Decision::NotValid);
        assert_eq!(
            decide("gzip;q=x, br;q=0.1", &all()),
            Decision::Compressor("br")
        );
    }

    #[test]
    fn choose_first_wins_ties() {
        let mut c = all();
        c[2].choose_first = true;
        assert_eq!(decide("gzip, zstd", &c), Decision::Compressor("zstd"));
        assert_eq!(decide("gzip, zstd;q=0.9", &c), Decision::Compressor("gzip"));
    }
}
