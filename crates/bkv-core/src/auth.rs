//! Account tokens: every vault call carries a JWT naming the account it acts on.
//!
//! The frontend is untrusted for secrets but trusted to authenticate accounts, so that
//! an outsider cannot spend a victim's guesses. A call's account comes from its token
//! only, never from a message field.

use crate::account::AccountError;
use crate::AccountId;
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Tenant used when a token names none.
pub const DEFAULT_TENANT: &str = "default";

/// The claims bkv reads from an account token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// The vault the token is meant for.
    pub aud: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The tenant; [`DEFAULT_TENANT`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// One key that may have signed account tokens.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TokenKey {
    /// A shared HMAC-SHA256 secret, hex encoded (the dev setup).
    Hs256 {
        /// The secret, hex.
        secret_hex: String,
    },
    /// An Ed25519 public key in PEM (SubjectPublicKeyInfo), for an identity provider that signs with EdDSA.
    Ed25519 {
        /// The public key, PEM.
        public_key_pem: String,
    },
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenKey::Hs256 { .. } => f.write_str("Hs256((redacted))"),
            TokenKey::Ed25519 { public_key_pem } => write!(f, "Ed25519({public_key_pem:?})"),
        }
    }
}

/// How the frontend checks account tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthConfig {
    /// The `aud` every token must carry.
    pub audience: String,
    /// Keys any of which may have signed a token.
    pub keys: Vec<TokenKey>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing account token (authorization: Bearer <JWT>)")]
    Missing,
    /// The metadata is not `Bearer <JWT>` or is too long.
    #[error("malformed authorization header")]
    Malformed,
    /// The token expired.
    #[error("account token expired")]
    Expired,
    /// The token is for another vault.
    #[error("account token is for another vault (wrong audience)")]
    WrongAudience,
    /// No configured key verifies the token, or it does not decode.
    #[error("account token is not signed by a trusted key")]
    BadSignature,
    /// The token names an account that cannot exist.
    #[error("account token names an invalid account: {0}")]
    BadAccount(AccountError),
}

/// Why an [`AuthConfig`] could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// No keys configured.
    #[error("auth config lists no token keys")]
    NoKeys,
    /// A key does not parse.
    #[error("token key {index} is invalid: {reason}")]
    BadKey {
        /// Position in the list.
        index: usize,
        /// What was wrong.
        reason: String,
    },
}

/// Checks account tokens against configured keys.
pub struct TokenVerifier {
    keys: Vec<(DecodingKey, Algorithm)>,
    audience: String,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("audience", &self.audience)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl TokenVerifier {
    /// Builds a verifier from configuration.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        if config.keys.is_empty() {
            return Err(AuthConfigError::NoKeys);
        }
        let keys = config
            .keys
            .iter()
            .enumerate()
            .map(|(index, key)| {
                let bad = |reason: String| AuthConfigError::BadKey { index, reason };
                match key {
                    TokenKey::Hs256 { secret_hex } => {
                        let secret = hex::decode(secret_hex).map_err(|e| bad(e.to_string()))?;
                        if secret.len() < 32 {
                            return Err(bad("an HS256 secret needs at least 32 bytes".into()));
                        }
                        Ok((DecodingKey::from_secret(&secret), Algorithm::HS256))
                    }
                    TokenKey::Ed25519 { public_key_pem } => {
                        DecodingKey::from_ed_pem(public_key_pem.as_bytes())
                            .map(|k| (k, Algorithm::EdDSA))
                            .map_err(|e| bad(e.to_string()))
                    }
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            keys,
            audience: config.audience.clone(),
        })
    }

    /// Checks an `authorization` header value and returns the account it names.
    pub fn verify_header(&self, header: Option<&str>) -> Result<AccountId, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        if header.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let token = header.strip_prefix("Bearer ").ok_or(AuthError::Malformed)?;
        self.verify(token.trim())
    }

    /// Checks a bare JWT and returns the account it names.
    pub fn verify(&self, token: &str) -> Result<AccountId, AuthError> {
        let mut last = AuthError::BadSignature;
        for (key, algorithm) in &self.keys {
            let mut validation = Validation::new(*algorithm);
            validation.set_audience(&[&self.audience]);
            validation.set_required_spec_claims(&["exp", "aud", "sub"]);
            validation.leeway = 5;
            match decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    let tenant = claims.tenant.as_deref().unwrap_or(DEFAULT_TENANT);
                    return AccountId::new(tenant, claims.sub).map_err(AuthError::BadAccount);
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        ErrorKind::InvalidAudience => AuthError::WrongAudience,
                        _ => AuthError::BadSignature,
                    };
                    // A signature checked by this key but with bad claims is final.
                    if last != AuthError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests;
