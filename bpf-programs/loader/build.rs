//! Builds the eBPF programs (`../ebpf`) for `bpfel-unknown-none` with
//! aya-build and leaves the object in `OUT_DIR/legate-bpf`, which the loader
//! embeds. Stable Rust builds it: `RUSTC_BOOTSTRAP=1` unlocks
//! `-Z build-std=core` for that one child cargo.
//!
//! Without `bpf-linker` or the `rust-src` component (or with
//! `AYA_BUILD_SKIP=1`) nothing is embedded and `cfg(no_ebpf)` is set: the
//! loader then reports "kernel LB unavailable: built without eBPF" and
//! `--kernel-lb auto` falls back to userspace. `scripts/setup.sh` installs
//! both, so CI always builds the real object.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(no_ebpf)");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=PATH");
    // aya-build watches the eBPF crate; the shared types live beside it.
    println!(
        "cargo:rerun-if-changed={}",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../common")
            .display()
    );
    if let Some(why) = missing_toolchain() {
        // Installing the missing tool changes no file this script watched
        // and may leave PATH as it was: watch the directories it would
        // land in, so the next build after `scripts/setup.sh` embeds the
        // programs instead of keeping this answer.
        for dir in std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain(sysroot().map(|s| s.join("lib/rustlib")))
            .filter(|d| d.is_dir())
        {
            println!("cargo:rerun-if-changed={}", dir.display());
        }
        println!("cargo:warning=building without eBPF programs: {why}");
        println!("cargo:rustc-cfg=no_ebpf");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf");
    let root = root.canonicalize().expect("bpf-programs/ebpf exists");
    let root = root.to_str().expect("UTF-8 path");
    // The child cargo runs `rustup run <toolchain>`: use the toolchain
    // building this crate, not whatever happens to be called nightly.
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    // aya-build runs `cargo build --package` in the current directory; the
    // eBPF crate is its own workspace (excluded from ours), so run it there.
    std::env::set_current_dir(root).expect("entering bpf-programs/ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "legate-bpf-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .expect("building the eBPF programs");
}

fn missing_toolchain() -> Option<String> {
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return Some("AYA_BUILD_SKIP is set".into());
    }
    let in_path = |bin: &str| {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false)
    };
    if !in_path("bpf-linker") {
        return Some("bpf-linker is not in PATH (scripts/setup.sh installs it)".into());
    }
    match sysroot() {
        Some(s) if s.join("lib/rustlib/src/rust/library/core").is_dir() => None,
        _ => Some("the rust-src component is missing (rustup component add rust-src)".into()),
    }
}

/// The sysroot of the compiler building this crate.
fn sysroot() -> Option<PathBuf> {
    std::process::Command::new(std::env::var("RUSTC").unwrap_or("rustc".into()))
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}
