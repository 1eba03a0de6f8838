//! The Ed25519 signing keys of the witness and of the operator: a key file for the dev
//! setup, or a non-extractable key in a PKCS#11 token (an HSM; SoftHSMv2 in tests).

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use ed25519_dalek::{Signer as _, SigningKey};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use zeroize::Zeroizing;

/// DER of the Ed25519 curve's object identifier (1.3.101.112), the token's `CKA_EC_PARAMS`.
const ED25519_OID: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

/// Where a signing key lives, as a config file's `[signer]` table says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum SignerConfig {
    /// A 32-byte Ed25519 seed in a file (mode 0600), relative to the config's directory.
    File {
        /// The key file.
        path: PathBuf,
    },
    /// A key pair in a PKCS#11 token.
    Pkcs11 {
        /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
        module: PathBuf,
        /// The token's label.
        token: String,
        /// Name of the environment variable holding the user PIN (never the PIN itself).
        pin_env: String,
        /// The key pair's label.
        key_label: String,
    },
}

/// Why a signer could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// Key file trouble.
    #[error("key file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// PKCS#11 trouble.
    #[error("PKCS#11: {0}")]
    Pkcs11(String),
}

fn p11(context: &str) -> impl Fn(cryptoki::error::Error) -> SignerError + '_ {
    move |e| SignerError::Pkcs11(format!("{context}: {e}"))
}

/// A token session and the private key in it.
struct TokenKey {
    session: Session,
    private: ObjectHandle,
    // Kept so the library stays loaded as long as the session.
    _pkcs11: Pkcs11,
}

enum Inner {
    File(Box<SigningKey>),
    Token(Mutex<TokenKey>),
}

/// An Ed25519 signer. Its secret never appears in `Debug` or logs.
pub struct Signer {
    inner: Inner,
    public: [u8; 32],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.inner {
            Inner::File(_) => "file",
            Inner::Token(_) => "pkcs11",
        };
        f.debug_struct("Signer")
            .field("kind", &kind)
            .field("public", &hex::encode(self.public))
            .finish()
    }
}

fn file_error(path: &Path, reason: impl ToString) -> SignerError {
    SignerError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// One initialized context per module per process: a module is initialized once, and
/// finalized only when its last user is gone.
fn module_context(module: &Path) -> Result<Pkcs11, SignerError> {
    static MODULES: Mutex<Vec<(PathBuf, Pkcs11)>> = Mutex::new(Vec::new());
    let mut modules = MODULES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, context)) = modules.iter().find(|(path, _)| path == module) {
        return Ok(context.clone());
    }
    let pkcs11 = Pkcs11::new(module).map_err(p11("cannot load the module"))?;
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(p11("cannot initialize the module"))?;
    modules.push((module.to_path_buf(), pkcs11.clone()));
    Ok(pkcs11)
}

fn open_token(module: &Path, token: &str, pin_env: &str) -> Result<(Pkcs11, Session), SignerError> {
    let pin = Zeroizing::new(std::env::var(pin_env).map_err(|_| {
        SignerError::Pkcs11(format!(
            "the token PIN is read from ${pin_env}, which is not set"
        ))
    })?);
    let pkcs11 = module_context(module)?;
    let slot = pkcs11
        .get_slots_with_token()
        .map_err(p11("cannot list slots"))?
        .into_iter()
        .find(|slot| {
            pkcs11
                .get_token_info(*slot)
                .map(|info| info.label().trim_end() == token)
                .unwrap_or(false)
        })
        .ok_or_else(|| SignerError::Pkcs11(format!("no token labelled {token:?}")))?;
    let session = pkcs11
        .open_rw_session(slot)
        .map_err(p11("cannot open a session"))?;
    // A token's login is shared by every session of the process.
    match session.login(UserType::User, Some(&AuthPin::from(pin.as_str()))) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(p11("cannot log in")(e)),
    }
    Ok((pkcs11, session))
}

fn find_one(
    session: &Session,
    class: ObjectClass,
    label: &str,
) -> Result<Option<ObjectHandle>, SignerError> {
    let found = session
        .find_objects(&[
            Attribute::Class(class),
            Attribute::KeyType(KeyType::EC_EDWARDS),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(p11("cannot search the token"))?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(SignerError::Pkcs11(format!(
            "{} keys labelled {label:?}: refusing to guess",
            found.len()
        ))),
    }
}

fn token_public_key(session: &Session, public: ObjectHandle) -> Result<[u8; 32], SignerError> {
    let attributes = session
        .get_attributes(public, &[AttributeType::EcPoint])
        .map_err(p11("cannot read the public key"))?;
    let point = attributes
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .ok_or_else(|| SignerError::Pkcs11("the public key has no EC point".into()))?;
    // Tokens return the point raw or wrapped in a DER OCTET STRING.
    let raw = match point.as_slice() {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest,
        raw if raw.len() == 32 => raw,
        _ => {
            return Err(SignerError::Pkcs11(
                "the public key is not an Ed25519 point".into(),
            ))
        }
    };
    let mut key = [0u8; 32];
    key.copy_from_slice(raw);
    Ok(key)
}

impl Signer {
    /// Opens the key `config` names; relative paths are taken from `base`.
    pub fn open(config: &SignerConfig, base: &Path) -> Result<Self, SignerError> {
        match config {
            SignerConfig::File { path } => {
                let path = base.join(path);
                let bytes = Zeroizing::new(std::fs::read(&path).map_err(|e| file_error(&path, e))?);
                let seed: &[u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| file_error(&path, "not an Ed25519 key (expected 32 bytes)"))?;
                let key = SigningKey::from_bytes(seed);
                Ok(Self {
                    public: key.verifying_key().to_bytes(),
                    inner: Inner::File(Box::new(key)),
                })
            }
            SignerConfig::Pkcs11 {
                module,
                token,
                pin_env,
                key_label,
            } => {
                let (pkcs11, session) = open_token(module, token, pin_env)?;
                let private =
                    find_one(&session, ObjectClass::PRIVATE_KEY, key_label)?.ok_or_else(|| {
                        SignerError::Pkcs11(format!("no private key labelled {key_label:?}"))
                    })?;
                let public =
                    find_one(&session, ObjectClass::PUBLIC_KEY, key_label)?.ok_or_else(|| {
                        SignerError::Pkcs11(format!("no public key labelled {key_label:?}"))
                    })?;
                let public = token_public_key(&session, public)?;
                let signer = Self {
                    public,
                    inner: Inner::Token(Mutex::new(TokenKey {
                        session,
                        private,
                        _pkcs11: pkcs11,
                    })),
                };
                // A token key that does not match its public half would sign junk.
                let probe = signer.sign(b"bkv/v1/signer-probe")?;
                if !bkv_core::bundle::ed25519_verify(&signer.public, b"bkv/v1/signer-probe", &probe)
                {
                    return Err(SignerError::Pkcs11(
                        "the token's signature does not verify under its public key".into(),
                    ));
                }
                Ok(signer)
            }
        }
    }

    /// Makes the key `config` names (a new file, or a new non-extractable token key pair)
    /// and opens it. Refuses to replace an existing key.
    pub fn generate(config: &SignerConfig, base: &Path) -> Result<Self, SignerError> {
        match config {
            SignerConfig::File { path } => {
                let path = base.join(path);
                let mut seed = Zeroizing::new([0u8; 32]);
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, seed.as_mut());
                let key = SigningKey::from_bytes(&seed);
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    options.mode(0o600);
                }
                let mut file = options.open(&path).map_err(|e| file_error(&path, e))?;
                std::io::Write::write_all(&mut file, key.as_bytes())
                    .and_then(|_| file.sync_all())
                    .map_err(|e| file_error(&path, e))?;
            }
            SignerConfig::Pkcs11 {
                module,
                token,
                pin_env,
                key_label,
            } => {
                let (_pkcs11, session) = open_token(module, token, pin_env)?;
                if find_one(&session, ObjectClass::PRIVATE_KEY, key_label)?.is_some() {
                    return Err(SignerError::Pkcs11(format!(
                        "a key labelled {key_label:?} already exists"
                    )));
                }
                let label = Attribute::Label(key_label.as_bytes().to_vec());
                session
                    .generate_key_pair(
                        &Mechanism::EccEdwardsKeyPairGen,
                        &[
                            Attribute::Token(true),
                            Attribute::Verify(true),
                            Attribute::EcParams(ED25519_OID.to_vec()),
                            label.clone(),
                        ],
                        &[
                            Attribute::Token(true),
                            Attribute::Private(true),
                            Attribute::Sensitive(true),
                            Attribute::Extractable(false),
                            Attribute::Sign(true),
                            label,
                        ],
                    )
                    .map_err(p11("cannot generate the key pair"))?;
            }
        }
        Self::open(config, base)
    }

    /// The Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Signs `message` (already labelled by the caller's format).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignerError> {
        match &self.inner {
            Inner::File(key) => Ok(key.sign(message).to_bytes().to_vec()),
            Inner::Token(token) => {
                let token = token.lock().unwrap_or_else(|e| e.into_inner());
                token
                    .session
                    .sign(
                        &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                        token.private,
                        message,
                    )
                    .map_err(p11("cannot sign"))
            }
        }
    }
}
