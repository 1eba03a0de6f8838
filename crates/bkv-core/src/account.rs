//! Who a record belongs to: a (tenant, user) pair taken from a verified account token.

use serde::{Deserialize, Serialize};

/// Longest tenant or user name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// Domain label that prefixes every OPAQUE credential identifier.
const CREDENTIAL_LABEL: &[u8] = b"bkv/v1/credential";

/// The account a vault record is keyed by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AccountId {
    tenant: String,
    user: String,
}

/// Why a tenant or user name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// The name is empty.
    #[error("{0} name is empty")]
    Empty(&'static str),
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("{0} name is longer than {MAX_NAME_BYTES} bytes")]
    TooLong(&'static str),
    /// The name holds a control character.
    #[error("{0} name contains a control character")]
    ControlCharacter(&'static str),
}

fn check(kind: &'static str, name: &str) -> Result<(), AccountError> {
    if name.is_empty() {
        return Err(AccountError::Empty(kind));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(AccountError::TooLong(kind));
    }
    if name.chars().any(char::is_control) {
        return Err(AccountError::ControlCharacter(kind));
    }
    Ok(())
}

impl AccountId {
    /// Checks and builds an account id.
    pub fn new(tenant: impl Into<String>, user: impl Into<String>) -> Result<Self, AccountError> {
        let (tenant, user) = (tenant.into(), user.into());
        check("tenant", &tenant)?;
        check("user", &user)?;
        Ok(Self { tenant, user })
    }

    /// The tenant (one messaging app, say) the user belongs to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The user within the tenant.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Unambiguous byte encoding used as OPAQUE credential identifier and as AEAD context,
    /// so that a record, its OPRF key and its wrapped key are bound to this account.
    pub fn credential_identifier(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(CREDENTIAL_LABEL.len() + 4 + self.tenant.len() + self.user.len());
        out.extend_from_slice(CREDENTIAL_LABEL);
        for part in [&self.tenant, &self.user] {
            // Lengths fit in u16: names are at most MAX_NAME_BYTES long.
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out
    }
}

/// Label that separates an enrollment's OPRF salt in its OPRF key identifier.
const OPRF_SALT_LABEL: &[u8] = b"bkv/v1/oprf-salt";

impl AccountId {
    /// The identifier the HSM derives one enrollment's OPRF key from: the account and a
    /// random salt chosen by the HSM for that enrollment. A fresh salt per enrollment means
    /// that starting a new registration never evaluates the live record's OPRF key (which
    /// would let a token holder test PINs offline against a KE2).
    pub fn oprf_identifier(&self, salt: &[u8]) -> Vec<u8> {
        let mut id = self.credential_identifier();
        id.extend_from_slice(OPRF_SALT_LABEL);
        id.extend_from_slice(salt);
        id
    }
}

impl std::fmt::Display for AccountId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tenant, self.user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_identifier_is_unambiguous() {
        let a = AccountId::new("ab", "c").unwrap();
        let b = AccountId::new("a", "bc").unwrap();
        assert_ne!(a.credential_identifier(), b.credential_identifier());
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(AccountId::new("", "u"), Err(AccountError::Empty("tenant")));
        assert_eq!(
            AccountId::new("t", "x".repeat(MAX_NAME_BYTES + 1)),
            Err(AccountError::TooLong("user"))
        );
        assert_eq!(
            AccountId::new("t", "a\nb"),
            Err(AccountError::ControlCharacter("user"))
        );
        assert!(AccountId::new("t", "x".repeat(MAX_NAME_BYTES)).is_ok());
    }
}
