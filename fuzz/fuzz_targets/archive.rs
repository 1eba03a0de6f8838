//! Backup archives from a hostile store: decrypt-and-parse must fail cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn identity() -> &'static age::x25519::Identity {
    static ID: OnceLock<age::x25519::Identity> = OnceLock::new();
    ID.get_or_init(age::x25519::Identity::generate)
}

fuzz_target!(|data: &[u8]| {
    let _ = bkv_client::backup::archive::verify(data, identity());
});
