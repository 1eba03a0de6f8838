//! The gRPC `Vault` service: authenticates the account, hands bytes to the HSM, and maps
//! every HSM outcome to one status.

use crate::auth::{AuthError, TokenVerifier};
use bkv_core::v1::{self, vault_server::Vault, Reason};
use bkv_core::{error_status, AccountId, KsfParams};
use bkv_hsm::{Hsm, HsmError, Platform, RecordStatus};
use std::sync::{Arc, Mutex};
use tonic::{Code, Request, Response, Status};

/// The frontend's view of one single-HSM vault.
pub struct VaultService<P: Platform> {
    hsm: Arc<Mutex<Hsm<P>>>,
    verifier: Arc<TokenVerifier>,
}

impl<P: Platform> VaultService<P> {
    /// Serves `hsm` to callers whose tokens `verifier` accepts.
    pub fn new(hsm: Arc<Mutex<Hsm<P>>>, verifier: Arc<TokenVerifier>) -> Self {
        Self { hsm, verifier }
    }

    fn account<T>(&self, request: &Request<T>) -> Result<AccountId, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().map_err(|_| AuthError::Malformed))
            .transpose()
            .map_err(auth_status)?;
        self.verifier.verify_header(header).map_err(auth_status)
    }

    fn with_hsm<T>(&self, f: impl FnOnce(&mut Hsm<P>) -> Result<T, HsmError>) -> Result<T, Status> {
        // A poisoned lock means an HSM call panicked; serving on would be unsafe.
        let mut hsm = self.hsm.lock().map_err(|_| {
            error_status(Code::Unavailable, Reason::Unavailable, 0, "HSM unavailable")
        })?;
        f(&mut hsm).map_err(hsm_status)
    }

    fn fleet_key(&self) -> Vec<u8> {
        self.hsm
            .lock()
            .map(|h| h.fleet_key().to_vec())
            .unwrap_or_default()
    }
}

/// Maps an account-token failure to its status.
pub fn auth_status(error: AuthError) -> Status {
    error_status(
        Code::Unauthenticated,
        Reason::Unauthenticated,
        0,
        error.to_string(),
    )
}

/// Maps every HSM failure to its status; the one place this mapping is made.
pub fn hsm_status(error: HsmError) -> Status {
    let message = error.to_string();
    match error {
        HsmError::Malformed(_) => {
            error_status(Code::InvalidArgument, Reason::Malformed, 0, message)
        }
        HsmError::NotEnrolled => error_status(Code::NotFound, Reason::NotEnrolled, 0, message),
        HsmError::Destroyed => error_status(Code::NotFound, Reason::Destroyed, 0, message),
        HsmError::LoginUnknown => {
            error_status(Code::FailedPrecondition, Reason::LoginUnknown, 0, message)
        }
        HsmError::LoginFailed { attempts_left } => error_status(
            Code::PermissionDenied,
            Reason::LoginFailed,
            attempts_left,
            message,
        ),
        HsmError::Busy => error_status(Code::ResourceExhausted, Reason::Busy, 0, message),
        HsmError::Conflict => error_status(Code::Aborted, Reason::Unavailable, 0, message),
    }
}

fn ksf_from_wire(ksf: Option<v1::KsfParams>) -> Result<KsfParams, Status> {
    let ksf = ksf.ok_or_else(|| {
        error_status(
            Code::InvalidArgument,
            Reason::Malformed,
            0,
            "missing Argon2id parameters",
        )
    })?;
    KsfParams {
        memory_kib: ksf.memory_kib,
        iterations: ksf.iterations,
        parallelism: ksf.parallelism,
    }
    .check()
    .map_err(|e| error_status(Code::InvalidArgument, Reason::Malformed, 0, e.to_string()))
}

fn ksf_to_wire(ksf: KsfParams) -> v1::KsfParams {
    v1::KsfParams {
        memory_kib: ksf.memory_kib,
        iterations: ksf.iterations,
        parallelism: ksf.parallelism,
    }
}

#[tonic::async_trait]
impl<P: Platform> Vault for VaultService<P> {
    async fn enroll_start(
        &self,
        request: Request<v1::EnrollStartRequest>,
    ) -> Result<Response<v1::EnrollStartResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let started =
            self.with_hsm(|hsm| hsm.enroll_start(&account, &body.registration_request))?;
        Ok(Response::new(v1::EnrollStartResponse {
            registration_response: started.registration_response,
            fleet_key: started.fleet_key.to_vec(),
        }))
    }

    async fn enroll_finish(
        &self,
        request: Request<v1::EnrollFinishRequest>,
    ) -> Result<Response<v1::EnrollFinishResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let ksf = ksf_from_wire(body.ksf)?;
        let attempts_left = self.with_hsm(|hsm| {
            hsm.enroll_finish(&account, &body.registration_upload, &body.wrapped_key, ksf)
        })?;
        tracing::info!(%account, "enrolled");
        Ok(Response::new(v1::EnrollFinishResponse { attempts_left }))
    }

    async fn recover_start(
        &self,
        request: Request<v1::RecoverStartRequest>,
    ) -> Result<Response<v1::RecoverStartResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let started = self.with_hsm(|hsm| hsm.recover_start(&account, &body.ke1))?;
        tracing::info!(%account, attempts_left = started.attempts_left, "guess spent");
        Ok(Response::new(v1::RecoverStartResponse {
            ke2: started.ke2,
            login_id: started.login_id.to_vec(),
            attempts_left: started.attempts_left,
            fleet_key: self.fleet_key(),
            ksf: Some(ksf_to_wire(started.ksf)),
        }))
    }

    async fn recover_finish(
        &self,
        request: Request<v1::RecoverFinishRequest>,
    ) -> Result<Response<v1::RecoverFinishResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let released =
            self.with_hsm(|hsm| hsm.recover_finish(&account, &body.login_id, &body.ke3))?;
        tracing::info!(%account, "key released");
        Ok(Response::new(v1::RecoverFinishResponse {
            sealed_wrapped_key: released.sealed_wrapped_key,
            attempts_left: released.attempts_left,
        }))
    }

    async fn recover_abort(
        &self,
        request: Request<v1::RecoverAbortRequest>,
    ) -> Result<Response<v1::RecoverAbortResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let destroyed = self.with_hsm(|hsm| hsm.recover_abort(&account, &body.login_id))?;
        Ok(Response::new(v1::RecoverAbortResponse { destroyed }))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let account = self.account(&request)?;
        let (status, max, fleet_key) = self.with_hsm(|hsm| {
            Ok((
                hsm.status(&account),
                hsm.config().max_attempts,
                hsm.fleet_key(),
            ))
        })?;
        let (state, attempts_left, max_attempts) = match status {
            RecordStatus::NotEnrolled => (v1::RecordState::NotEnrolled, 0, max),
            RecordStatus::Destroyed => (v1::RecordState::Destroyed, 0, max),
            RecordStatus::Active {
                attempts_left,
                max_attempts,
            } => (v1::RecordState::Active, attempts_left, max_attempts),
        };
        Ok(Response::new(v1::StatusResponse {
            state: state as i32,
            attempts_left,
            max_attempts,
            fleet_key: fleet_key.to_vec(),
        }))
    }
}
