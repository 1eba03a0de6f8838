use super::*;
use base64::Engine;
use jsonwebtoken::{encode, EncodingKey, Header};
use std::time::{SystemTime, UNIX_EPOCH};

const SECRET: [u8; 32] = [7; 32];

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs_config() -> AuthConfig {
    AuthConfig {
        audience: "vault-a".into(),
        keys: vec![TokenKey::Hs256 {
            secret_hex: hex::encode(SECRET),
        }],
    }
}

fn claims(sub: &str, aud: &str, exp: u64) -> Claims {
    Claims {
        sub: sub.into(),
        aud: aud.into(),
        exp,
        tenant: None,
    }
}

fn hs_token(claims: &Claims, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[test]
fn valid_token_names_its_account() {
    let verifier = TokenVerifier::new(&hs_config()).unwrap();
    let token = hs_token(&claims("alice", "vault-a", now() + 60), &SECRET);
    let account = verifier
        .verify_header(Some(&format!("Bearer {token}")))
        .unwrap();
    assert_eq!(account, AccountId::new(DEFAULT_TENANT, "alice").unwrap());
}

#[test]
fn tenant_claim_is_honoured() {
    let verifier = TokenVerifier::new(&hs_config()).unwrap();
    let mut c = claims("alice", "vault-a", now() + 60);
    c.tenant = Some("messenger".into());
    let account = verifier.verify(&hs_token(&c, &SECRET)).unwrap();
    assert_eq!(account.tenant(), "messenger");
}

#[test]
fn missing_and_malformed_headers_are_refused() {
    let verifier = TokenVerifier::new(&hs_config()).unwrap();
    assert_eq!(verifier.verify_header(None), Err(AuthError::Missing));
    assert_eq!(
        verifier.verify_header(Some("Basic abc")),
        Err(AuthError::Malformed)
    );
    let huge = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES));
    assert_eq!(
        verifier.verify_header(Some(&huge)),
        Err(AuthError::Malformed)
    );
    assert_eq!(
        verifier.verify_header(Some("Bearer not-a-jwt")),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn expired_token_is_refused() {
    let verifier = TokenVerifier::new(&hs_config()).unwrap();
    let token = hs_token(&claims("alice", "vault-a", now() - 60), &SECRET);
    assert_eq!(verifier.verify(&token), Err(AuthError::Expired));
}

#[test]
fn token_for_another_vault_is_refused() {
    let verifier = TokenVerifier::new(&hs_config()).unwrap();
    let token = hs_token(&claims("alice", "vault-b", now() + 60), &SECRET);
    assert_eq!(verifier.verify(&token), Err(AuthError::WrongAudience));
}

#[test]
fn token_signed_with_another_key_is_refused() {
    let verifier = TokenVerifier::new(&hs_config()).unwrap();
    let token = hs_token(&claims("alice", "vault-a", now() + 60), &[8; 32]);
    assert_eq!(verifier.verify(&token), Err(AuthError::BadSignature));
}

#[test]
fn token_with_altered_subject_is_refused() {
    let verifier = TokenVerifier::new(&hs_config()).unwrap();
    let token = hs_token(&claims("bob", "vault-a", now() + 60), &SECRET);
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let forged = claims("alice", "vault-a", now() + 60);
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&forged).unwrap());
    assert_eq!(
        verifier.verify(&parts.join(".")),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn unsigned_token_is_refused() {
    let verifier = TokenVerifier::new(&hs_config()).unwrap();
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64(&serde_json::to_vec(&claims("alice", "vault-a", now() + 60)).unwrap());
    assert_eq!(
        verifier.verify(&format!("{header}.{body}.")),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn invalid_account_in_token_is_refused() {
    let verifier = TokenVerifier::new(&hs_config()).unwrap();
    let token = hs_token(&claims("", "vault-a", now() + 60), &SECRET);
    assert!(matches!(
        verifier.verify(&token),
        Err(AuthError::BadAccount(_))
    ));
}

#[test]
fn eddsa_tokens_from_an_identity_provider_verify() {
    let signing = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let b64 = base64::engine::general_purpose::STANDARD;
    // SubjectPublicKeyInfo and PKCS#8 wrappings of the raw Ed25519 keys (RFC 8410).
    let mut spki = hex::decode("302a300506032b6570032100").unwrap();
    spki.extend_from_slice(signing.verifying_key().as_bytes());
    let mut pkcs8 = hex::decode("302e020100300506032b657004220420").unwrap();
    pkcs8.extend_from_slice(&signing.to_bytes());
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        b64.encode(&spki)
    );
    let config = AuthConfig {
        audience: "vault-a".into(),
        keys: vec![
            TokenKey::Hs256 {
                secret_hex: hex::encode(SECRET),
            },
            TokenKey::Ed25519 {
                public_key_pem: pem,
            },
        ],
    };
    let verifier = TokenVerifier::new(&config).unwrap();
    let token = encode(
        &Header::new(Algorithm::EdDSA),
        &claims("carol", "vault-a", now() + 60),
        &EncodingKey::from_ed_der(&pkcs8),
    )
    .unwrap();
    assert_eq!(verifier.verify(&token).unwrap().user(), "carol");
}

#[test]
fn weak_or_missing_keys_are_refused() {
    let mut config = hs_config();
    config.keys = vec![];
    assert!(matches!(
        TokenVerifier::new(&config),
        Err(AuthConfigError::NoKeys)
    ));
    config.keys = vec![TokenKey::Hs256 {
        secret_hex: hex::encode([1; 16]),
    }];
    assert!(matches!(
        TokenVerifier::new(&config),
        Err(AuthConfigError::BadKey { .. })
    ));
}

mod malformed_input {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_header_is_refused_unless_signed(header in ".{0,300}") {
            let verifier = TokenVerifier::new(&hs_config()).unwrap();
            prop_assert!(verifier.verify_header(Some(&header)).is_err());
            prop_assert!(verifier.verify(&header).is_err());
        }

        #[test]
        fn any_names_are_checked(tenant in ".{0,200}", user in ".{0,200}") {
            if let Ok(account) = AccountId::new(tenant.clone(), user.clone()) {
                prop_assert!(!account.credential_identifier().is_empty());
            }
        }
    }
}
