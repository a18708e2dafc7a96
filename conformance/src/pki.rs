//! The PKI every routing scenario may use (`{{PKI}}` in a bootstrap): made
//! once per run with rcgen, written to `<work>/pki`.
//!
//! - `ca.pem`: the CA clients and proxies trust; `rogue-ca.pem`: another.
//! - Server certificates: `server` (conformance.test, *.conformance.test,
//!   URI SAN spiffe://conformance.test/proxy),
//!   `other` (other.test), `upstream` (upstream.test, for TLS upstreams).
//! - Client certificates, URI SAN `spiffe://conformance.test/...`:
//!   `client-good` (.../good), `client-badsan` (.../bad), `client-rogue`
//!   (.../good from the rogue CA), `client-expired` (.../good, expired),
//!   `client-upn` (.../good and a UPN otherName, client1@conformance.test),
//!   `client-revoked` (.../good, revoked by `ca.crl.pem`; `expired.crl.pem`
//!   is that CRL past its next update; `garbage.crl.pem` holds no CRL).

use legate_tests::pki::{Ca, LeafOpts};
use std::path::Path;

pub const GOOD_ID: &str = "spiffe://conformance.test/good";

/// The run's PKI under `<work>/pki`, made on first use.
pub fn ensure(work: &Path) -> std::io::Result<std::path::PathBuf> {
    let dir = work.join("pki");
    if !dir.join("ca.pem").exists() {
        write(&dir)?;
    }
    Ok(dir)
}

fn write(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let ca = Ca::new("conformance");
    let rogue = Ca::new("rogue");
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem)?;
    std::fs::write(dir.join("rogue-ca.pem"), &rogue.cert_pem)?;
    let (good, bad) = ([GOOD_ID], ["spiffe://conformance.test/bad"]);
    let id = |uris| LeafOpts {
        uris,
        ..Default::default()
    };
    let proxy_id = ["spiffe://conformance.test/proxy"];
    ca.leaf(
        "s",
        &["conformance.test", "*.conformance.test"],
        id(&proxy_id),
    )
    .copy_to(dir, "server")?;
    ca.leaf("o", &["other.test"], LeafOpts::default())
        .copy_to(dir, "other")?;
    ca.leaf("u", &["upstream.test"], LeafOpts::default())
        .copy_to(dir, "upstream")?;
    ca.leaf("g", &[], id(&good)).copy_to(dir, "client-good")?;
    ca.leaf("b", &[], id(&bad)).copy_to(dir, "client-badsan")?;
    rogue
        .leaf("r", &[], id(&good))
        .copy_to(dir, "client-rogue")?;
    ca.leaf(
        "e",
        &[],
        LeafOpts {
            uris: &[GOOD_ID],
            not_before_days: Some(-10),
            not_after_days: Some(-1),
            ..Default::default()
        },
    )
    .copy_to(dir, "client-expired")?;
    // A UPN (Microsoft's user principal name) otherName beside the URI.
    let upn: &[u64] = &[1, 3, 6, 1, 4, 1, 311, 20, 2, 3];
    ca.leaf(
        "n",
        &[],
        LeafOpts {
            uris: &[GOOD_ID],
            other_names: &[(upn, "client1@conformance.test")],
            ..Default::default()
        },
    )
    .copy_to(dir, "client-upn")?;
    // Revocation: a client the CA's CRL revokes, that CRL, the same CRL
    // expired, and a "CRL" that holds none.
    let revoked = ca.leaf("v", &[], id(&good));
    revoked.copy_to(dir, "client-revoked")?;
    std::fs::write(dir.join("ca.crl.pem"), ca.crl(&[&revoked], 30))?;
    std::fs::write(dir.join("expired.crl.pem"), ca.crl(&[&revoked], -1))?;
    std::fs::write(dir.join("garbage.crl.pem"), "cert-data")
}
