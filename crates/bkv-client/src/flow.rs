//! The client's side of enrollment and recovery as typed states: each step consumes the
//! previous state, so a message can only be handled where the protocol allows it.
//! No networking here; [`crate::VaultClient`] carries the bytes.

use crate::error::{ClientError, TrustError};
use crate::secrets::{BackupKey, Pin};
use bkv_core::seal::{self, LABEL_BACKUP_KEY_WRAP, LABEL_KEY_RELEASE};
use bkv_core::{AccountId, KsfParams, Suite};
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
};
use rand_core::{CryptoRng, RngCore};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

fn check_fleet_key(presented: &[u8], pinned: &[u8; 32]) -> Result<(), TrustError> {
    if presented.len() == pinned.len() && bool::from(presented.ct_eq(pinned)) {
        Ok(())
    } else {
        Err(TrustError::FleetKeyMismatch {
            presented: hex::encode(presented),
            pinned: hex::encode(pinned),
        })
    }
}

/// Enrollment after the blinded PIN was sent; awaits the registration response.
pub struct EnrollmentStarted {
    account: AccountId,
    pin: Pin,
    ksf: KsfParams,
    state: ClientRegistration<Suite>,
}

/// What enrollment uploads: the OPAQUE record and the wrapped backup key.
pub struct EnrollmentUpload {
    /// OPAQUE RegistrationUpload bytes.
    pub registration_upload: Vec<u8>,
    /// The backup key sealed under a key derived from `export_key`.
    pub wrapped_key: Vec<u8>,
    /// Argon2id cost used.
    pub ksf: KsfParams,
}

impl EnrollmentStarted {
    /// Blinds the PIN; returns the state and the RegistrationRequest to send.
    pub fn begin(
        rng: &mut (impl RngCore + CryptoRng),
        account: AccountId,
        pin: Pin,
        ksf: KsfParams,
    ) -> Result<(Self, Vec<u8>), ClientError> {
        let start = ClientRegistration::<Suite>::start(rng, pin.as_bytes())
            .map_err(|e| ClientError::Protocol(format!("cannot blind PIN: {e}")))?;
        let request = start.message.serialize().to_vec();
        Ok((
            Self {
                account,
                pin,
                ksf,
                state: start.state,
            },
            request,
        ))
    }

    /// Checks the vault's key against the pinned one, then finishes OPAQUE registration
    /// and wraps `backup_key` under a key derived from `export_key`.
    pub fn finish(
        self,
        rng: &mut (impl RngCore + CryptoRng),
        response: &[u8],
        announced_fleet_key: &[u8],
        pinned: &[u8; 32],
        backup_key: &BackupKey,
    ) -> Result<EnrollmentUpload, ClientError> {
        check_fleet_key(announced_fleet_key, pinned)?;
        let response = RegistrationResponse::<Suite>::deserialize(response)
            .map_err(|_| ClientError::Protocol("malformed registration response".into()))?;
        let ksf = self
            .ksf
            .argon2()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let finished = self
            .state
            .finish(
                rng,
                self.pin.as_bytes(),
                response,
                ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf)),
            )
            .map_err(|e| ClientError::Protocol(format!("registration failed: {e}")))?;
        // The key inside the OPAQUE message is what the record will be bound to.
        check_fleet_key(&finished.server_s_pk.serialize(), pinned)?;
        let wrapped_key = seal::seal(
            rng,
            LABEL_BACKUP_KEY_WRAP,
            &finished.export_key,
            &self.account.credential_identifier(),
            backup_key.as_bytes(),
        );
        Ok(EnrollmentUpload {
            registration_upload: finished.message.serialize().to_vec(),
            wrapped_key,
            ksf: self.ksf,
        })
    }
}

/// Recovery after KE1 was sent; awaits KE2.
pub struct RecoveryStarted {
    account: AccountId,
    pin: Pin,
    state: ClientLogin<Suite>,
}

/// What the vault answered to KE1.
pub struct Ke2<'a> {
    /// OPAQUE KE2 bytes.
    pub ke2: &'a [u8],
    /// The fleet key the vault announced.
    pub fleet_key: &'a [u8],
    /// Argon2id cost stored with the record.
    pub ksf: KsfParams,
}

/// Recovery after the PIN opened KE2; holds KE3 and the keys to open the released key.
pub struct PinProven {
    account: AccountId,
    /// OPAQUE KE3 bytes to send.
    pub ke3: Vec<u8>,
    session_key: Zeroizing<Vec<u8>>,
    export_key: Zeroizing<Vec<u8>>,
}

/// The outcome of handling KE2.
pub enum Ke2Outcome {
    /// The PIN opened KE2.
    Proven(PinProven),
    /// The PIN did not open KE2 (or the vault lied): the guess is spent.
    WrongPin,
}

impl RecoveryStarted {
    /// Blinds the PIN; returns the state and KE1 to send.
    pub fn begin(
        rng: &mut (impl RngCore + CryptoRng),
        account: AccountId,
        pin: Pin,
    ) -> Result<(Self, Vec<u8>), ClientError> {
        let start = ClientLogin::<Suite>::start(rng, pin.as_bytes())
            .map_err(|e| ClientError::Protocol(format!("cannot blind PIN: {e}")))?;
        let ke1 = start.message.serialize().to_vec();
        Ok((
            Self {
                account,
                pin,
                state: start.state,
            },
            ke1,
        ))
    }

    /// Checks the announced fleet key, then tries to open KE2 with the PIN.
    pub fn on_ke2(
        self,
        rng: &mut (impl RngCore + CryptoRng),
        answer: Ke2<'_>,
        pinned: &[u8; 32],
    ) -> Result<Ke2Outcome, ClientError> {
        check_fleet_key(answer.fleet_key, pinned)?;
        let ke2 = CredentialResponse::<Suite>::deserialize(answer.ke2)
            .map_err(|_| ClientError::Protocol("malformed KE2".into()))?;
        let ksf = answer
            .ksf
            .argon2()
            .map_err(|e| ClientError::Protocol(format!("vault sent unusable parameters: {e}")))?;
        let finished = match self.state.finish(
            rng,
            self.pin.as_bytes(),
            ke2,
            ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&ksf)),
        ) {
            Ok(finished) => finished,
            Err(opaque_ke::errors::ProtocolError::InvalidLoginError) => {
                return Ok(Ke2Outcome::WrongPin)
            }
            Err(e) => return Err(ClientError::Protocol(format!("login failed: {e}"))),
        };
        check_fleet_key(&finished.server_s_pk.serialize(), pinned)?;
        Ok(Ke2Outcome::Proven(PinProven {
            account: self.account,
            ke3: finished.message.serialize().to_vec(),
            session_key: Zeroizing::new(finished.session_key.to_vec()),
            export_key: Zeroizing::new(finished.export_key.to_vec()),
        }))
    }
}

impl PinProven {
    /// Opens the retire ticket released beside the key (sealed under the session key).
    pub fn open_ticket(
        &self,
        login_id: &[u8],
        sealed_ticket: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        let context = bkv_core::seal::release_context(login_id, &self.account);
        seal::open(
            bkv_core::seal::LABEL_RETIRE_TICKET_RELEASE,
            &self.session_key,
            &context,
            sealed_ticket,
        )
        .map(|t| Zeroizing::new(t.to_vec()))
        .map_err(|e| ClientError::Protocol(format!("retire ticket: {e}")))
    }

    /// Opens the released key: first the session seal, then the `export_key` wrap.
    pub fn open(
        self,
        login_id: &[u8],
        sealed_wrapped_key: &[u8],
    ) -> Result<BackupKey, ClientError> {
        let context = bkv_core::seal::release_context(login_id, &self.account);
        let wrapped = seal::open(
            LABEL_KEY_RELEASE,
            &self.session_key,
            &context,
            sealed_wrapped_key,
        )
        .map_err(|e| ClientError::Protocol(format!("released key: {e}")))?;
        let key = seal::open(
            LABEL_BACKUP_KEY_WRAP,
            &self.export_key,
            &self.account.credential_identifier(),
            &wrapped,
        )
        .map_err(|e| ClientError::Protocol(format!("wrapped key: {e}")))?;
        BackupKey::from_bytes(&key).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}
