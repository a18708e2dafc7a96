//! Legate's socket-level load balancer.
//!
//! `connect4`/`connect6` run when a process in the attached cgroup calls
//! connect(). If the destination is a service VIP in `SERVICES`, a random
//! slot of the service's Maglev table (`MAGLEV`, one inner array per service,
//! swapped atomically by the loader) names the backend, and the socket
//! connects straight to it: no proxy hop, no per-packet NAT. The choice is
//! kept in the socket's own storage (`REVNAT`, freed with the socket), so
//! `getpeername4/6` can answer with the address the application dialled.
//!
//! A REDIRECT service's connects go to Legate's redirect listener on
//! 127.0.0.1 or [::1] instead (the L7 path, replacing iptables capture); the VIP
//! waits in `PENDING` (by socket cookie) until the connection is
//! established, when `sock_ops` moves it to `ORIG_DST` under the client's
//! address, where Legate reads the original destination.
//!
//! Every program returns 1 ("allow"): a miss or a map error leaves the
//! connect() untouched, so the worst case is the path without kernel LB.
#![no_std]
#![no_main]

use aya_ebpf::{
    btf_maps::{Array, HashMap, HashOfMaps, LruHashMap, PerCpuArray, SkStorage},
    helpers::{bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use legate_bpf_common::{
    Addr, Backend, Config, RevNat, Service, ServiceKey, FAMILY_V4, FAMILY_V6, MAGLEV_SIZE,
    MAX_BACKENDS, MAX_REVNAT, MAX_SERVICES, MODE_DIRECT, MODE_REDIRECT, PROTO_TCP,
};

const SOCK_STREAM: u32 = 1;
const ALLOW: i32 = 1;

#[btf_map]
static SERVICES: HashMap<ServiceKey, Service, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map]
static MAGLEV: HashOfMaps<u32, Array<u32, { MAGLEV_SIZE as usize }>, { MAX_SERVICES as usize }> =
    HashOfMaps::new();

#[btf_map]
static BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }> = HashMap::new();

/// Per socket: what it dialled and where it was sent.
#[btf_map]
static REVNAT: SkStorage<RevNat> = SkStorage::new();

/// Socket cookie → VIP, for redirected connects until sock_ops sees them
/// established.
#[btf_map]
static PENDING: LruHashMap<u64, Addr, { MAX_REVNAT as usize }> = LruHashMap::new();

/// Connections made to each backend id (summed over CPUs by the loader).
#[btf_map]
static BACKEND_CX: PerCpuArray<u64, { MAX_BACKENDS as usize }> = PerCpuArray::new();

#[btf_map]
static CONFIG: Array<Config, 1> = Array::new();

/// Client address (as Legate's redirect listener sees the peer) → the VIP
/// it dialled.
#[btf_map]
static ORIG_DST: LruHashMap<Addr, Addr, { MAX_REVNAT as usize }> = LruHashMap::new();

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;

#[cgroup_sock_addr(connect4)]
pub fn legate_connect4(ctx: SockAddrContext) -> i32 {
    let _ = connect(&ctx, FAMILY_V4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn legate_connect6(ctx: SockAddrContext) -> i32 {
    let _ = connect(&ctx, FAMILY_V6);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn legate_getpeername4(ctx: SockAddrContext) -> i32 {
    let _ = getpeername(&ctx, FAMILY_V4);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn legate_getpeername6(ctx: SockAddrContext) -> i32 {
    let _ = getpeername(&ctx, FAMILY_V6);
    ALLOW
}

#[inline(always)]
fn read_addr(ctx: &SockAddrContext, family: u8) -> Addr {
    // SAFETY: the kernel hands every sock_addr program a valid context.
    let sa = unsafe { &*ctx.sock_addr };
    let ip = if family == FAMILY_V4 {
        [sa.user_ip4, 0, 0, 0]
    } else {
        sa.user_ip6
    };
    Addr {
        ip,
        port: sa.user_port as u16,
        family,
        _pad: 0,
    }
}

/// `family` is the program's own (a constant after inlining): the verifier
/// rejects a v6 store in a v4 program even on a branch never taken, so the
/// branch must not depend on map data.
#[inline(always)]
fn write_addr(ctx: &SockAddrContext, family: u8, addr: &Addr) {
    // SAFETY: as in read_addr; the verifier allows these stores in
    // connect and getpeername programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    if family == FAMILY_V4 {
        sa.user_ip4 = addr.ip[0];
    } else {
        sa.user_ip6[0] = addr.ip[0];
        sa.user_ip6[1] = addr.ip[1];
        sa.user_ip6[2] = addr.ip[2];
        sa.user_ip6[3] = addr.ip[3];
    }
    sa.user_port = addr.port as u32;
}

#[inline(always)]
fn is_self() -> bool {
    match CONFIG.get(0) {
        Some(c) => c.self_tgid != 0 && (bpf_get_current_pid_tgid() >> 32) as u32 == c.self_tgid,
        None => false,
    }
}

#[inline(always)]
fn connect(ctx: &SockAddrContext, family: u8) -> Option<()> {
    // SAFETY: valid context, see read_addr.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || is_self() {
        return None;
    }
    let vip = read_addr(ctx, family);
    let key = ServiceKey {
        addr: vip,
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    // SAFETY: values are plain data; a concurrent update at worst yields
    // the old or the new service, both valid.
    let svc = unsafe { SERVICES.get(&key) }?;
    if svc.mode == MODE_REDIRECT {
        let ip = if family == FAMILY_V4 {
            [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0]
        } else {
            [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
        };
        let proxy = Addr {
            ip,
            port: svc.proxy_port,
            family,
            _pad: 0,
        };
        remember(ctx, vip, proxy, 1);
        // SAFETY: the context pointer is what the helper expects.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = PENDING.insert(&cookie, &vip, 0);
        write_addr(ctx, family, &proxy);
        return Some(());
    }
    if svc.mode != MODE_DIRECT || svc.count == 0 {
        return None;
    }
    // SAFETY: no side effects.
    let slot = unsafe { bpf_get_prandom_u32() } % MAGLEV_SIZE;
    // SAFETY: inner tables are only ever replaced whole, never resized.
    let id = *unsafe { MAGLEV.get_value(&svc.id, &slot) }?;
    // SAFETY: plain data, see above.
    let backend = unsafe { BACKENDS.get(&id) }?;
    if backend.addr.family != family {
        return None;
    }
    remember(ctx, vip, backend.addr, 0);
    write_addr(ctx, family, &backend.addr);
    if let Some(n) = BACKEND_CX.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, no other writer on this CPU.
        unsafe { *n += 1 };
    }
    Some(())
}

/// Stores the VIP and the rewritten destination in the socket's storage.
#[inline(always)]
fn remember(ctx: &SockAddrContext, vip: Addr, backend: Addr, redirected: u32) {
    // SAFETY: the storage belongs to this socket, which only this program
    // invocation is connecting.
    let p = unsafe { REVNAT.get_or_insert_ptr_mut(ctx, None) };
    if !p.is_null() {
        // SAFETY: non-null pointers from the helper point at a RevNat.
        unsafe {
            *p = RevNat {
                vip,
                backend,
                redirected,
            }
        };
    }
}

#[inline(always)]
fn getpeername(ctx: &SockAddrContext, family: u8) -> Option<()> {
    // SAFETY: as in remember; the value is only read.
    let p = unsafe { REVNAT.get_ptr_mut(ctx) };
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null pointers from the helper point at a RevNat.
    let rev = unsafe { &*p };
    let peer = read_addr(ctx, family);
    if rev.backend != peer || rev.vip.family != family {
        return None;
    }
    write_addr(ctx, family, &rev.vip);
    Some(())
}

/// On the client side of a redirected connection, once established (the
/// client's port is known, and the redirect listener has not accepted it
/// yet): record client address → VIP.
#[sock_ops]
pub fn legate_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        match ctx.family() {
            AF_INET => record_v4(&ctx),
            AF_INET6 => record_v6(&ctx),
            _ => {}
        }
    }
    1
}

// One function per family, not inlined: merged, LLVM would load the
// address through a pointer chosen between the two context fields, and
// the verifier allows context loads only at constant offsets.
#[inline(never)]
fn record_v4(ctx: &SockOpsContext) {
    record(ctx, [ctx.local_ip4(), 0, 0, 0], FAMILY_V4);
}

#[inline(never)]
fn record_v6(ctx: &SockOpsContext) {
    // Word by word: a copy of the whole array walks a pointer into the
    // context, which the verifier refuses.
    // SAFETY: the kernel hands sock_ops programs a valid context; these
    // are plain u32 fields.
    let ip = unsafe {
        let w = core::ptr::addr_of!((*ctx.ops).local_ip6);
        [
            core::ptr::read_volatile(w.cast::<u32>()),
            core::ptr::read_volatile(w.cast::<u32>().add(1)),
            core::ptr::read_volatile(w.cast::<u32>().add(2)),
            core::ptr::read_volatile(w.cast::<u32>().add(3)),
        ]
    };
    record(ctx, ip, FAMILY_V6);
}

#[inline(always)]
fn record(ctx: &SockOpsContext, ip: [u32; 4], family: u8) {
    // SAFETY: the context pointer is what the helper expects.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain data.
    if let Some(vip) = unsafe { PENDING.get(&cookie) } {
        let client = Addr {
            ip,
            // local_port is in host byte order here.
            port: (ctx.local_port() as u16).to_be(),
            family,
            _pad: 0,
        };
        let _ = ORIG_DST.insert(&client, vip, 0);
        let _ = PENDING.remove(&cookie);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// Helpers such as bpf_get_socket_cookie are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
