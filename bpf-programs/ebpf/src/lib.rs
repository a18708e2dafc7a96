#![no_std]
// The library target exists so the loader can name this crate as a
// build-dependency (cargo then rebuilds the loader when it changes); the
// programs are in the `legate-bpf` binary, built for BPF by aya-build.
