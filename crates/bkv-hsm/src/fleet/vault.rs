//! The vault operations of a fleet member: enrollment and recovery, with every guess
//! committed by the fleet's majority before anything that lets it be tested leaves.

use super::FleetHsm;
use crate::error::{EnrollStarted, HsmError, KeyReleased, RecordStatus, RecoverStarted};
use crate::pending::{AwaitingKe3, AwaitingUpload, LoginId, RegistrationId};
use crate::platform::PlatformRng;
use crate::records::{Command, Enrollment, Outcome, RecordView};
use bkv_core::seal::{self, release_context, LABEL_KEY_RELEASE, LABEL_RETIRE_TICKET_RELEASE};
use bkv_core::{AccountId, KsfParams, Suite};
use hmac::{Hmac, Mac};
use opaque_ke::{
    CredentialFinalization, CredentialRequest, RegistrationRequest, RegistrationUpload,
    ServerLogin, ServerLoginParameters, ServerRegistration,
};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Largest wrapped backup key accepted (a 32-byte key sealed with nonce and tag is 72 bytes).
pub const MAX_WRAPPED_KEY_LEN: usize = 256;

/// Label of the key that authenticates retire tickets, derived from the fleet secrets.
pub(super) const LABEL_RETIRE_KEY: &[u8] = b"bkv/v1/retire-ticket-key";

/// Label of a retire ticket's MAC.
const LABEL_RETIRE_MAC: &[u8] = b"bkv/v1/retire-ticket\0";

/// Label of the key that proves a retirement to the client, derived per ticket.
const LABEL_RETIRE_CONFIRM_KEY: &[u8] = b"bkv/v1/retire-confirm-key\0";

pub use bkv_core::seal::{RETIRE_RELEASE_LEN, RETIRE_TICKET_LEN};

fn parse_login_id(bytes: &[u8]) -> Result<LoginId, HsmError> {
    bytes
        .try_into()
        .map_err(|_| HsmError::Malformed("login id"))
}

impl FleetHsm {
    async fn commit_record(&self, command: Command) -> Result<Outcome, HsmError> {
        self.committer.commit_record(command).await
    }

    fn max_attempts(&self) -> Result<u32, HsmError> {
        let machine = self.shared.machine();
        machine
            .state
            .genesis
            .as_ref()
            .map(|g| g.max_attempts)
            .ok_or(HsmError::NotReady)
    }

    /// The current generation of `account`'s record, or why there is none.
    fn generation(&self, account: &AccountId) -> Result<u64, HsmError> {
        match self.shared.machine().state.table.get(account) {
            RecordView::NotEnrolled => Err(HsmError::NotEnrolled),
            RecordView::Destroyed => Err(HsmError::Destroyed),
            RecordView::Active(record) => Ok(record.generation),
        }
    }

    /// Takes `account`'s pending login `login_id`, on the leader only.
    fn take_login(&self, account: &AccountId, login_id: &LoginId) -> Result<AwaitingKe3, HsmError> {
        self.check_leader()?;
        let now = self.shared.platform.now_millis();
        self.pending()
            .take(login_id, account, now)
            .ok_or(HsmError::LoginUnknown)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, crate::pending::PendingLogins> {
        self.pending.lock().expect("pending logins lock")
    }

    /// Enrollment step 1: evaluates the client's blinded PIN under a fresh OPRF key for this
    /// enrollment (a new random salt), never under the live record's key: otherwise a
    /// token holder could test PINs offline against a KE2 without spending guesses.
    pub async fn enroll_start(
        &self,
        account: &AccountId,
        request: &[u8],
    ) -> Result<EnrollStarted, HsmError> {
        let request = RegistrationRequest::<Suite>::deserialize(request)
            .map_err(|_| HsmError::Malformed("registration request"))?;
        self.check_leader()?;
        let secret = self.shared.secret.get().ok_or(HsmError::NotReady)?;
        let mut salt = [0u8; 16];
        self.shared.platform.fill_random(&mut salt);
        let started = ServerRegistration::<Suite>::start(
            &secret.setup,
            request,
            &account.oprf_identifier(&salt),
        )
        .map_err(|_| HsmError::Malformed("registration request"))?;
        let now = self.shared.platform.now_millis();
        let awaiting = AwaitingUpload {
            account: account.clone(),
            salt,
            deadline_ms: now + self.config.login_deadline_ms,
        };
        let registration_id = self
            .registrations
            .lock()
            .expect("registrations lock")
            .insert(self.shared.platform.as_ref(), now, awaiting)
            .ok_or(HsmError::Busy)?;
        Ok(EnrollStarted {
            registration_response: started.message.serialize().to_vec(),
            registration_id,
            fleet_key: secret.fleet_key,
        })
    }

    /// Enrollment step 2: commits the record with a full budget, replacing any earlier one.
    pub async fn enroll_finish(
        &self,
        account: &AccountId,
        registration_id: &[u8],
        upload: &[u8],
        wrapped_key: &[u8],
        ksf: KsfParams,
    ) -> Result<u32, HsmError> {
        let registration_id: RegistrationId = registration_id
            .try_into()
            .map_err(|_| HsmError::Malformed("registration id"))?;
        let upload = RegistrationUpload::<Suite>::deserialize(upload)
            .map_err(|_| HsmError::Malformed("registration upload"))?;
        if wrapped_key.is_empty() || wrapped_key.len() > MAX_WRAPPED_KEY_LEN {
            return Err(HsmError::Malformed("wrapped key"));
        }
        let ksf = ksf
            .check()
            .map_err(|_| HsmError::Malformed("Argon2id parameters"))?;
        self.check_leader()?;
        let now = self.shared.platform.now_millis();
        let awaiting = self
            .registrations
            .lock()
            .expect("registrations lock")
            .take(&registration_id, account, now)
            .ok_or(HsmError::LoginUnknown)?;
        let registration = ServerRegistration::<Suite>::finish(upload);
        let enrollment = Enrollment {
            registration: Zeroizing::new(registration.serialize().to_vec()),
            wrapped_key: Zeroizing::new(wrapped_key.to_vec()),
            ksf,
            oprf_salt: awaiting.salt,
        };
        let awaiting_again = awaiting;
        let max_attempts = self.max_attempts()?;
        let commit = self
            .commit_record(Command::Enroll {
                account: account.clone(),
                enrollment,
                max_attempts,
            })
            .await;
        let outcome = match commit {
            Ok(outcome) => outcome,
            Err(e) => {
                // Nothing was committed: keep the registration so that the finish can be retried.
                self.registrations
                    .lock()
                    .expect("registrations lock")
                    .restore(registration_id, awaiting_again);
                return Err(e);
            }
        };
        match outcome {
            Outcome::Enrolled { attempts_left, .. } => {
                // Logins against the replaced enrollment can no longer succeed.
                self.pending().forget_account(account);
                Ok(attempts_left)
            }
            _ => Err(HsmError::Conflict),
        }
    }

    /// Recovery step 1: commits one spent guess through the fleet, then (and only then)
    /// computes KE2.
    pub async fn recover_start(
        &self,
        account: &AccountId,
        ke1: &[u8],
    ) -> Result<RecoverStarted, HsmError> {
        let ke1 =
            CredentialRequest::<Suite>::deserialize(ke1).map_err(|_| HsmError::Malformed("KE1"))?;
        let secret = self.shared.secret.get().ok_or(HsmError::NotReady)?;
        // No read barrier here: the generation read below may be stale only on a new
        // leader still applying, and then SpendGuess is refused as stale, changing nothing.
        self.check_leader()?;
        let now = self.shared.platform.now_millis();
        if !self.pending().has_room(account, now) {
            return Err(HsmError::Busy);
        }
        let generation = match self.generation(account) {
            Ok(generation) => generation,
            // "Not enrolled" or "destroyed" from a new leader still applying its log would
            // be a wrong answer, and during a rotation the frontend would then look for
            // the user in an older fleet: confirm it on current state first.
            Err(HsmError::NotEnrolled | HsmError::Destroyed) => {
                self.linearize().await?;
                self.generation(account)?
            }
            Err(e) => return Err(e),
        };
        let attempts_left = match self
            .commit_record(Command::SpendGuess {
                account: account.clone(),
                generation,
            })
            .await?
        {
            Outcome::GuessSpent { attempts_left } => attempts_left,
            Outcome::Destroyed | Outcome::AlreadyDestroyed => {
                tracing::info!(%account, "record destroyed: no guesses left");
                self.pending().forget_account(account);
                return Err(HsmError::Destroyed);
            }
            Outcome::NotEnrolled => return Err(HsmError::NotEnrolled),
            _ => return Err(HsmError::Conflict),
        };
        // The guess is committed by a majority; from here on KE2 may leave.
        let (password_file, ksf, salt) = {
            let machine = self.shared.machine();
            let RecordView::Active(record) = machine.state.table.get(account) else {
                return Err(HsmError::Conflict);
            };
            if record.generation != generation {
                return Err(HsmError::Conflict);
            }
            let file = ServerRegistration::<Suite>::deserialize(&record.enrollment.registration)
                .map_err(|_| HsmError::Malformed("stored registration"))?;
            (file, record.enrollment.ksf, record.enrollment.oprf_salt)
        };
        let started = ServerLogin::start(
            &mut PlatformRng(self.shared.platform.as_ref()),
            &secret.setup,
            Some(password_file),
            ke1,
            &account.oprf_identifier(&salt),
            ServerLoginParameters::default(),
        )
        .map_err(|_| HsmError::Malformed("KE1"))?;
        let deadline_ms = now + self.config.login_deadline_ms;
        let login_id = self.pending().insert(
            self.shared.platform.as_ref(),
            AwaitingKe3 {
                account: account.clone(),
                generation,
                deadline_ms,
                server_login: started.state,
            },
        );
        Ok(RecoverStarted {
            ke2: started.message.serialize().to_vec(),
            login_id,
            attempts_left,
            ksf,
            fleet_key: secret.fleet_key,
        })
    }

    /// Recovery step 2: checks KE3 once, commits the reset, then releases the wrapped key
    /// sealed under the session key.
    pub async fn recover_finish(
        &self,
        account: &AccountId,
        login_id: &[u8],
        ke3: &[u8],
    ) -> Result<KeyReleased, HsmError> {
        let login_id = parse_login_id(login_id)?;
        let ke3 = CredentialFinalization::<Suite>::deserialize(ke3)
            .map_err(|_| HsmError::Malformed("KE3"))?;
        let login = self.take_login(account, &login_id)?;
        let generation = login.generation;
        self.pending().begin_finish(account, generation);
        let result = self.finish_login(account, &login_id, login, ke3).await;
        self.pending().end_finish(account, generation);
        result
    }

    async fn finish_login(
        &self,
        account: &AccountId,
        login_id: &LoginId,
        login: AwaitingKe3,
        ke3: CredentialFinalization<Suite>,
    ) -> Result<KeyReleased, HsmError> {
        let session = match login
            .server_login
            .finish(ke3, ServerLoginParameters::default())
        {
            Ok(finished) => finished.session_key,
            Err(_) => {
                let attempts_left = self.destroy_if_exhausted(account, login.generation).await?;
                return Err(HsmError::LoginFailed { attempts_left });
            }
        };
        let attempts_left = match self
            .commit_record(Command::ResetGuesses {
                account: account.clone(),
                generation: login.generation,
            })
            .await?
        {
            Outcome::GuessesReset { attempts_left } => attempts_left,
            _ => return Err(HsmError::LoginUnknown),
        };
        let wrapped_key = {
            let machine = self.shared.machine();
            match machine.state.table.get(account) {
                RecordView::Active(record) if record.generation == login.generation => {
                    record.enrollment.wrapped_key.clone()
                }
                _ => return Err(HsmError::LoginUnknown),
            }
        };
        let context = release_context(login_id, account);
        let sealed_wrapped_key = seal::seal(
            &mut PlatformRng(self.shared.platform.as_ref()),
            LABEL_KEY_RELEASE,
            &session,
            &context,
            &wrapped_key,
        );
        let mut ticket = Zeroizing::new(Vec::with_capacity(RETIRE_RELEASE_LEN));
        ticket.extend_from_slice(&login.generation.to_be_bytes());
        ticket.extend_from_slice(&self.retire_mac(account, login.generation)?);
        let confirm_key = Zeroizing::new(self.retire_hmac(&[LABEL_RETIRE_CONFIRM_KEY, &ticket])?);
        ticket.extend_from_slice(&confirm_key[..]);
        let sealed_retire_ticket = seal::seal(
            &mut PlatformRng(self.shared.platform.as_ref()),
            LABEL_RETIRE_TICKET_RELEASE,
            &session,
            &context,
            &ticket,
        );
        Ok(KeyReleased {
            sealed_wrapped_key,
            attempts_left,
            sealed_retire_ticket,
        })
    }

    /// HMAC-SHA256 under a key derived from the fleet secrets, over labelled `parts`.
    fn retire_hmac(&self, parts: &[&[u8]]) -> Result<[u8; 32], HsmError> {
        let secret = self.shared.secret.get().ok_or(HsmError::NotReady)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&secret.retire_key[..])
            .expect("HMAC takes any key length");
        for part in parts {
            mac.update(part);
        }
        Ok(mac.finalize().into_bytes().into())
    }

    fn retire_mac(&self, account: &AccountId, generation: u64) -> Result<[u8; 32], HsmError> {
        let fleet_key = self
            .shared
            .secret
            .get()
            .ok_or(HsmError::NotReady)?
            .fleet_key;
        let account = account.to_string();
        self.retire_hmac(&[
            LABEL_RETIRE_MAC,
            &fleet_key,
            &(account.len() as u32).to_be_bytes(),
            account.as_bytes(),
            &generation.to_be_bytes(),
        ])
    }

    /// Retires `account`'s record after its owner moved to another fleet: `ticket` comes
    /// from a correct PIN on this very enrollment. A ticket of another fleet, or of an
    /// enrollment since replaced, changes nothing ([`HsmError::LoginUnknown`]). Returns the
    /// proof of retirement the client checks ([`seal::retire_confirmation`]).
    pub async fn retire(&self, account: &AccountId, ticket: &[u8]) -> Result<[u8; 32], HsmError> {
        let ticket: &[u8; RETIRE_TICKET_LEN] = ticket
            .try_into()
            .map_err(|_| HsmError::Malformed("retire ticket"))?;
        self.check_leader()?;
        let mut generation = [0u8; 8];
        generation.copy_from_slice(&ticket[..8]);
        let generation = u64::from_be_bytes(generation);
        let expected = self.retire_mac(account, generation)?;
        if !bool::from(expected.ct_eq(&ticket[8..])) {
            return Err(HsmError::LoginUnknown);
        }
        match self
            .commit_record(Command::Retire {
                account: account.clone(),
                generation,
            })
            .await?
        {
            Outcome::Retired | Outcome::AlreadyDestroyed => {
                tracing::info!(%account, "record retired: its owner moved to another fleet");
                let confirm_key =
                    Zeroizing::new(self.retire_hmac(&[LABEL_RETIRE_CONFIRM_KEY, ticket])?);
                Ok(seal::retire_confirmation(&confirm_key, account, generation))
            }
            Outcome::NotEnrolled => Err(HsmError::NotEnrolled),
            _ => Err(HsmError::LoginUnknown),
        }
    }

    /// The client could not open KE2 (wrong PIN): drops the login, and destroys the record
    /// at once if no guess is left. Returns whether the record is now destroyed.
    pub async fn recover_abort(
        &self,
        account: &AccountId,
        login_id: &[u8],
    ) -> Result<bool, HsmError> {
        let login_id = parse_login_id(login_id)?;
        let login = self.take_login(account, &login_id)?;
        self.destroy_if_exhausted(account, login.generation).await?;
        Ok(matches!(
            self.shared.machine().state.table.get(account),
            RecordView::Destroyed
        ))
    }

    /// Public state of `account`'s record. A record with no guesses left and no login in
    /// flight is destroyed here, as it can never be opened again.
    pub async fn record_status(
        &self,
        account: &AccountId,
    ) -> Result<(RecordStatus, u32), HsmError> {
        self.linearize().await?;
        let max = self.max_attempts()?;
        let exhausted = match self.shared.machine().state.table.get(account) {
            RecordView::Active(r) if r.attempts_left == 0 => Some(r.generation),
            _ => None,
        };
        if let Some(generation) = exhausted {
            let now = self.shared.platform.now_millis();
            if !self.pending().in_flight(account, generation, now) {
                self.destroy_if_exhausted(account, generation).await?;
            }
        }
        let status = match self.shared.machine().state.table.get(account) {
            RecordView::NotEnrolled => RecordStatus::NotEnrolled,
            RecordView::Destroyed => RecordStatus::Destroyed,
            RecordView::Active(record) => RecordStatus::Active {
                attempts_left: record.attempts_left,
                max_attempts: record.max_attempts,
            },
        };
        Ok((status, max))
    }

    // Returns the guesses left afterwards (0 when destroyed or gone).
    async fn destroy_if_exhausted(
        &self,
        account: &AccountId,
        generation: u64,
    ) -> Result<u32, HsmError> {
        let left = match self.shared.machine().state.table.get(account) {
            RecordView::Active(r) if r.generation == generation => r.attempts_left,
            RecordView::Active(r) => return Ok(r.attempts_left),
            _ => return Ok(0),
        };
        if left > 0 {
            return Ok(left);
        }
        self.commit_record(Command::Destroy {
            account: account.clone(),
            generation,
        })
        .await?;
        tracing::info!(%account, "record destroyed: no guesses left");
        Ok(0)
    }
}
