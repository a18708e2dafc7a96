//! Privileged tests against the real kernel: the verifier, cgroup connect4
//! rewriting, getpeername, table swaps and pin adoption. They need root and
//! an eBPF build; otherwise they print "skipped" and why. CI runs as root,
//! and there they must run (`LEGATE_REQUIRE_BPF=1` turns a skip into a
//! failure).

use legate_bpf::{KernelLb, Options, OrigDst, Redirect, ServiceSpec, MAGLEV_SIZE};
use legate_tests::cgroup::{Cgroup, TagServer};
use std::net::SocketAddr;
use std::path::PathBuf;

fn skip() -> bool {
    legate_tests::cgroup::skip_reason(legate_bpf::built_with_ebpf()).is_some()
}

/// A cgroup and a pin directory for one test, both removed on drop.
struct Sandbox {
    cgroup: Cgroup,
    pins: PathBuf,
}

impl Sandbox {
    fn new(name: &str) -> Self {
        let cgroup = Cgroup::new(&legate_bpf::cgroup2_root().expect("cgroup v2"), name);
        let pins = PathBuf::from("/sys/fs/bpf/legate").join(cgroup.path.file_name().unwrap());
        Sandbox { cgroup, pins }
    }

    fn options(&self) -> Options {
        Options {
            cgroup: self.cgroup.path.clone(),
            pin_dir: self.pins.clone(),
            self_tgid: 0,
        }
    }

    fn connect(&self, vip: SocketAddr, n: usize) -> Vec<String> {
        self.cgroup.connect(vip, n)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = legate_bpf::unpin(&self.pins);
    }
}

/// A table giving `a` one slot in four and `b` the rest.
fn one_to_three(vip: SocketAddr, a: SocketAddr, b: SocketAddr) -> ServiceSpec {
    ServiceSpec {
        vip,
        backends: vec![a, b],
        table: (0..MAGLEV_SIZE).map(|i| u32::from(i % 4 != 0)).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_balanced_by_the_table_and_getpeername_shows_the_vip() {
    if skip() {
        return;
    }
    let sb = Sandbox::new("balance");
    let a_srv = TagServer::start('a').await;
    let a = a_srv.addr;
    let b_srv = TagServer::start('b').await;
    let b = b_srv.addr;
    let vip: SocketAddr = "127.100.0.1:80".parse().unwrap();
    // Loading runs the verifier on every program.
    let mut lb = KernelLb::load(&sb.options()).expect("load and attach");
    lb.sync(&[one_to_three(vip, a, b)], &[]).unwrap();

    let lines = sb.connect(vip, 2000);
    assert_eq!(lines.len(), 2000);
    let mut per = [0u32; 2];
    for l in &lines {
        let (peer, tag) = l.split_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
        assert_eq!(peer, "127.100.0.1:80", "getpeername must return the VIP");
        per[usize::from(tag == "b")] += 1;
    }
    let share_a = f64::from(per[0]) / 2000.0;
    assert!(
        (share_a - 0.25).abs() < 0.04,
        "a got {share_a:.3} of connections, want 0.25 ({per:?})"
    );
    assert_eq!(a_srv.accepted() + b_srv.accepted(), 2000);

    // The kernel's per-backend counters agree with what the servers saw.
    let counted: std::collections::HashMap<SocketAddr, u64> = lb
        .connections()
        .into_iter()
        .map(|(_, be, n)| (be, n))
        .collect();
    assert_eq!(counted[&a], a_srv.accepted());
    assert_eq!(counted[&b], b_srv.accepted());

    // A process outside the cgroup (this one) is not rewritten: nothing
    // listens on the VIP itself.
    assert!(std::net::TcpStream::connect(vip).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_and_removal_take_effect_for_new_connects() {
    if skip() {
        return;
    }
    let sb = Sandbox::new("swap");
    let a_srv = TagServer::start('a').await;
    let a = a_srv.addr;
    let b_srv = TagServer::start('b').await;
    let b = b_srv.addr;
    let vip: SocketAddr = "127.100.0.2:80".parse().unwrap();
    let mut lb = KernelLb::load(&sb.options()).unwrap();
    lb.sync(&[one_to_three(vip, a, b)], &[]).unwrap();
    // Only b remains.
    lb.sync(
        &[ServiceSpec {
            vip,
            backends: vec![b],
            table: vec![0; MAGLEV_SIZE as usize].into(),
        }],
        &[],
    )
    .unwrap();
    let lines = sb.connect(vip, 200);
    assert!(lines.iter().all(|l| l.ends_with(" b")), "{lines:?}");
    // Removed: connects go to the VIP itself, where nothing listens.
    lb.sync(&[], &[]).unwrap();
    let lines = sb.connect(vip, 5);
    assert!(lines.iter().all(|l| l == "refused"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_adopts_pinned_maps_and_links() {
    if skip() {
        return;
    }
    let sb = Sandbox::new("adopt");
    let a_srv = TagServer::start('a').await;
    let a = a_srv.addr;
    let b_srv = TagServer::start('b').await;
    let b = b_srv.addr;
    let vip: SocketAddr = "127.100.0.3:80".parse().unwrap();
    let mut lb = KernelLb::load(&sb.options()).unwrap();
    lb.sync(&[one_to_three(vip, a, b)], &[]).unwrap();
    drop(lb);
    // The process that loaded the programs is gone (as after kill -9): the
    // pinned links and maps keep balancing.
    let lines = sb.connect(vip, 50);
    assert!(
        lines.iter().all(|l| l.starts_with("127.100.0.3:80 ")),
        "{lines:?}"
    );

    // A new loader adopts them: the service is known, the same desired
    // state swaps in a fresh table, and stale backends are dropped.
    let mut lb = KernelLb::load(&sb.options()).unwrap();
    let adopted: Vec<_> = lb.connections();
    assert!(
        adopted.is_empty(),
        "backends of adopted services are re-learned on sync"
    );
    let ops = lb
        .sync(
            &[ServiceSpec {
                vip,
                backends: vec![a],
                table: vec![0; MAGLEV_SIZE as usize].into(),
            }],
            &[],
        )
        .unwrap();
    assert!(
        ops >= 3,
        "upsert backend, swap table, update service, drop orphans: {ops}"
    );
    let lines = sb.connect(vip, 50);
    assert!(lines.iter().all(|l| l.ends_with(" a")), "{lines:?}");

    // Unpinning detaches: connects are left alone again.
    drop(lb);
    legate_bpf::unpin(&sb.pins).unwrap();
    let lines = sb.connect(vip, 3);
    assert!(lines.iter().all(|l| l == "refused"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_sends_connects_to_the_proxy_and_records_the_original_destination() {
    if skip() {
        return;
    }
    let sb = Sandbox::new("redirect");
    // Stands in for Legate's redirect listener.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = proxy.local_addr().unwrap().port();
    let vip: SocketAddr = "127.100.0.4:443".parse().unwrap();
    let mut lb = KernelLb::load(&sb.options()).unwrap();
    lb.sync(&[], &[Redirect { vip, port }]).unwrap();
    let mut orig = OrigDst::open(&sb.pins).unwrap();
    let accepted = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, peer) = proxy.accept().unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"p").unwrap();
        peer
    });
    let lines = sb.connect(vip, 1);
    let peer = accepted.join().unwrap();
    assert_eq!(
        lines,
        vec!["127.100.0.4:443 p".to_string()],
        "reached the proxy; getpeername shows the VIP"
    );
    assert_eq!(
        orig.take(peer),
        Some(vip),
        "the proxy learns the original destination"
    );
    assert_eq!(orig.take(peer), None, "consumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_connects_are_balanced_and_getpeername6_shows_the_vip() {
    if skip() {
        return;
    }
    let sb = Sandbox::new("v6");
    let a = TagServer::start_on('a', "[::1]:0".parse().unwrap()).await;
    let b = TagServer::start_on('b', "[::1]:0".parse().unwrap()).await;
    // A loopback port nothing listens on stands in for the VIP, so a miss
    // never leaves the host.
    let vip: SocketAddr = format!("[::1]:{}", {
        let l = std::net::TcpListener::bind("[::1]:0").unwrap();
        l.local_addr().unwrap().port()
    })
    .parse()
    .unwrap();
    let mut lb = KernelLb::load(&sb.options()).unwrap();
    lb.sync(&[one_to_three(vip, a.addr, b.addr)], &[]).unwrap();
    let lines = sb.connect(vip, 400);
    let to_a = lines.iter().filter(|l| l.ends_with(" a")).count();
    assert!(
        lines.iter().all(|l| l.starts_with(&format!("{vip} "))),
        "getpeername6 shows the VIP: {:?}",
        &lines[..3]
    );
    assert!((60..=140).contains(&to_a), "a got {to_a} of 400, want ~100");
}
