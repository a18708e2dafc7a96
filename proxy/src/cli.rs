//! Envoy's command line. go-control-plane's scripts and Istio's pilot-agent
//! start Envoy with these flags, so `legate` accepts all of them; the ones
//! with no effect yet are logged at start-up.

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
pub enum Mode {
    Serve,
    Validate,
    #[value(name = "init_only")]
    InitOnly,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "legate",
    about = "Legate: an Envoy-compatible data plane",
    disable_version_flag = true
)]
pub struct Cli {
    /// Path to the bootstrap (YAML, JSON or binary proto by extension).
    #[arg(short = 'c', long = "config-path", default_value = "")]
    pub config_path: String,
    /// YAML merged over the file's bootstrap (protobuf merge, as Envoy).
    #[arg(long = "config-yaml", default_value = "")]
    pub config_yaml: String,
    #[arg(long, value_enum, default_value = "serve")]
    pub mode: Mode,
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    pub log_level: String,
    #[arg(long = "component-log-level", default_value = "")]
    pub component_log_level: String,
    #[arg(long = "log-format", default_value = "")]
    pub log_format: String,
    #[arg(long = "log-path", default_value = "")]
    pub log_path: String,
    #[arg(long = "log-format-escaped")]
    pub log_format_escaped: bool,
    #[arg(long = "service-node", default_value = "")]
    pub service_node: String,
    #[arg(long = "service-cluster", default_value = "")]
    pub service_cluster: String,
    #[arg(long = "service-zone", default_value = "")]
    pub service_zone: String,
    #[arg(long = "drain-time-s", default_value_t = 600)]
    pub drain_time_s: u64,
    #[arg(long = "drain-strategy", default_value = "gradual")]
    pub drain_strategy: String,
    #[arg(long = "parent-shutdown-time-s", default_value_t = 900)]
    pub parent_shutdown_time_s: u64,
    /// Worker threads; 0 = number of CPUs.
    #[arg(long, default_value_t = 0)]
    pub concurrency: usize,
    #[arg(long = "base-id", default_value_t = 0)]
    pub base_id: u64,
    #[arg(long = "use-dynamic-base-id")]
    pub use_dynamic_base_id: bool,
    #[arg(long = "base-id-path", default_value = "")]
    pub base_id_path: String,
    #[arg(long = "restart-epoch", default_value_t = 0)]
    pub restart_epoch: u32,
    #[arg(long = "disable-hot-restart")]
    pub disable_hot_restart: bool,
    #[arg(long = "allow-unknown-static-fields")]
    pub allow_unknown_static_fields: bool,
    #[arg(long = "reject-unknown-dynamic-fields")]
    pub reject_unknown_dynamic_fields: bool,
    #[arg(long = "ignore-unknown-dynamic-fields")]
    pub ignore_unknown_dynamic_fields: bool,
    #[arg(long = "local-address-ip-version", default_value = "v4")]
    pub local_address_ip_version: String,
    #[arg(long = "file-flush-interval-msec", default_value_t = 10000)]
    pub file_flush_interval_msec: u64,
    #[arg(long = "enable-core-dump")]
    pub enable_core_dump: bool,
    /// Envoy's switch for its warnings about deprecated fields, which
    /// Legate does not write (pilot-agent passes it).
    #[arg(long = "skip-deprecated-logs")]
    pub skip_deprecated_logs: bool,
    #[arg(long = "cpuset-threads")]
    pub cpuset_threads: bool,
    #[arg(long = "enable-fine-grain-logging")]
    pub enable_fine_grain_logging: bool,
    #[arg(long = "socket-path", default_value = "")]
    pub socket_path: String,
    #[arg(long = "socket-mode", default_value = "")]
    pub socket_mode: String,
    #[arg(long = "version")]
    pub version: bool,
    /// Kernel load balancing (Legate's own flag): auto falls back to
    /// userspace when BPF cannot load, required refuses to start without
    /// it, off never loads it. Default: the bootstrap runtime key
    /// `legate.kernel_lb.mode`, else auto.
    #[arg(long = "kernel-lb", value_enum)]
    pub kernel_lb: Option<crate::kernel_lb::Mode>,
    /// The cgroup v2 directory whose processes' connects are balanced.
    /// Default: `legate.kernel_lb.cgroup`, else the hierarchy's root.
    #[arg(long = "kernel-lb-cgroup", default_value = "")]
    pub kernel_lb_cgroup: String,
}

impl Cli {
    /// Flags accepted for compatibility that do not change behaviour yet.
    pub fn inert_flags(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut note = |cond: bool, name: &'static str| {
            if cond {
                v.push(name);
            }
        };
        note(
            !self.component_log_level.is_empty(),
            "--component-log-level",
        );
        note(!self.log_format.is_empty(), "--log-format");
        note(self.drain_strategy != "gradual", "--drain-strategy");
        note(
            self.parent_shutdown_time_s != 900,
            "--parent-shutdown-time-s",
        );
        note(
            // --base-id itself names the kernel LB's pin directory.
            self.use_dynamic_base_id || !self.base_id_path.is_empty(),
            "--use-dynamic-base-id",
        );
        note(self.restart_epoch != 0, "--restart-epoch");
        note(
            self.reject_unknown_dynamic_fields || self.ignore_unknown_dynamic_fields,
            "--reject-unknown-dynamic-fields",
        );
        note(
            self.local_address_ip_version != "v4",
            "--local-address-ip-version",
        );
        note(
            self.file_flush_interval_msec != 10000,
            "--file-flush-interval-msec",
        );
        note(
            self.enable_core_dump || self.cpuset_threads || self.enable_fine_grain_logging,
            "--enable-*",
        );
        note(
            !self.socket_path.is_empty() || !self.socket_mode.is_empty(),
            "--socket-path",
        );
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_pilot_agent_command_line() {
        let cli = Cli::try_parse_from([
            "legate",
            "-c",
            "envoy-rev.json",
            "--drain-time-s",
            "45",
            "--drain-strategy",
            "immediate",
            "--local-address-ip-version",
            "v4",
            "--file-flush-interval-msec",
            "1000",
            "--disable-hot-restart",
            "--allow-unknown-static-fields",
            "--skip-deprecated-logs",
            "--concurrency",
            "2",
            "-l",
            "warning",
            "--component-log-level",
            "misc:error",
            "--log-format",
            "%Y-%m-%dT%T.%fZ\t%l\t%n\t%v",
        ])
        .unwrap();
        assert_eq!(cli.drain_time_s, 45);
        assert_eq!(cli.concurrency, 2);
        assert!(cli.inert_flags().contains(&"--drain-strategy"));
    }

    #[test]
    fn accepts_mode_names() {
        assert_eq!(
            Cli::try_parse_from(["legate", "--mode", "init_only"])
                .unwrap()
                .mode,
            Mode::InitOnly
        );
        assert_eq!(
            Cli::try_parse_from(["legate", "--mode", "validate"])
                .unwrap()
                .mode,
            Mode::Validate
        );
    }
}
