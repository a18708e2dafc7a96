//! Legate's kernel load balancer: the userspace half.
//!
//! [`plan`] turns the services Legate wants offloaded (VIP, backends and the
//! weighted Maglev table the userspace balancer uses too) into map
//! operations, as a pure function; [`kernel`] loads the eBPF programs from
//! `bpf-programs/ebpf`, attaches them to a cgroup, pins maps and links so a
//! restart adopts them, and applies the operations.

pub mod addr;
pub mod kernel;
pub mod plan;

pub use kernel::{
    built_with_ebpf, cgroup2_root, unpin, KernelLb, LoadError, Options, OrigDst, SyncError,
};
pub use legate_bpf_common::MAGLEV_SIZE;
pub use plan::{MapOp, PlanError, Redirect, ServiceSpec, State};
