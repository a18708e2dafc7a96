//! A cluster's `outlier_detection` (passive health), with Envoy's defaults:
//! the detectors are on whenever the message is present (consecutive 5xx
//! and success rate enforced; gateway failures and failure percentage
//! detected only).

use super::{duration, join, ConfigError, Result, Wrapped};
use legate_proto::envoy_types::pb::envoy::config::cluster::v3 as pb;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_5xx: u32,
    pub enforcing_consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    /// Local-origin errors (connect failures, timeouts) are counted apart
    /// from the upstream's own responses.
    pub split_external_local_origin_errors: bool,
    pub consecutive_local_origin_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_time_jitter: Duration,
    pub max_ejection_percent: u32,
    pub always_eject_one_host: bool,
    pub success_rate_minimum_hosts: u32,
    pub success_rate_request_volume: u32,
    /// Divided by 1000: 1900 is 1.9 standard deviations.
    pub success_rate_stdev_factor: u32,
    pub enforcing_success_rate: u32,
    pub enforcing_local_origin_success_rate: u32,
    pub failure_percentage_threshold: u32,
    pub failure_percentage_minimum_hosts: u32,
    pub failure_percentage_request_volume: u32,
    pub enforcing_failure_percentage: u32,
    pub enforcing_failure_percentage_local_origin: u32,
}

impl OutlierConfig {
    pub fn from_proto(o: &pb::OutlierDetection, path: &str) -> Result<Self> {
        let percent = |v: &Option<legate_proto::envoy_types::pb::google::protobuf::UInt32Value>,
                       field: &str,
                       default: u32|
         -> Result<u32> {
            let v = v.val().unwrap_or(default);
            if v > 100 {
                return Err(ConfigError::new(join(path, field), "must be at most 100"));
            }
            Ok(v)
        };
        let positive = |d: &Option<legate_proto::envoy_types::pb::google::protobuf::Duration>,
                        field: &str,
                        default: Duration|
         -> Result<Duration> {
            let d = match d {
                Some(d) => duration(d, &join(path, field))?,
                None => default,
            };
            if d.is_zero() {
                return Err(ConfigError::new(
                    join(path, field),
                    "must be greater than 0s",
                ));
            }
            Ok(d)
        };
        let base_ejection_time = positive(
            &o.base_ejection_time,
            "base_ejection_time",
            Duration::from_secs(30),
        )?;
        let max_ejection_time = match &o.max_ejection_time {
            Some(_) => positive(&o.max_ejection_time, "max_ejection_time", Duration::ZERO)?,
            None => Duration::from_secs(300).max(base_ejection_time),
        };
        if max_ejection_time < base_ejection_time {
            return Err(ConfigError::new(
                join(path, "max_ejection_time"),
                "outlier detector's max_ejection_time cannot be smaller than base_ejection_time",
            ));
        }
        Ok(Self {
            consecutive_5xx: o.consecutive_5xx.val().unwrap_or(5),
            enforcing_consecutive_5xx: percent(
                &o.enforcing_consecutive_5xx,
                "enforcing_consecutive_5xx",
                100,
            )?,
            consecutive_gateway_failure: o.consecutive_gateway_failure.val().unwrap_or(5),
            enforcing_consecutive_gateway_failure: percent(
                &o.enforcing_consecutive_gateway_failure,
                "enforcing_consecutive_gateway_failure",
                0,
            )?,
            split_external_local_origin_errors: o.split_external_local_origin_errors,
            consecutive_local_origin_failure: o.consecutive_local_origin_failure.val().unwrap_or(5),
            enforcing_consecutive_local_origin_failure: percent(
                &o.enforcing_consecutive_local_origin_failure,
                "enforcing_consecutive_local_origin_failure",
                100,
            )?,
            interval: positive(&o.interval, "interval", Duration::from_secs(10))?,
            base_ejection_time,
            max_ejection_time,
            max_ejection_time_jitter: match &o.max_ejection_time_jitter {
                Some(d) => duration(d, &join(path, "max_ejection_time_jitter"))?,
                None => Duration::ZERO,
            },
            max_ejection_percent: percent(&o.max_ejection_percent, "max_ejection_percent", 10)?,
            always_eject_one_host: o.always_eject_one_host.val().unwrap_or(false),
            success_rate_minimum_hosts: o.success_rate_minimum_hosts.val().unwrap_or(5),
            success_rate_request_volume: o.success_rate_request_volume.val().unwrap_or(100),
            success_rate_stdev_factor: o.success_rate_stdev_factor.val().unwrap_or(1900),
            enforcing_success_rate: percent(
                &o.enforcing_success_rate,
                "enforcing_success_rate",
                100,
            )?,
            enforcing_local_origin_success_rate: percent(
                &o.enforcing_local_origin_success_rate,
                "enforcing_local_origin_success_rate",
                100,
            )?,
            failure_percentage_threshold: percent(
                &o.failure_percentage_threshold,
                "failure_percentage_threshold",
                85,
            )?,
            failure_percentage_minimum_hosts: o.failure_percentage_minimum_hosts.val().unwrap_or(5),
            failure_percentage_request_volume: o
                .failure_percentage_request_volume
                .val()
                .unwrap_or(50),
            enforcing_failure_percentage: percent(
                &o.enforcing_failure_percentage,
                "enforcing_failure_percentage",
                0,
            )?,
            enforcing_failure_percentage_local_origin: percent(
                &o.enforcing_failure_percentage_local_origin,
                "enforcing_failure_percentage_local_origin",
                0,
            )?,
        })
    }
}
