//! The HSM: the fleet's OPAQUE server keys, the record table, and the logins in flight.
//!
//! Every method takes only bytes that came from outside and the account the host says
//! it authenticated; each checks what it is given before it changes anything. A method
//! either commits its command and answers, or fails and changes nothing.

use crate::pending::{AwaitingKe3, LoginId, PendingLogins};
use crate::platform::{Platform, PlatformRng};
use crate::records::{Command, Enrollment, Outcome, RecordTable, RecordView};
use bkv_core::seal::{self, release_context, LABEL_KEY_RELEASE};
use bkv_core::{AccountId, KsfParams, Suite};
use opaque_ke::{
    CredentialFinalization, CredentialRequest, RegistrationRequest, RegistrationUpload,
    ServerLogin, ServerLoginParameters, ServerRegistration, ServerSetup,
};
use zeroize::Zeroizing;

/// Largest wrapped backup key accepted (a 32-byte key sealed with nonce and tag is 72 bytes).
pub const MAX_WRAPPED_KEY_LEN: usize = 256;

/// Policy a vault is started with.
#[derive(Clone, Copy, Debug)]
pub struct HsmConfig {
    /// Guesses a record allows before it is destroyed (and that a correct PIN restores).
    pub max_attempts: u32,
    /// How long a KE3 is accepted after its KE2, in milliseconds of the HSM's clock.
    pub login_deadline_ms: u64,
    /// Logins that may await their KE3 at once.
    pub max_pending_logins: usize,
}

impl Default for HsmConfig {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            login_deadline_ms: 60_000,
            max_pending_logins: 10_000,
        }
    }
}

/// Every way an HSM call can fail. None of them changes state, except where a
/// variant says the guess stays spent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HsmError {
    /// A message did not parse or had the wrong size.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The account has no record.
    #[error("not enrolled")]
    NotEnrolled,
    /// The record was destroyed after too many wrong PINs.
    #[error("the record was destroyed after too many wrong PINs")]
    Destroyed,
    /// No pending login with that id for this account: used, expired, or never made.
    #[error("no such login (already used, expired, or never started)")]
    LoginUnknown,
    /// KE3 did not verify; the guess stays spent.
    #[error("login failed; the guess stays spent")]
    LoginFailed {
        /// Guesses left on the record.
        attempts_left: u32,
    },
    /// Too many logins in flight; nothing was spent.
    #[error("too many logins in flight; retry later")]
    Busy,
    /// The record changed while the call was decided; nothing was spent. Retry.
    #[error("the record changed concurrently; retry")]
    Conflict,
}

/// Answer to the first enrollment step.
#[derive(Debug)]
pub struct EnrollStarted {
    /// OPAQUE RegistrationResponse bytes.
    pub registration_response: Vec<u8>,
    /// The fleet's OPAQUE public key.
    pub fleet_key: [u8; 32],
}

/// Answer to the first recovery step; its guess is already committed.
#[derive(Debug)]
pub struct RecoverStarted {
    /// OPAQUE KE2 bytes.
    pub ke2: Vec<u8>,
    /// Names this login for its KE3.
    pub login_id: LoginId,
    /// Guesses left after this one.
    pub attempts_left: u32,
    /// Argon2id cost the client used at enrollment.
    pub ksf: KsfParams,
}

/// Answer to a correct KE3.
#[derive(Debug)]
pub struct KeyReleased {
    /// The client-wrapped backup key, sealed under a key from the OPAQUE session key.
    pub sealed_wrapped_key: Vec<u8>,
    /// The full budget again.
    pub attempts_left: u32,
}

/// Public state of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordStatus {
    /// Never enrolled.
    NotEnrolled,
    /// Enrolled.
    Active {
        /// Guesses left.
        attempts_left: u32,
        /// The full budget.
        max_attempts: u32,
    },
    /// Destroyed after too many wrong PINs.
    Destroyed,
}

/// One HSM of a fleet.
pub struct Hsm<P: Platform> {
    platform: P,
    setup: ServerSetup<Suite>,
    fleet_key: [u8; 32],
    table: RecordTable,
    pending: PendingLogins,
    config: HsmConfig,
}

impl<P: Platform> std::fmt::Debug for Hsm<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("platform", &self.platform.describe())
            .field("fleet_key", &bkv_core_hex(&self.fleet_key))
            .field("secrets", &"(redacted)")
            .finish()
    }
}

fn bkv_core_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl<P: Platform> Hsm<P> {
    /// Founds a new fleet: makes its OPAQUE server keys inside this HSM.
    pub fn found(mut platform: P, config: HsmConfig) -> Self {
        let setup = ServerSetup::<Suite>::new(&mut PlatformRng(&mut platform));
        let mut fleet_key = [0u8; 32];
        fleet_key.copy_from_slice(&setup.keypair().public().serialize());
        tracing::info!(platform = platform.describe(), fleet_key = %bkv_core_hex(&fleet_key), "HSM founded a fleet");
        Self {
            platform,
            setup,
            fleet_key,
            table: RecordTable::new(),
            pending: PendingLogins::new(config.max_pending_logins),
            config,
        }
    }

    /// The fleet's OPAQUE public key, which clients pin.
    pub fn fleet_key(&self) -> [u8; 32] {
        self.fleet_key
    }

    /// The policy this HSM enforces.
    pub fn config(&self) -> HsmConfig {
        self.config
    }

    /// What kind of HSM this is (for banners and logs).
    pub fn describe(&self) -> &'static str {
        self.platform.describe()
    }

    // The single place where a command takes effect. With a fleet this is where the
    // command is committed by a majority before the caller may answer.
    fn commit(&mut self, command: Command) -> Outcome {
        self.table.apply(&command)
    }

    /// Enrollment step 1: evaluates the client's blinded PIN under this account's OPRF key.
    pub fn enroll_start(
        &mut self,
        account: &AccountId,
        request: &[u8],
    ) -> Result<EnrollStarted, HsmError> {
        let request = RegistrationRequest::<Suite>::deserialize(request)
            .map_err(|_| HsmError::Malformed("registration request"))?;
        let started = ServerRegistration::<Suite>::start(
            &self.setup,
            request,
            &account.credential_identifier(),
        )
        .map_err(|_| HsmError::Malformed("registration request"))?;
        Ok(EnrollStarted {
            registration_response: started.message.serialize().to_vec(),
            fleet_key: self.fleet_key,
        })
    }

    /// Enrollment step 2: stores the record with a full budget, replacing any earlier one.
    pub fn enroll_finish(
        &mut self,
        account: &AccountId,
        upload: &[u8],
        wrapped_key: &[u8],
        ksf: KsfParams,
    ) -> Result<u32, HsmError> {
        let upload = RegistrationUpload::<Suite>::deserialize(upload)
            .map_err(|_| HsmError::Malformed("registration upload"))?;
        if wrapped_key.is_empty() || wrapped_key.len() > MAX_WRAPPED_KEY_LEN {
            return Err(HsmError::Malformed("wrapped key"));
        }
        let ksf = ksf
            .check()
            .map_err(|_| HsmError::Malformed("Argon2id parameters"))?;
        let registration = ServerRegistration::<Suite>::finish(upload);
        let enrollment = Enrollment {
            registration: Zeroizing::new(registration.serialize().to_vec()),
            wrapped_key: Zeroizing::new(wrapped_key.to_vec()),
            ksf,
        };
        let outcome = self.commit(Command::Enroll {
            account: account.clone(),
            enrollment,
            max_attempts: self.config.max_attempts,
        });
        match outcome {
            Outcome::Enrolled { attempts_left, .. } => {
                // Logins against the replaced enrollment can no longer succeed.
                self.pending.forget_account(account);
                Ok(attempts_left)
            }
            other => unreachable!("enrollment always applies, got {other:?}"),
        }
    }

    /// Recovery step 1: commits one spent guess, then (and only then) computes KE2.
    pub fn recover_start(
        &mut self,
        account: &AccountId,
        ke1: &[u8],
    ) -> Result<RecoverStarted, HsmError> {
        let ke1 =
            CredentialRequest::<Suite>::deserialize(ke1).map_err(|_| HsmError::Malformed("KE1"))?;
        let now = self.platform.now_millis();
        if !self.pending.has_room(now) {
            return Err(HsmError::Busy);
        }
        let generation = match self.table.get(account) {
            RecordView::NotEnrolled => return Err(HsmError::NotEnrolled),
            RecordView::Destroyed => return Err(HsmError::Destroyed),
            RecordView::Active(record) => record.generation,
        };
        let attempts_left = match self.commit(Command::SpendGuess {
            account: account.clone(),
            generation,
        }) {
            Outcome::GuessSpent { attempts_left } => attempts_left,
            Outcome::Destroyed | Outcome::AlreadyDestroyed => {
                tracing::info!(%account, "record destroyed: no guesses left");
                self.pending.forget_account(account);
                return Err(HsmError::Destroyed);
            }
            Outcome::NotEnrolled => return Err(HsmError::NotEnrolled),
            _ => return Err(HsmError::Conflict),
        };
        // The guess is committed; from here on KE2 may leave.
        let RecordView::Active(record) = self.table.get(account) else {
            unreachable!("a record that just spent a guess is active");
        };
        let ksf = record.enrollment.ksf;
        let password_file =
            ServerRegistration::<Suite>::deserialize(&record.enrollment.registration)
                .expect("records hold registrations this HSM serialized");
        let started = ServerLogin::start(
            &mut PlatformRng(&mut self.platform),
            &self.setup,
            Some(password_file),
            ke1,
            &account.credential_identifier(),
            ServerLoginParameters::default(),
        )
        .map_err(|_| HsmError::Malformed("KE1"))?;
        let deadline_ms = now + self.config.login_deadline_ms;
        let login_id = self.pending.insert(
            &mut self.platform,
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
        })
    }

    /// Recovery step 2: checks KE3 once, commits the reset, then releases the wrapped key
    /// sealed under the session key.
    pub fn recover_finish(
        &mut self,
        account: &AccountId,
        login_id: &[u8],
        ke3: &[u8],
    ) -> Result<KeyReleased, HsmError> {
        let login_id: LoginId = login_id
            .try_into()
            .map_err(|_| HsmError::Malformed("login id"))?;
        let ke3 = CredentialFinalization::<Suite>::deserialize(ke3)
            .map_err(|_| HsmError::Malformed("KE3"))?;
        let now = self.platform.now_millis();
        let login = self
            .pending
            .take(&login_id, account, now)
            .ok_or(HsmError::LoginUnknown)?;
        let session = match login
            .server_login
            .finish(ke3, ServerLoginParameters::default())
        {
            Ok(finished) => finished.session_key,
            Err(_) => {
                let attempts_left = self.destroy_if_exhausted(account, login.generation);
                return Err(HsmError::LoginFailed { attempts_left });
            }
        };
        let attempts_left = match self.commit(Command::ResetGuesses {
            account: account.clone(),
            generation: login.generation,
        }) {
            Outcome::GuessesReset { attempts_left } => attempts_left,
            _ => return Err(HsmError::LoginUnknown),
        };
        let RecordView::Active(record) = self.table.get(account) else {
            unreachable!("a record whose guesses were just reset is active");
        };
        let sealed_wrapped_key = seal::seal(
            &mut PlatformRng(&mut self.platform),
            LABEL_KEY_RELEASE,
            &session,
            &release_context(&login_id, account),
            &record.enrollment.wrapped_key,
        );
        Ok(KeyReleased {
            sealed_wrapped_key,
            attempts_left,
        })
    }

    /// The client could not open KE2 (wrong PIN): drops the login, and destroys the record
    /// at once if no guess is left. Returns whether the record is now destroyed.
    pub fn recover_abort(
        &mut self,
        account: &AccountId,
        login_id: &[u8],
    ) -> Result<bool, HsmError> {
        let login_id: LoginId = login_id
            .try_into()
            .map_err(|_| HsmError::Malformed("login id"))?;
        let now = self.platform.now_millis();
        let login = self
            .pending
            .take(&login_id, account, now)
            .ok_or(HsmError::LoginUnknown)?;
        self.destroy_if_exhausted(account, login.generation);
        Ok(matches!(self.table.get(account), RecordView::Destroyed))
    }

    /// Public state of `account`'s record. A record with no guesses left and no login
    /// in flight is destroyed here, as it can never be opened again.
    pub fn status(&mut self, account: &AccountId) -> RecordStatus {
        if let RecordView::Active(record) = self.table.get(account) {
            let generation = record.generation;
            let now = self.platform.now_millis();
            if record.attempts_left == 0 && !self.pending.in_flight(account, generation, now) {
                self.destroy_if_exhausted(account, generation);
            }
        }
        match self.table.get(account) {
            RecordView::NotEnrolled => RecordStatus::NotEnrolled,
            RecordView::Destroyed => RecordStatus::Destroyed,
            RecordView::Active(record) => RecordStatus::Active {
                attempts_left: record.attempts_left,
                max_attempts: record.max_attempts,
            },
        }
    }

    /// Number of live records (for operators; reveals no account).
    pub fn active_records(&self) -> usize {
        self.table.active_records()
    }

    // Returns the guesses left afterwards (0 when destroyed or gone).
    fn destroy_if_exhausted(&mut self, account: &AccountId, generation: u64) -> u32 {
        match self.table.get(account) {
            RecordView::Active(r) if r.generation == generation && r.attempts_left == 0 => {
                self.commit(Command::Destroy {
                    account: account.clone(),
                    generation,
                });
                tracing::info!(%account, "record destroyed: no guesses left");
                0
            }
            RecordView::Active(r) => r.attempts_left,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests;
