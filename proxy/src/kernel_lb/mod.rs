//! Kernel load balancing: listeners whose only job is to pick an endpoint
//! are served by eBPF at connect() time (see [`offload`] for which), with
//! tables built from the same endpoint snapshots the userspace balancers
//! use. [`agent`] keeps the kernel maps in step with config and endpoints.
//!
//! Settings: `--kernel-lb auto|required|off` and `--kernel-lb-cgroup PATH`,
//! or in the bootstrap's static runtime layer the keys
//! `legate.kernel_lb.mode` and `legate.kernel_lb.cgroup` (the command line
//! wins). `auto` loads the programs when the first listener can be
//! offloaded and falls back to userspace, with the reason on
//! `/kernel_lb` and the `kernel_lb.enabled` gauge at 0, when BPF cannot
//! load; `required` loads at start-up and refuses to start without it;
//! `off` never loads and removes what an earlier run pinned.
//!
//! Maps and links are pinned under `/sys/fs/bpf/legate/<base-id>/`: a
//! restarted Legate with the same `--base-id` adopts them, so balancing
//! continues across restarts; instances that run side by side need
//! distinct base ids, as Envoy's shared memory does.

pub mod agent;
pub mod offload;

pub use agent::{Agent, Settings};

/// The bootstrap runtime keys the kernel LB reads.
pub const RUNTIME_KEYS: [&str; 2] = ["legate.kernel_lb.mode", "legate.kernel_lb.cgroup"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Auto,
    Required,
    Off,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Mode::Auto),
            "required" => Some(Mode::Required),
            "off" => Some(Mode::Off),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Required => "required",
            Mode::Off => "off",
        }
    }
}
