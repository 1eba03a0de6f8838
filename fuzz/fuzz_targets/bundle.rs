//! Validation bundles from the network: no panic, no unbounded allocation, and nothing
//! the fuzzer makes verifies under keys whose secrets it does not have.
#![no_main]

use bkv_core::bundle::{Bundle, BundleKeys};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = BundleKeys {
        // Real public keys of seeds nobody outside this file uses as signers here.
        witness: ed25519_public(7),
        operator: ed25519_public(9),
    };
    if let Ok(bundle) = Bundle::from_json(data) {
        assert!(bundle.verify(&keys).is_err());
    }
    let _ = bkv_hsm::evidence::verify_evidence(&match serde_json::from_slice(data) {
        Ok(entry) => entry,
        Err(_) => return,
    });
});

fn ed25519_public(seed: u8) -> [u8; 32] {
    ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
        .verifying_key()
        .to_bytes()
}
