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

/// Argon2id cost a client uses to stretch its PIN. Public: stored beside the record and
/// returned to a recovering device, so that recovery does not depend on local settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KsfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Number of passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

/// Why Argon2id parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Argon2id parameters out of range: memory {min_memory_kib}..={max_memory_kib} KiB, iterations 1..={max_iterations}, parallelism 1..={max_parallelism}")]
pub struct KsfParamsError {
    min_memory_kib: u32,
    max_memory_kib: u32,
    max_iterations: u32,
    max_parallelism: u32,
}

impl KsfParams {
    /// OWASP's recommended Argon2id cost (19 MiB, 2 passes, 1 lane); about 25 ms on a laptop core.
    pub const RECOMMENDED: KsfParams = KsfParams {
        memory_kib: 19 * 1024,
        iterations: 2,
        parallelism: 1,
    };
    /// Largest memory cost accepted (1 GiB): a hostile vault must not make a device exhaust memory.
    pub const MAX_MEMORY_KIB: u32 = 1024 * 1024;
    /// Most passes accepted.
    pub const MAX_ITERATIONS: u32 = 64;
    /// Most lanes accepted.
    pub const MAX_PARALLELISM: u32 = 16;

    /// Checks the parameters are within the bounds every bkv party accepts.
    pub fn check(self) -> Result<Self, KsfParamsError> {
        let min_memory = 8 * self.parallelism.max(1);
        let ok = (1..=Self::MAX_PARALLELISM).contains(&self.parallelism)
            && (1..=Self::MAX_ITERATIONS).contains(&self.iterations)
            && (min_memory..=Self::MAX_MEMORY_KIB).contains(&self.memory_kib);
        if ok {
            Ok(self)
        } else {
            Err(KsfParamsError {
                min_memory_kib: min_memory,
                max_memory_kib: Self::MAX_MEMORY_KIB,
                max_iterations: Self::MAX_ITERATIONS,
                max_parallelism: Self::MAX_PARALLELISM,
            })
        }
    }

    /// The Argon2id instance these parameters describe.
    pub fn argon2(self) -> Result<argon2::Argon2<'static>, KsfParamsError> {
        let p = self.check()?;
        let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, None)
            .expect("checked parameters are accepted by argon2");
        Ok(argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            params,
        ))
    }
}

impl Default for KsfParams {
    fn default() -> Self {
        Self::RECOMMENDED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ksf_bounds() {
        assert!(KsfParams::RECOMMENDED.check().is_ok());
        let bad = [
            KsfParams {
                memory_kib: 7,
                iterations: 1,
                parallelism: 1,
            },
            KsfParams {
                memory_kib: KsfParams::MAX_MEMORY_KIB + 1,
                iterations: 1,
                parallelism: 1,
            },
            KsfParams {
                memory_kib: 64,
                iterations: 0,
                parallelism: 1,
            },
            KsfParams {
                memory_kib: 64,
                iterations: 65,
                parallelism: 1,
            },
            KsfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 0,
            },
            KsfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 17,
            },
        ];
        for params in bad {
            assert!(params.check().is_err(), "{params:?}");
            assert!(params.argon2().is_err());
        }
    }
}
