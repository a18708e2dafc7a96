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
    let mut skipped = 0;
    for f in &files {
        if let Err(e) = compiler.open_file(f) {
            skipped += 1;
            if REQUIRED.iter().any(|r| f.ends_with(r)) {
                panic!("a required Envoy proto does not compile: {f}: {e}");
            }
        }
    }
    println!("cargo:warning=envoy descriptor set: {} files compiled, {skipped} skipped (missing imports)", files.len() - skipped);
    // Encoded by protox itself, so custom options (protoc-gen-validate's
    // `validate.rules`) survive for the validator to read.
    let bytes = compiler.encode_file_descriptor_set();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("envoy_descriptor.bin");
    std::fs::write(out, bytes).unwrap();
    println!("cargo:rerun-if-changed=build.rs");
}
