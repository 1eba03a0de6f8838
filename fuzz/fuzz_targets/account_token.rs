//! Account tokens from the network: every header must be refused unless validly signed.
#![no_main]

use bkv_core::auth::{AuthConfig, TokenKey, TokenVerifier};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn verifier() -> &'static TokenVerifier {
    static VERIFIER: OnceLock<TokenVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        TokenVerifier::new(&AuthConfig {
            audience: "fuzz".into(),
            keys: vec![TokenKey::Hs256 {
                secret_hex: "11".repeat(32),
            }],
        })
        .expect("valid config")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(verifier().verify_header(Some(text)).is_err());
    }
});
