//! Test kit shared by Legate's integration tests and the conformance
//! harness: a real HTTP echo upstream and helpers to run the real binary.

pub mod authz;
pub mod cgroup;
pub mod dns;
pub mod echo;
pub mod ext_proc;
pub mod jwt;
pub mod legate;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod tcp;
pub mod udp;
pub mod xds_server;
