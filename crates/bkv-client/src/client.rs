//! `VaultClient`: the SDK's entry point, carrying the typed flows over gRPC.

use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::flow::{EnrollmentStarted, Ke2, Ke2Outcome, RecoveryStarted};
use crate::retirements::{PendingRetirement, Retirements};
use crate::secrets::{BackupKey, Pin};
use crate::token::TokenSource;
use crate::trust::Trust;
use bkv_core::bundle::Role;
use bkv_core::v1::{self, vault_client::VaultClient as Grpc};
use bkv_core::{AccountId, KsfParams, MAX_MESSAGE_BYTES};
use rand_core::OsRng;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

/// State of an account's record as the vault reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    /// Never enrolled.
    NotEnrolled,
    /// Enrolled.
    Active,
    /// Destroyed after too many wrong PINs.
    Destroyed,
}

/// An account's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountStatus {
    /// The record's state.
    pub state: RecordState,
    /// Guesses left (0 unless active).
    pub attempts_left: u32,
    /// The vault's budget per record.
    pub max_attempts: u32,
}

/// A recovered key and the budget the record has again.
#[derive(Debug)]
pub struct Recovered {
    /// The backup key.
    pub key: BackupKey,
    /// Guesses left (the full budget).
    pub attempts_left: u32,
    /// The record was on a recover-only fleet: what became of moving it to the active one.
    pub moved: Option<Moved>,
}

/// The outcome of moving a record from a recover-only fleet to the active fleet.
#[derive(Debug)]
pub enum Moved {
    /// Enrolled in the active fleet (same key, same PIN, full budget); the old record is retired.
    Done {
        /// Hex of the fleet the record left.
        from: String,
    },
    /// The key is recovered, but a move is not finished: why, and whether the next
    /// recovery tries again, in words for the user.
    Failed(String),
}

/// The frontend's endpoint, with the client's timeouts; connected on first use.
fn endpoint(config: &ClientConfig) -> Result<Endpoint, ClientError> {
    Ok(Endpoint::from_shared(config.url.clone())
        .map_err(|e| ClientError::Config {
            path: "url".into(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30)))
}

/// Asks the frontend of `config` for the fleet's members and health (no account needed).
pub async fn fleet_status(config: &ClientConfig) -> Result<v1::FleetStatusResponse, ClientError> {
    let endpoint = endpoint(config)?;
    let mut grpc = Grpc::new(endpoint.connect_lazy());
    grpc.fleet_status(v1::FleetStatusRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(ClientError::from_status)
}

/// A connection to one vault, trusting a pinned fleet key or fleets a validation bundle
/// lists. Clones share the connection and the trust state.
#[derive(Clone)]
pub struct VaultClient {
    grpc: Grpc<Channel>,
    trust: Trust,
    retirements: Retirements,
    tokens: TokenSource,
    tenant: String,
    ksf: KsfParams,
}

impl std::fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultClient")
            .field("trust", &self.trust)
            .field("tokens", &self.tokens)
            .finish()
    }
}

/// Asks the frontend of `config` for its current validation bundle (empty if none).
pub async fn fetch_bundle(config: &ClientConfig) -> Result<Vec<u8>, ClientError> {
    let endpoint = endpoint(config)?;
    let mut grpc = Grpc::new(endpoint.connect_lazy())
        .max_decoding_message_size(bkv_core::bundle::MAX_BUNDLE_BYTES + MAX_MESSAGE_BYTES);
    grpc.bundle(v1::BundleRequest {})
        .await
        .map(|r| r.into_inner().bundle)
        .map_err(ClientError::from_status)
}

impl VaultClient {
    /// Prepares a client for `config`; the connection is made on first use.
    pub fn new(config: &ClientConfig, tokens: TokenSource) -> Result<Self, ClientError> {
        let endpoint = endpoint(config)?;
        let grpc = Grpc::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES + bkv_core::bundle::MAX_BUNDLE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            grpc,
            trust: Trust::from_config(config)?,
            retirements: Retirements::beside(config.trust_state_path()),
            tokens,
            tenant: config.tenant.clone(),
            ksf: config.ksf.check().map_err(|e| ClientError::Config {
                path: "ksf".into(),
                reason: e.to_string(),
            })?,
        })
    }

    /// Interprets a refusal; one from a fleet this client does not trust is a trust
    /// failure, whatever it claims.
    fn refused(&self, status: tonic::Status) -> ClientError {
        if let Some(detail) = bkv_core::error_detail(&status) {
            if let Some(foreign) = self.trust.foreign(&detail.fleet_key) {
                return foreign.into();
            }
        }
        ClientError::from_status(status)
    }

    /// This client's trust decisions.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    fn account(&self, user: &str) -> Result<AccountId, ClientError> {
        AccountId::new(self.tenant.clone(), user).map_err(|e| ClientError::Config {
            path: "user".into(),
            reason: e.to_string(),
        })
    }

    fn request<T>(&self, user: &str, body: T) -> Result<Request<T>, ClientError> {
        let token = self.tokens.token_for(user)?;
        let mut request = Request::new(body);
        let value = format!("Bearer {}", token.as_str())
            .parse()
            .map_err(|_| ClientError::Unauthenticated("token is not valid header text".into()))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }

    /// Escrows `key` behind `pin` for `user`, replacing any earlier enrollment.
    /// Returns the guess budget of the new record.
    pub async fn enroll(
        &mut self,
        user: &str,
        pin: Pin,
        key: &BackupKey,
    ) -> Result<u32, ClientError> {
        let account = self.account(user)?;
        let (started, registration_request) =
            EnrollmentStarted::begin(&mut OsRng, account, pin, self.ksf)?;
        let response = self
            .grpc
            .enroll_start(self.request(
                user,
                v1::EnrollStartRequest {
                    registration_request,
                },
            )?)
            .await
            .map_err(|s| self.refused(s))?
            .into_inner();
        let response_id = response.registration_id.clone();
        // New enrollments go to the active fleet only; nothing more is sent otherwise.
        let (pinned, _) =
            self.trust
                .admit(&response.fleet_key, &response.bundle, &[Role::Active])?;
        // Argon2id runs on a blocking thread: it takes tens of milliseconds and megabytes.
        let key = key.clone();
        let upload = tokio::task::spawn_blocking(move || {
            started.finish(
                &mut OsRng,
                &response.registration_response,
                &response.fleet_key,
                &pinned,
                &key,
            )
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("enrollment task failed: {e}")))??;
        let finish = v1::EnrollFinishRequest {
            registration_id: response_id,
            registration_upload: upload.registration_upload,
            wrapped_key: upload.wrapped_key,
            ksf: Some(v1::KsfParams {
                memory_kib: upload.ksf.memory_kib,
                iterations: upload.ksf.iterations,
                parallelism: upload.ksf.parallelism,
            }),
        };
        let done = self
            .grpc
            .enroll_finish(self.request(user, finish)?)
            .await
            .map_err(|s| self.refused(s))?
            .into_inner();
        Ok(done.attempts_left)
    }

    /// Recovers `user`'s key with `pin`. Spends one guess, given back if the PIN is right.
    /// A record found on a recover-only fleet is moved to the active fleet (same key, same
    /// PIN, full budget) and the old one retired.
    pub async fn recover(&mut self, user: &str, pin: Pin) -> Result<Recovered, ClientError> {
        let account = self.account(user)?;
        let (started, ke1) = RecoveryStarted::begin(&mut OsRng, account, pin.clone())?;
        let answer = self
            .grpc
            .recover_start(self.request(user, v1::RecoverStartRequest { ke1 })?)
            .await
            .map_err(|s| self.refused(s))?
            .into_inner();
        let ksf = answer
            .ksf
            .map(|k| KsfParams {
                memory_kib: k.memory_kib,
                iterations: k.iterations,
                parallelism: k.parallelism,
            })
            .unwrap_or(self.ksf);
        // Decided before KE3: a fleet the client does not trust learns nothing more.
        let (pinned, role) = self.trust.admit(
            &answer.fleet_key,
            &answer.bundle,
            &[Role::Active, Role::RecoverOnly],
        )?;
        let ke2 = answer.ke2.clone();
        let fleet_key = answer.fleet_key.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            started.on_ke2(
                &mut OsRng,
                Ke2 {
                    ke2: &ke2,
                    fleet_key: &fleet_key,
                    ksf,
                },
                &pinned,
            )
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("recovery task failed: {e}")))??;
        let proven = match outcome {
            Ke2Outcome::Proven(proven) => proven,
            Ke2Outcome::WrongPin => {
                // Tell the vault at once, so a record with no guesses left is destroyed now.
                // Best effort: if this fails, the vault destroys it when the login expires.
                let abort = v1::RecoverAbortRequest {
                    login_id: answer.login_id.clone(),
                };
                if let Ok(request) = self.request(user, abort) {
                    let _ = self.grpc.recover_abort(request).await;
                }
                return Err(ClientError::WrongPin {
                    attempts_left: answer.attempts_left,
                });
            }
        };
        let finish = v1::RecoverFinishRequest {
            login_id: answer.login_id.clone(),
            ke3: proven.ke3.clone(),
        };
        let released = self
            .grpc
            .recover_finish(self.request(user, finish)?)
            .await
            .map_err(|s| self.refused(s))?
            .into_inner();
        // A ticket that does not open must not cost the user the key it came with.
        let ticket = match role {
            Role::RecoverOnly => Some(
                proven
                    .open_ticket(&answer.login_id, &released.sealed_retire_ticket)
                    .map_err(|e| e.to_string()),
            ),
            _ => None,
        };
        let key = proven.open(&answer.login_id, &released.sealed_wrapped_key)?;
        let still_old = |why: &str| {
            Moved::Failed(format!(
                "{user} is still on a recover-only fleet: {why}; the next recovery tries again"
            ))
        };
        let moved = match ticket {
            // The key came from an active fleet: old records elsewhere can go now.
            None => self.settle_retirements(user, &pinned).await,
            Some(Err(why)) => Some(still_old(&why)),
            Some(Ok(ticket)) => Some(
                self.move_record(user, pin, &key, ticket, &pinned)
                    .await
                    .unwrap_or_else(|why| still_old(&why)),
            ),
        };
        Ok(Recovered {
            key,
            attempts_left: released.attempts_left,
            moved,
        })
    }

    /// Enrolls `key` in the active fleet, then retires the record on the old one. The old
    /// record goes only once the new one is committed, so a failure loses nothing. The
    /// retirement is kept before it is tried, so that a recovery from the active fleet
    /// finishes it even if this process stops. Errs, with why, if the user is still only
    /// on the old fleet.
    async fn move_record(
        &mut self,
        user: &str,
        pin: Pin,
        key: &BackupKey,
        release: zeroize::Zeroizing<Vec<u8>>,
        from: &[u8; 32],
    ) -> Result<Moved, String> {
        if release.len() != bkv_core::seal::RETIRE_RELEASE_LEN {
            return Err("the vault released a malformed retire ticket".into());
        }
        self.enroll(user, pin, key)
            .await
            .map_err(|e| format!("enrolling in the active fleet: {e}"))?;
        let pending = PendingRetirement {
            tenant: self.tenant.clone(),
            user: user.to_string(),
            from: hex::encode(from),
            release: zeroize::Zeroizing::new(hex::encode(&release[..])),
        };
        let kept = self.retirements.remember(pending.clone());
        Ok(match (self.retire(&pending).await, kept) {
            (Ok(()), _) => {
                // Best effort: a kept retirement that is done is proven done again later.
                let _ = self.retirements.forget(&pending);
                Moved::Done { from: pending.from }
            }
            (Err(why), Ok(())) => Moved::Failed(format!(
                "{user} moved to the active fleet, but the old record on fleet {} was not retired: {why}; the next recovery tries again",
                pending.from
            )),
            (Err(why), Err(e)) => Moved::Failed(format!(
                "{user} moved to the active fleet, but the old record on fleet {} was not retired: {why}, and it could not be kept to try again: {e}",
                pending.from
            )),
        })
    }

    /// After a recovery from the active fleet `current`, retires the user's records that
    /// earlier moves left on other fleets. One kept for `current` itself is obsolete (the
    /// operator made that fleet active again) and is dropped, never sent: the record there
    /// is the one the user lives on. Never fails the recovery: problems are reported as an
    /// unfinished move.
    async fn settle_retirements(&mut self, user: &str, current: &[u8; 32]) -> Option<Moved> {
        let kept = match self.retirements.pending(&self.tenant, user) {
            Ok(kept) => kept,
            Err(e) => {
                return Some(Moved::Failed(format!(
                    "pending retirements for {user} could not be read: {e}"
                )))
            }
        };
        let mut outcome = None;
        for pending in kept {
            let from = hex::decode(&pending.from).unwrap_or_default();
            if !pending.worth_sending(current, self.trust.foreign(&from).is_none()) {
                let _ = self.retirements.forget(&pending);
                continue;
            }
            let done = match self.retire(&pending).await {
                Ok(()) => match self.retirements.forget(&pending) {
                    Ok(()) => Moved::Done {
                        from: pending.from.clone(),
                    },
                    Err(e) => Moved::Failed(format!(
                        "the old record of {user} on fleet {} is retired, but {e}",
                        pending.from
                    )),
                },
                Err(why) => Moved::Failed(format!(
                    "the old record of {user} on fleet {} is still not retired: {why}; the next recovery tries again",
                    pending.from
                )),
            };
            // A failure is what the user must hear of.
            if outcome.is_none() || matches!(done, Moved::Failed(_)) {
                outcome = Some(done);
            }
        }
        outcome
    }

    /// Hands the old fleet its retire ticket and checks the proof that it retired the
    /// record: only the old HSM can make it, as the frontend never saw the key.
    async fn retire(&mut self, pending: &PendingRetirement) -> Result<(), String> {
        use bkv_core::seal::{RETIRE_RELEASE_LEN, RETIRE_TICKET_LEN};
        let account = self.account(&pending.user).map_err(|e| e.to_string())?;
        let release = zeroize::Zeroizing::new(
            hex::decode(pending.release.as_str()).map_err(|_| "a damaged retire ticket")?,
        );
        if release.len() != RETIRE_RELEASE_LEN {
            return Err("a damaged retire ticket".into());
        }
        // The release is the ticket (generation ‖ MAC) and the confirmation key.
        let (ticket, confirm_key) = release.split_at(RETIRE_TICKET_LEN);
        let mut generation = [0u8; 8];
        generation.copy_from_slice(&ticket[..8]);
        let mut key32 = zeroize::Zeroizing::new([0u8; 32]);
        key32.copy_from_slice(confirm_key);
        let expected =
            bkv_core::seal::retire_confirmation(&key32, &account, u64::from_be_bytes(generation));
        let request = self
            .request(
                &pending.user,
                v1::RetireRequest {
                    ticket: ticket.to_vec(),
                },
            )
            .map_err(|e| e.to_string())?;
        match self.grpc.retire(request).await {
            Ok(answer)
                if bool::from(subtle::ConstantTimeEq::ct_eq(
                    &answer.get_ref().confirmation[..],
                    &expected[..],
                )) =>
            {
                Ok(())
            }
            Ok(_) => Err("the vault's answer does not prove the old record was retired".into()),
            Err(status) => Err(self.refused(status).to_string()),
        }
    }

    /// The public state of `user`'s record.
    pub async fn status(&mut self, user: &str) -> Result<AccountStatus, ClientError> {
        self.account(user)?;
        let answer = self
            .grpc
            .status(self.request(user, v1::StatusRequest {})?)
            .await
            .map_err(|s| self.refused(s))?
            .into_inner();
        self.trust.admit(
            &answer.fleet_key,
            &answer.bundle,
            &[Role::Active, Role::RecoverOnly],
        )?;
        let state = match v1::RecordState::try_from(answer.state) {
            Ok(v1::RecordState::NotEnrolled) => RecordState::NotEnrolled,
            Ok(v1::RecordState::Active) => RecordState::Active,
            Ok(v1::RecordState::Destroyed) => RecordState::Destroyed,
            _ => return Err(ClientError::Protocol("unknown record state".into())),
        };
        Ok(AccountStatus {
            state,
            attempts_left: answer.attempts_left,
            max_attempts: answer.max_attempts,
        })
    }
}
