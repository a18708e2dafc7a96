//! Map keys and values shared by Legate's socket-LB eBPF programs and their
//! userspace loader. Every type is `#[repr(C)]` with explicit padding, so
//! the kernel hashes the same bytes userspace wrote (implicit padding would
//! be uninitialised and make hash lookups miss).
//!
//! Addresses and ports are kept exactly as `struct bpf_sock_addr` holds them
//! (network byte order, read as native integers), so the eBPF side copies
//! them without conversion; [`Addr`] converts on the userspace side.
#![no_std]

/// Slots in every service's Maglev table. A prime (Maglev needs one), the
/// Cilium default: tables stay near-even up to ~160 backends per service
/// (M >= 100 N). Inner maps of a map-in-map must all have the template's
/// size, so it is one constant for every service.
pub const MAGLEV_SIZE: u32 = 16_381;
pub const MAX_SERVICES: u32 = 65_536;
/// Backend ids are indices into the per-backend counters, so they stay
/// below this.
pub const MAX_BACKENDS: u32 = 65_536;
pub const MAX_REVNAT: u32 = 262_144;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;

/// The kernel picks a backend and the client connects to it directly.
pub const MODE_DIRECT: u8 = 1;
/// The client connects to Legate's redirect listener on 127.0.0.1 instead;
/// the VIP it dialled is recorded in `ORIG_DST` for Legate to read.
pub const MODE_REDIRECT: u8 = 2;

/// An IPv4 or IPv6 address and port as the kernel's `bpf_sock_addr` holds
/// them: `ip[0]` is `user_ip4` for IPv4, all four words are `user_ip6` for
/// IPv6; `port` is in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Addr {
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// `SERVICES` key: a virtual address clients dial.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    pub addr: Addr,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Key of this service's Maglev table in `MAGLEV`.
    pub id: u32,
    /// Backends in the table; 0 means "leave the connect alone" (DIRECT).
    pub count: u32,
    pub mode: u8,
    pub _pad: u8,
    /// REDIRECT: Legate's redirect listener port on 127.0.0.1, network
    /// byte order.
    pub proxy_port: u16,
}

/// `BACKENDS` value, keyed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: Addr,
}

/// `REVNAT` value, in the socket's own storage: what the client dialled,
/// so getpeername() can answer with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNat {
    pub vip: Addr,
    pub backend: Addr,
    /// 1 when `backend` is Legate's redirect listener.
    pub redirected: u32,
}

/// `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Legate's own process id (tgid, in the initial pid namespace): its
    /// sockets are never rewritten. 0 disables the check.
    pub self_tgid: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, and has no implicit padding
    // (the layout tests in the loader check the sizes).
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Addr {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ServiceKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Service {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Backend {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::RevNat {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Config {}
}

// Sizes without implicit padding: a change here changes the wire format
// between the eBPF object and the loader.
const _: () = assert!(core::mem::size_of::<Addr>() == 20);
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);
const _: () = assert!(core::mem::size_of::<Service>() == 12);
const _: () = assert!(core::mem::size_of::<Backend>() == 20);
const _: () = assert!(core::mem::size_of::<RevNat>() == 44);
const _: () = assert!(core::mem::size_of::<Config>() == 8);
