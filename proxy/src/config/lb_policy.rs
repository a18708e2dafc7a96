//! `Cluster.load_balancing_policy`: the typed load-balancing extensions.
//! Envoy takes the first policy of the list whose type it knows (by type
//! URL, not name) and ignores `lb_policy`. Legate takes the first too; a
//! policy it does not implement is refused rather than skipped, since Envoy
//! would have used it. Fields of a policy that Legate does not implement
//! (zone-aware routing, ...) are refused by the registry. `slow_start_config`
//! is accepted and changes nothing, as measured of Envoy 1.40 (see the
//! registry entry).

use super::{index, join, ConfigError, Result, Wrapped};
use crate::lb::LbPolicy;
use lbp::common::v3::{locality_lb_config::LocalityConfigSpecifier, LocalityLbConfig};
use legate_proto::envoy_types::pb::envoy::config::cluster::v3 as pb;
use legate_proto::envoy_types::pb::envoy::extensions::load_balancing_policies as lbp;

const ROUND_ROBIN: &str = "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin";
const LEAST_REQUEST: &str =
    "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest";
const RANDOM: &str = "envoy.extensions.load_balancing_policies.random.v3.Random";
const RING_HASH: &str = "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash";
const MAGLEV: &str = "envoy.extensions.load_balancing_policies.maglev.v3.Maglev";

/// The policy, and whether locality weights apply (`locality_lb_config`
/// with `locality_weighted_lb_config`).
pub fn from_proto(p: &pb::LoadBalancingPolicy, path: &str) -> Result<(LbPolicy, bool)> {
    let Some((i, policy)) = p.policies.iter().enumerate().next() else {
        return Err(ConfigError::new(
            join(path, "policies"),
            "at least one policy is required",
        ));
    };
    let p = join(&index(path, "policies", i), "typed_extension_config");
    let any = policy
        .typed_extension_config
        .as_ref()
        .and_then(|t| t.typed_config.as_ref())
        .ok_or_else(|| ConfigError::new(join(&p, "typed_config"), "typed_config is required"))?;
    let tc = join(&p, "typed_config");
    let decode_err = |e: prost::DecodeError| ConfigError::new(&tc, e.to_string());
    use prost::Message;
    let v = any.value.as_slice();
    match legate_proto::type_name(&any.type_url) {
        ROUND_ROBIN => {
            let rr = lbp::round_robin::v3::RoundRobin::decode(v).map_err(decode_err)?;
            Ok((
                LbPolicy::RoundRobin,
                locality_weighted(rr.locality_lb_config.as_ref()),
            ))
        }
        LEAST_REQUEST => {
            let lr = lbp::least_request::v3::LeastRequest::decode(v).map_err(decode_err)?;
            let choice_count = lr.choice_count.val().unwrap_or(2);
            if choice_count < 2 {
                return Err(ConfigError::new(
                    join(&tc, "choice_count"),
                    "must be at least 2",
                ));
            }
            let policy = LbPolicy::LeastRequest {
                choice_count,
                active_request_bias: lr
                    .active_request_bias
                    .as_ref()
                    .map_or(1.0, |b| b.default_value),
            };
            Ok((policy, locality_weighted(lr.locality_lb_config.as_ref())))
        }
        RANDOM => {
            let r = lbp::random::v3::Random::decode(v).map_err(decode_err)?;
            Ok((
                LbPolicy::Random,
                locality_weighted(r.locality_lb_config.as_ref()),
            ))
        }
        RING_HASH => {
            let r = lbp::ring_hash::v3::RingHash::decode(v).map_err(decode_err)?;
            let min = r.minimum_ring_size.val().unwrap_or(1024);
            let max = r.maximum_ring_size.val().unwrap_or(8 * 1024 * 1024);
            if min > max {
                return Err(ConfigError::new(
                    join(&tc, "minimum_ring_size"),
                    "must not exceed maximum_ring_size",
                ));
            }
            use lbp::ring_hash::v3::ring_hash::HashFunction as H;
            let murmur = match H::try_from(r.hash_function) {
                Ok(H::MurmurHash2) => true,
                Ok(_) => false,
                Err(_) => {
                    return Err(ConfigError::new(
                        join(&tc, "hash_function"),
                        format!("unknown hash function {}", r.hash_function),
                    ))
                }
            };
            let policy = LbPolicy::RingHash {
                min_ring_size: min,
                max_ring_size: max,
                murmur,
            };
            Ok((policy, false))
        }
        MAGLEV => {
            let m = lbp::maglev::v3::Maglev::decode(v).map_err(decode_err)?;
            let size = m.table_size.val().unwrap_or(65537);
            if !super::cluster::is_prime(size) {
                return Err(ConfigError::new(
                    join(&tc, "table_size"),
                    format!("{size} is not a prime number"),
                ));
            }
            Ok((LbPolicy::Maglev { table_size: size }, false))
        }
        other => Err(ConfigError::new(
            tc,
            format!("load balancing policy {other} is not supported"),
        )),
    }
}

fn locality_weighted(l: Option<&LocalityLbConfig>) -> bool {
    matches!(
        l.and_then(|l| l.locality_config_specifier.as_ref()),
        Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<(LbPolicy, bool)> {
        let v = legate_proto::json::parse_yaml(yaml).unwrap();
        let dm =
            legate_proto::json::to_dynamic(v, "envoy.config.cluster.v3.LoadBalancingPolicy", true)
                .unwrap();
        from_proto(&dm.transcode_to().unwrap(), "load_balancing_policy")
    }

    #[test]
    fn least_request_with_locality_weights_as_envoy_gateway_sends_it() {
        let (p, weighted) = parse(
            r#"policies: [{typed_extension_config: {name: envoy.load_balancing_policies.least_request, typed_config: {"@type": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest, locality_lb_config: {locality_weighted_lb_config: {}}}}}]"#,
        )
        .unwrap();
        assert_eq!(
            p,
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: 1.0
            }
        );
        assert!(weighted);
    }

    #[test]
    fn the_first_policy_is_taken_and_an_unknown_one_is_refused() {
        let (p, weighted) = parse(
            r#"policies: [{typed_extension_config: {name: a, typed_config: {"@type": type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev}}}, {typed_extension_config: {name: b, typed_config: {"@type": type.googleapis.com/envoy.extensions.load_balancing_policies.random.v3.Random}}}]"#,
        )
        .unwrap();
        assert_eq!(p, LbPolicy::Maglev { table_size: 65537 });
        assert!(!weighted);
        let err = parse(
            r#"policies: [{typed_extension_config: {name: a, typed_config: {"@type": type.googleapis.com/envoy.extensions.load_balancing_policies.cluster_provided.v3.ClusterProvided}}}]"#,
        )
        .unwrap_err();
        assert_eq!(
            err.path,
            "load_balancing_policy.policies[0].typed_extension_config.typed_config"
        );
    }
}
