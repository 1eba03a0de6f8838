//! The client's secrets: the backup key and the PIN. Zeroized on drop, redacted in
//! `Debug`, compared in constant time.

use rand_core::{CryptoRng, RngCore};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of a backup key in bytes.
pub const BACKUP_KEY_LEN: usize = 32;
/// Digits in a recovery code (hexadecimal: 4 bits each).
pub const RECOVERY_CODE_DIGITS: usize = 2 * BACKUP_KEY_LEN;
/// Fewest characters a PIN may have.
pub const MIN_PIN_CHARS: usize = 4;
/// Most characters a PIN may have.
pub const MAX_PIN_CHARS: usize = 128;

/// The key that encrypts a user's backups; made on the device, escrowed behind the PIN.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct BackupKey([u8; BACKUP_KEY_LEN]);

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupKey((redacted))")
    }
}

impl PartialEq for BackupKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for BackupKey {}

/// Why a recovery code or key bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    /// Not 32 bytes.
    #[error("a backup key is {BACKUP_KEY_LEN} bytes, found {0}")]
    Length(usize),
    /// Not 64 hexadecimal digits.
    #[error("a recovery code is {RECOVERY_CODE_DIGITS} hexadecimal digits (0-9, a-f; spaces and dashes are ignored), found {0} digits")]
    CodeLength(usize),
    /// A character that is not a hexadecimal digit, space or dash.
    #[error("a recovery code holds only hexadecimal digits (0-9, a-f), spaces and dashes")]
    CodeCharacter,
}

impl BackupKey {
    /// Makes a fresh random key.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut key = [0u8; BACKUP_KEY_LEN];
        rng.fill_bytes(&mut key);
        Self(key)
    }

    /// Takes a key from its raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyFormatError> {
        let key: [u8; BACKUP_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| KeyFormatError::Length(bytes.len()))?;
        Ok(Self(key))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; BACKUP_KEY_LEN] {
        &self.0
    }

    /// The key as a 64-digit recovery code, in 16 groups of 4 hex digits.
    pub fn recovery_code(&self) -> Zeroizing<String> {
        let digits = Zeroizing::new(hex::encode(self.0));
        let mut code = Zeroizing::new(String::with_capacity(RECOVERY_CODE_DIGITS + 15));
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && i % 4 == 0 {
                code.push(' ');
            }
            code.push(c);
        }
        code
    }

    /// Reads a recovery code back into the key; spaces, dashes and case are ignored.
    pub fn from_recovery_code(code: &str) -> Result<Self, KeyFormatError> {
        let mut digits = Zeroizing::new(String::with_capacity(RECOVERY_CODE_DIGITS));
        for c in code.trim().chars() {
            match c {
                ' ' | '-' => {}
                c if c.is_ascii_hexdigit() => digits.push(c.to_ascii_lowercase()),
                _ => return Err(KeyFormatError::CodeCharacter),
            }
        }
        if digits.len() != RECOVERY_CODE_DIGITS {
            return Err(KeyFormatError::CodeLength(digits.len()));
        }
        let mut key = [0u8; BACKUP_KEY_LEN];
        hex::decode_to_slice(digits.as_bytes(), &mut key)
            .map_err(|_| KeyFormatError::CodeCharacter)?;
        Ok(Self(key))
    }
}

/// The short secret the user knows.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Pin(String);

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin((redacted))")
    }
}

/// Why a PIN was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// Too short or too long.
    #[error("a PIN has {MIN_PIN_CHARS} to {MAX_PIN_CHARS} characters, this one has {0}")]
    Length(usize),
    /// Holds a control character (a stray newline, say).
    #[error("a PIN cannot contain control characters")]
    ControlCharacter,
}

impl Pin {
    /// Checks and takes a PIN. A single trailing newline (from a file or stdin) is dropped.
    pub fn new(mut text: String) -> Result<Self, PinError> {
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        let text = Zeroizing::new(text);
        let chars = text.chars().count();
        if !(MIN_PIN_CHARS..=MAX_PIN_CHARS).contains(&chars) {
            return Err(PinError::Length(chars));
        }
        if text.chars().any(char::is_control) {
            return Err(PinError::ControlCharacter);
        }
        Ok(Self(text.to_string()))
    }

    /// The PIN's bytes, for OPAQUE.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn recovery_code_round_trips() {
        let key = BackupKey::generate(&mut OsRng);
        let code = key.recovery_code();
        assert_eq!(
            code.chars().filter(|c| c.is_ascii_hexdigit()).count(),
            RECOVERY_CODE_DIGITS
        );
        assert_eq!(BackupKey::from_recovery_code(&code).unwrap(), key);
        let dashed = code.replace(' ', "-").to_uppercase();
        assert_eq!(BackupKey::from_recovery_code(&dashed).unwrap(), key);
    }

    #[test]
    fn bad_recovery_codes_are_refused() {
        assert_eq!(
            BackupKey::from_recovery_code("12"),
            Err(KeyFormatError::CodeLength(2))
        );
        let long = "0".repeat(65);
        assert_eq!(
            BackupKey::from_recovery_code(&long),
            Err(KeyFormatError::CodeLength(65))
        );
        let bad = format!("{}g", "0".repeat(63));
        assert_eq!(
            BackupKey::from_recovery_code(&bad),
            Err(KeyFormatError::CodeCharacter)
        );
    }

    #[test]
    fn pin_rules() {
        assert!(Pin::new("1234\n".into()).is_ok());
        assert!(Pin::new("1234\r\n".into()).is_ok());
        assert_eq!(Pin::new("123".into()).err(), Some(PinError::Length(3)));
        assert_eq!(Pin::new("x".repeat(129)).err(), Some(PinError::Length(129)));
        assert!(
            Pin::new("é".repeat(128)).is_ok(),
            "length counts characters, not bytes"
        );
        assert_eq!(
            Pin::new("12\t34".into()).err(),
            Some(PinError::ControlCharacter)
        );
        assert_eq!(
            Pin::new("1234\n\n".into()).err(),
            Some(PinError::ControlCharacter)
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let key = BackupKey::from_bytes(&[0xAB; 32]).unwrap();
        assert_eq!(format!("{key:?}"), "BackupKey((redacted))");
        assert_eq!(
            format!("{:?}", Pin::new("secret-pin".into()).unwrap()),
            "Pin((redacted))"
        );
    }

    #[test]
    fn key_equality() {
        let a = BackupKey::from_bytes(&[1; 32]).unwrap();
        assert_eq!(a, BackupKey::from_bytes(&[1; 32]).unwrap());
        assert_ne!(a, BackupKey::from_bytes(&[2; 32]).unwrap());
        assert_eq!(
            BackupKey::from_bytes(&[1; 31]),
            Err(KeyFormatError::Length(31))
        );
    }
}

#[cfg(test)]
mod malformed_input {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_text_as_recovery_code_or_pin_is_handled(text in ".{0,200}") {
            if let Ok(key) = BackupKey::from_recovery_code(&text) {
                prop_assert_eq!(BackupKey::from_recovery_code(&key.recovery_code()).unwrap(), key);
            }
            let _ = Pin::new(text);
        }
    }
}
