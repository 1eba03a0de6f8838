//! Labelled key derivation and authenticated encryption: the one place where bkv
//! turns an OPAQUE output into an AEAD key, so every use is domain-separated.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use sha2::Sha512;
use zeroize::Zeroizing;

/// Label for the key, derived from OPAQUE's `export_key`, that wraps the backup key.
pub const LABEL_BACKUP_KEY_WRAP: &[u8] = b"bkv/v1/backup-key-wrap";
/// Label for the key, derived from the OPAQUE session key, that seals the released wrapped key.
pub const LABEL_KEY_RELEASE: &[u8] = b"bkv/v1/key-release";

/// Label of the AEAD that releases a retire ticket under the OPAQUE session key.
pub const LABEL_RETIRE_TICKET_RELEASE: &[u8] = b"bkv/v1/retire-ticket-release";

/// A retire ticket: the enrollment's generation and a MAC binding it to fleet and account.
pub const RETIRE_TICKET_LEN: usize = 8 + 32;

/// What a correct PIN releases for retiring: the ticket, then the confirmation key.
pub const RETIRE_RELEASE_LEN: usize = RETIRE_TICKET_LEN + 32;

/// Label of the HSM's proof that it retired a record.
const LABEL_RETIRED: &[u8] = b"bkv/v1/retired\0";

/// The proof that a record was retired: HMAC-SHA256 under the confirmation key released
/// (sealed) with the retire ticket, which the frontend never sees, so it cannot forge it.
pub fn retire_confirmation(
    confirm_key: &[u8; 32],
    account: &crate::AccountId,
    generation: u64,
) -> [u8; 32] {
    use hmac::Mac as _;
    let mut mac = <hmac::Hmac<Sha512> as hmac::Mac>::new_from_slice(confirm_key)
        .expect("HMAC takes any key length");
    let account = account.to_string();
    mac.update(LABEL_RETIRED);
    mac.update(&(account.len() as u32).to_be_bytes());
    mac.update(account.as_bytes());
    mac.update(&generation.to_be_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(&mac.finalize().into_bytes()[..32]);
    out
}

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Largest sealed payload accepted, so a hostile peer cannot make us allocate much.
pub const MAX_SEALED_LEN: usize = 1024;

/// Why a sealed payload could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Too short to hold a nonce and a tag, or longer than [`MAX_SEALED_LEN`].
    #[error("sealed payload has an impossible length")]
    Length,
    /// The tag did not verify: wrong key, wrong context, or altered bytes.
    #[error("sealed payload does not authenticate")]
    Authentication,
}

/// Derives a 32-byte AEAD key from `ikm` for the purpose named by `label`, bound to `context`.
pub fn derive_key(label: &[u8], ikm: &[u8], context: &[u8]) -> Zeroizing<[u8; 32]> {
    let hkdf = Hkdf::<Sha512>::new(None, ikm);
    let mut key = Zeroizing::new([0u8; 32]);
    hkdf.expand_multi_info(&[label, &[0u8], context], key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA512 output length");
    key
}

fn aad(label: &[u8], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(label.len() + 1 + context.len());
    aad.extend_from_slice(label);
    aad.push(0);
    aad.extend_from_slice(context);
    aad
}

/// Encrypts `plaintext` under a key derived from `ikm`; output is nonce ‖ ciphertext ‖ tag.
pub fn seal(
    rng: &mut (impl RngCore + CryptoRng),
    label: &[u8],
    ikm: &[u8],
    context: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let key = derive_key(label, ikm, context);
    let cipher = XChaCha20Poly1305::new(key.as_ref().into());
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);
    let aad = aad(label, context);
    let ciphertext = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .expect("XChaCha20-Poly1305 encryption of a short buffer cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    out
}

/// Opens what [`seal`] made with the same label, key material and context.
pub fn open(
    label: &[u8],
    ikm: &[u8],
    context: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    if sealed.len() < NONCE_LEN + TAG_LEN || sealed.len() > MAX_SEALED_LEN {
        return Err(SealError::Length);
    }
    let key = derive_key(label, ikm, context);
    let cipher = XChaCha20Poly1305::new(key.as_ref().into());
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let aad = aad(label, context);
    cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| SealError::Authentication)
}

/// AEAD context for a released key: binds it to one login and one account.
pub fn release_context(login_id: &[u8], account: &crate::AccountId) -> Vec<u8> {
    let mut context = login_id.to_vec();
    context.extend_from_slice(&account.credential_identifier());
    context
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn round_trip_and_binding() {
        let sealed = seal(&mut OsRng, LABEL_KEY_RELEASE, b"ikm", b"ctx", b"secret");
        assert_eq!(
            &open(LABEL_KEY_RELEASE, b"ikm", b"ctx", &sealed).unwrap()[..],
            b"secret"
        );
        assert_eq!(
            open(LABEL_BACKUP_KEY_WRAP, b"ikm", b"ctx", &sealed),
            Err(SealError::Authentication)
        );
        assert_eq!(
            open(LABEL_KEY_RELEASE, b"other", b"ctx", &sealed),
            Err(SealError::Authentication)
        );
        assert_eq!(
            open(LABEL_KEY_RELEASE, b"ikm", b"other", &sealed),
            Err(SealError::Authentication)
        );
        let mut tampered = sealed.clone();
        tampered[30] ^= 1;
        assert_eq!(
            open(LABEL_KEY_RELEASE, b"ikm", b"ctx", &tampered),
            Err(SealError::Authentication)
        );
        assert_eq!(
            open(LABEL_KEY_RELEASE, b"ikm", b"ctx", &sealed[..10]),
            Err(SealError::Length)
        );
    }
}
