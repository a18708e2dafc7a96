//! Compiles the Envoy API `.proto` sources that the `envoy-types` crate ships
//! into one serialized `FileDescriptorSet`, so that proto3 JSON/YAML (with
//! `Any`) can be decoded by `prost-reflect` at run time. Nothing is copied
//! into this repository: the sources are read from the `envoy-types` package
//! that cargo already downloaded.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Must equal the `=` version pinned for `envoy-types` in the workspace.
const ENVOY_TYPES_VERSION: &str = "0.7.7";

fn envoy_types_dir() -> PathBuf {
    // Fast path: the package in cargo's registry cache.
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    if let Ok(regs) = std::fs::read_dir(cargo_home.join("registry/src")) {
        for reg in regs.flatten() {
            let dir = reg
                .path()
                .join(format!("envoy-types-{ENVOY_TYPES_VERSION}"));
            if dir.join("proto").is_dir() {
                return dir;
            }
        }
    }
    // Otherwise ask cargo where the package lives (vendored or git sources).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("Cargo.toml");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    for pkg in meta["packages"].as_array().expect("packages") {
        if pkg["name"] == "envoy-types" {
            let m = PathBuf::from(pkg["manifest_path"].as_str().unwrap());
            return m.parent().unwrap().to_path_buf();
        }
    }
    panic!("envoy-types not found in cargo metadata");
}

fn collect(dir: &Path, root: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            collect(&p, root, out);
        } else if p.extension().is_some_and(|x| x == "proto") {
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
}

/// Protos Legate cannot work without: the build fails if one is missing.
const REQUIRED: &[&str] = &[
    "envoy/config/bootstrap/v3/bootstrap.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/path/match/uri_template/v3/uri_template_match.proto",
];

fn main() {
    let base = envoy_types_dir().join("proto");
    let includes: Vec<PathBuf> = [
        "data-plane-api",
        "xds",
        "googleapis",
        "protoc-gen-validate",
        "cel-spec/proto",
        "opentelemetry-proto",
        "client_model",
    ]
    .iter()
    .map(|d| base.join(d))
    .filter(|p| p.exists())
    .collect();
    let api = base.join("data-plane-api");
    let mut files = Vec::new();
    for sub in [
        "envoy/config",
        "envoy/extensions",
        "envoy/service",
        "envoy/type",
        "envoy/admin",
    ] {
        collect(&api.join(sub), &api, &mut files);
    }
    // A loaded `envoy.extensions.config` package would capture the relative
    // names `config.core.v3...` used throughout the extension protos (protobuf
    // scoping), so its few files (config validators) are left out.
    files.retain(|f| !f.starts_with("envoy/extensions/config/"));
    // Some extension protos in the package import files it does not ship;
    // those types are simply unknown to Legate (and rejected as such).
    let mut compiler = protox::Compiler::new(&includes).expect("protox include paths");
    compiler.include_imports(true);
    let mut failed = Vec::new();
    for f in &files {
        if compiler.open_file(f).is_err() {
            failed.push(f.clone());
        }
    }
    // Encoded by protox itself, so custom options (protoc-gen-validate's
    // `validate.rules`) survive for the validator to read.
    let mut bytes = compiler.encode_file_descriptor_set();
    // A file can fail only because the whole pool is loaded at once: with
    // every package present, a relative name such as
    // `common.ratelimit.v3.X` inside `envoy.extensions.filters.http.*`
    // resolves to the first enclosing scope that has a `common`
    // (`envoy.extensions.filters.common`, from another file), which protoc,
    // loading only a file's imports, never sees. Such a file is compiled
    // again on its own, and its descriptors (names already fully qualified)
    // are appended to the set.
    let mut have = file_names(&bytes);
    let mut skipped = 0;
    for f in &failed {
        let mut alone = protox::Compiler::new(&includes).expect("protox include paths");
        alone.include_imports(true);
        if let Err(e) = alone.open_file(f) {
            skipped += 1;
            if REQUIRED.iter().any(|r| f.ends_with(r)) {
                panic!("a required Envoy proto does not compile: {f}: {e}");
            }
            continue;
        }
        for (name, entry) in file_entries(&alone.encode_file_descriptor_set()) {
            if have.insert(name) {
                bytes.extend_from_slice(entry);
            }
        }
    }
    println!(
        "cargo:warning=envoy descriptor set: {} files compiled ({} alone), {skipped} skipped (missing imports)",
        files.len() - skipped,
        failed.len() - skipped
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("envoy_descriptor.bin");
    std::fs::write(out, bytes).unwrap();
    println!("cargo:rerun-if-changed=build.rs");
}

/// Reads a protobuf varint at `*at`.
fn varint(b: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[*at];
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    v
}

/// The `file` entries of an encoded `FileDescriptorSet` (field 1, repeated
/// `FileDescriptorProto`), each as (its `name`, its whole encoded entry).
/// Read as raw bytes so that nothing (custom options) is lost.
fn file_entries(set: &[u8]) -> Vec<(String, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < set.len() {
        let start = at;
        let key = varint(set, &mut at);
        assert_eq!(key, (1 << 3) | 2, "a FileDescriptorSet holds only files");
        let len = varint(set, &mut at) as usize;
        let body = &set[at..at + len];
        at += len;
        // FileDescriptorProto.name is field 1 (string), written first.
        let mut i = 0;
        let name = if !body.is_empty() && varint(body, &mut i) == (1 << 3) | 2 {
            let n = varint(body, &mut i) as usize;
            String::from_utf8_lossy(&body[i..i + n]).into_owned()
        } else {
            String::new()
        };
        out.push((name, &set[start..at]));
    }
    out
}

fn file_names(set: &[u8]) -> std::collections::HashSet<String> {
    file_entries(set).into_iter().map(|(n, _)| n).collect()
}
