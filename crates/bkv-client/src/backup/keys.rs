//! Keys derived from the backup key for archives: the age identity that encrypts them and
//! the locator that names them in the store. Both are one-way, labelled HKDF outputs.

use crate::secrets::BackupKey;
use hkdf::Hkdf;
use sha2::Sha256;
use std::str::FromStr;
use zeroize::Zeroizing;

const AGE_IDENTITY_LABEL: &[u8] = b"bkv/v1/age-identity";
const LOCATOR_LABEL: &[u8] = b"bkv/v1/backup-locator";

fn derive(key: &BackupKey, label: &[u8]) -> Zeroizing<[u8; 32]> {
    let hkdf = Hkdf::<Sha256>::new(None, key.as_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    hkdf.expand(label, out.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

/// The age X25519 identity of `key`'s archives, in age's `AGE-SECRET-KEY-1…` form, so the
/// standard `age -d -i` tool can decrypt them.
pub fn age_identity_string(key: &BackupKey) -> Zeroizing<String> {
    let secret = derive(key, AGE_IDENTITY_LABEL);
    let hrp = bech32::Hrp::parse("age-secret-key-").expect("valid age HRP");
    let encoded = Zeroizing::new(
        bech32::encode::<bech32::Bech32>(hrp, secret.as_ref()).expect("32 bytes encode"),
    );
    Zeroizing::new(encoded.to_uppercase())
}

/// The age identity of `key`'s archives.
pub fn age_identity(key: &BackupKey) -> age::x25519::Identity {
    let text = age_identity_string(key);
    age::x25519::Identity::from_str(&text).expect("a derived identity always parses")
}

/// Names `key`'s archives in the store without revealing anything about the key.
pub fn locator(key: &BackupKey) -> String {
    hex::encode(&derive(key, LOCATOR_LABEL)[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_are_stable_and_distinct() {
        let a = BackupKey::from_bytes(&[1; 32]).unwrap();
        let b = BackupKey::from_bytes(&[2; 32]).unwrap();
        assert_eq!(
            age_identity_string(&a).as_str(),
            age_identity_string(&a).as_str()
        );
        assert!(age_identity_string(&a).starts_with("AGE-SECRET-KEY-1"));
        assert_ne!(
            age_identity_string(&a).as_str(),
            age_identity_string(&b).as_str()
        );
        assert_eq!(locator(&a), locator(&a));
        assert_ne!(locator(&a), locator(&b));
        assert_eq!(locator(&a).len(), 24);
        assert!(age_identity(&a).to_public().to_string().starts_with("age1"));
    }
}
