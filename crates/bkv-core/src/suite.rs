//! The OPAQUE cipher suite every bkv party speaks (RFC 9807 with Argon2id as KSF).

use opaque_ke::CipherSuite;

/// Ristretto255 OPRF, 3DH over Ristretto255 with SHA-512, Argon2id key stretching.
pub struct Suite;

impl CipherSuite for Suite {
    type OprfCs = opaque_ke::Ristretto255;
    type KeyExchange = opaque_ke::TripleDh<opaque_ke::Ristretto255, sha2::Sha512>;
    type Ksf = argon2::Argon2<'static>;
}

/// Size of a fleet's OPAQUE public key (a compressed Ristretto255 point).
pub const FLEET_KEY_LEN: usize = 32;
