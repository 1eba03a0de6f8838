//! Sealed peer messages from a hostile host: decoding and opening must fail cleanly.
#![no_main]

use bkv_hsm::channel::{Envelope, Identity, PeerChannels};
use bkv_hsm::{Platform, SimulatedPlatform};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

fn channels() -> &'static PeerChannels {
    static CHANNELS: OnceLock<PeerChannels> = OnceLock::new();
    CHANNELS.get_or_init(|| {
        let (platform, _) = SimulatedPlatform::new(1, [1; 32]);
        let me = Arc::new(Identity::generate(&platform, "dc1"));
        PeerChannels::new(me, platform.attestation_root(), platform.measurement())
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = postcard::from_bytes::<Envelope>(data) {
        let _ = channels().open(&envelope, 0);
    }
});
