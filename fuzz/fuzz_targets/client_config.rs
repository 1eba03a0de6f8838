//! Client configs from disk: parsing must fail cleanly on anything malformed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = toml::from_str::<bkv_client::ClientConfig>(text) {
            let _ = config.pinned_fleet_key();
            let _ = config.ksf.check();
        }
    }
});
