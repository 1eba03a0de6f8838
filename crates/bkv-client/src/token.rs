//! Account tokens as the client obtains them: minted from the dev key, or given.

use crate::config::ClientConfig;
use crate::error::ClientError;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

/// How long a minted dev token lives.
const DEV_TOKEN_SECONDS: u64 = 300;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    tenant: &'a str,
}

/// Where a client's account token comes from.
#[derive(Clone)]
pub enum TokenSource {
    /// A token issued by the app's identity provider.
    Given(Zeroizing<String>),
    /// Minted per call from the dev vault's key (development only).
    Dev {
        /// HS256 secret.
        key: Zeroizing<Vec<u8>>,
        /// The vault's audience.
        audience: String,
        /// The tenant.
        tenant: String,
    },
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Given(_) => f.write_str("Given((redacted))"),
            TokenSource::Dev { audience, .. } => {
                write!(f, "Dev {{ audience: {audience:?}, key: (redacted) }}")
            }
        }
    }
}

impl TokenSource {
    /// The dev token source of a config, if it has one.
    pub fn from_config(config: &ClientConfig) -> Result<Option<Self>, ClientError> {
        let Some(dev) = &config.dev else {
            return Ok(None);
        };
        let key = hex::decode(dev.token_key.trim()).map_err(|_| ClientError::Config {
            path: "dev.token_key".into(),
            reason: "must be hex".into(),
        })?;
        Ok(Some(TokenSource::Dev {
            key: Zeroizing::new(key),
            audience: config.audience.clone(),
            tenant: config.tenant.clone(),
        }))
    }

    /// A token for `user`.
    pub fn token_for(&self, user: &str) -> Result<Zeroizing<String>, ClientError> {
        match self {
            TokenSource::Given(token) => Ok(token.clone()),
            TokenSource::Dev {
                key,
                audience,
                tenant,
            } => {
                let exp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
                    + DEV_TOKEN_SECONDS;
                let claims = Claims {
                    sub: user,
                    aud: audience,
                    exp,
                    tenant,
                };
                encode(
                    &Header::new(Algorithm::HS256),
                    &claims,
                    &EncodingKey::from_secret(key),
                )
                .map(Zeroizing::new)
                .map_err(|e| ClientError::Protocol(format!("cannot mint dev token: {e}")))
            }
        }
    }
}
