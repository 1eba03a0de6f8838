//! The node's gRPC services: `Vault` (called by the frontend, checked again here),
//! `Peer` (sealed HSM traffic) and `Admin` (status). Each maps HSM outcomes to one status.

use bkv_core::auth::{AuthError, TokenVerifier};
use bkv_core::v1::{self, admin_server::Admin, peer_server::Peer, vault_server::Vault, Reason};
use bkv_core::{error_status, not_leader_status, AccountId, KsfParams};
use bkv_hsm::{FleetHsm, HsmError, NodeStatus, RecordStatus};
use std::sync::Arc;
use tonic::{Code, Request, Response, Status};

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
        HsmError::NotLeader { leader_dc } => not_leader_status(leader_dc),
        HsmError::Conflict | HsmError::Unavailable | HsmError::NotReady => {
            error_status(Code::Unavailable, Reason::Unavailable, 0, message)
        }
        HsmError::JoinRefused(_) | HsmError::PeerRefused(_) => {
            error_status(Code::PermissionDenied, Reason::Unspecified, 0, message)
        }
    }
}

/// The vault as one node serves it.
pub struct NodeVault {
    hsm: Arc<FleetHsm>,
    verifier: Arc<TokenVerifier>,
}

impl NodeVault {
    /// Serves `hsm` to callers whose tokens `verifier` accepts.
    pub fn new(hsm: Arc<FleetHsm>, verifier: Arc<TokenVerifier>) -> Self {
        Self { hsm, verifier }
    }

    /// Maps an HSM failure, naming this fleet's key so that clients can tell a foreign fleet.
    fn fail(&self, error: HsmError) -> Status {
        let status = hsm_status(error);
        match self.hsm.fleet_key() {
            Some(key) => bkv_core::with_fleet_key(status, &key),
            None => status,
        }
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
impl Vault for NodeVault {
    async fn enroll_start(
        &self,
        request: Request<v1::EnrollStartRequest>,
    ) -> Result<Response<v1::EnrollStartResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let started = self
            .hsm
            .enroll_start(&account, &body.registration_request)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(v1::EnrollStartResponse {
            registration_response: started.registration_response,
            fleet_key: started.fleet_key.to_vec(),
            registration_id: started.registration_id.to_vec(),
            bundle: Vec::new(),
        }))
    }

    async fn enroll_finish(
        &self,
        request: Request<v1::EnrollFinishRequest>,
    ) -> Result<Response<v1::EnrollFinishResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let ksf = ksf_from_wire(body.ksf)?;
        let attempts_left = self
            .hsm
            .enroll_finish(
                &account,
                &body.registration_id,
                &body.registration_upload,
                &body.wrapped_key,
                ksf,
            )
            .await
            .map_err(|e| self.fail(e))?;
        tracing::debug!(%account, "enrolled");
        Ok(Response::new(v1::EnrollFinishResponse { attempts_left }))
    }

    async fn recover_start(
        &self,
        request: Request<v1::RecoverStartRequest>,
    ) -> Result<Response<v1::RecoverStartResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let started = self
            .hsm
            .recover_start(&account, &body.ke1)
            .await
            .map_err(|e| self.fail(e))?;
        tracing::debug!(%account, attempts_left = started.attempts_left, "guess spent");
        Ok(Response::new(v1::RecoverStartResponse {
            ke2: started.ke2,
            login_id: started.login_id.to_vec(),
            attempts_left: started.attempts_left,
            fleet_key: started.fleet_key.to_vec(),
            ksf: Some(ksf_to_wire(started.ksf)),
            bundle: Vec::new(),
        }))
    }

    async fn recover_finish(
        &self,
        request: Request<v1::RecoverFinishRequest>,
    ) -> Result<Response<v1::RecoverFinishResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let released = self
            .hsm
            .recover_finish(&account, &body.login_id, &body.ke3)
            .await
            .map_err(|e| self.fail(e))?;
        tracing::debug!(%account, "key released");
        Ok(Response::new(v1::RecoverFinishResponse {
            sealed_wrapped_key: released.sealed_wrapped_key,
            attempts_left: released.attempts_left,
            sealed_retire_ticket: released.sealed_retire_ticket,
        }))
    }

    async fn recover_abort(
        &self,
        request: Request<v1::RecoverAbortRequest>,
    ) -> Result<Response<v1::RecoverAbortResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let destroyed = self
            .hsm
            .recover_abort(&account, &body.login_id)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(v1::RecoverAbortResponse { destroyed }))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let account = self.account(&request)?;
        let (status, max) = self
            .hsm
            .record_status(&account)
            .await
            .map_err(|e| self.fail(e))?;
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
            fleet_key: self.hsm.fleet_key().map(|k| k.to_vec()).unwrap_or_default(),
            bundle: Vec::new(),
        }))
    }

    async fn retire(
        &self,
        request: Request<v1::RetireRequest>,
    ) -> Result<Response<v1::RetireResponse>, Status> {
        let account = self.account(&request)?;
        let body = request.into_inner();
        let confirmation = self
            .hsm
            .retire(&account, &body.ticket)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(v1::RetireResponse {
            confirmation: confirmation.to_vec(),
        }))
    }

    async fn bundle(
        &self,
        _request: Request<v1::BundleRequest>,
    ) -> Result<Response<v1::BundleResponse>, Status> {
        Err(Status::unimplemented("bundles are served by the frontend"))
    }

    async fn fleet_status(
        &self,
        _request: Request<v1::FleetStatusRequest>,
    ) -> Result<Response<v1::FleetStatusResponse>, Status> {
        Err(Status::unimplemented(
            "fleet status is served by the frontend",
        ))
    }
}

/// Sealed traffic between HSMs.
pub struct NodePeer {
    hsm: Arc<FleetHsm>,
}

impl NodePeer {
    /// Carries peer traffic to and from `hsm`.
    pub fn new(hsm: Arc<FleetHsm>) -> Self {
        Self { hsm }
    }
}

#[tonic::async_trait]
impl Peer for NodePeer {
    async fn raft(
        &self,
        request: Request<v1::PeerMessage>,
    ) -> Result<Response<v1::PeerMessage>, Status> {
        let sealed = self
            .hsm
            .handle_peer(&request.into_inner().sealed)
            .await
            .map_err(hsm_status)?;
        Ok(Response::new(v1::PeerMessage { sealed }))
    }

    async fn join(
        &self,
        request: Request<v1::PeerMessage>,
    ) -> Result<Response<v1::PeerMessage>, Status> {
        let sealed = self
            .hsm
            .handle_join(&request.into_inner().sealed)
            .await
            .map_err(hsm_status)?;
        Ok(Response::new(v1::PeerMessage { sealed }))
    }
}

/// Operator view of one node.
pub struct NodeAdmin {
    hsm: Arc<FleetHsm>,
    baseline_rss: u64,
}

impl NodeAdmin {
    /// Reports on `hsm`; memory growth is measured from now.
    pub fn new(hsm: Arc<FleetHsm>) -> Self {
        Self {
            hsm,
            baseline_rss: resident_bytes(),
        }
    }
}

/// This process's resident memory (Linux), 0 where unknown.
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Converts the HSM's status to its wire form.
pub fn status_to_wire(status: NodeStatus) -> v1::NodeStatusResponse {
    v1::NodeStatusResponse {
        node_id: status.node_id,
        dc: status.dc,
        fingerprint: status.fingerprint,
        role: status.role,
        term: status.term,
        leader: status.leader.unwrap_or(0),
        applied_index: status.applied_index,
        last_log_index: status.last_log_index,
        fleet_key: status.fleet_key.unwrap_or_default(),
        members: status
            .members
            .into_iter()
            .map(|m| v1::MemberInfo {
                node_id: m.node_id,
                dc: m.dc,
                fingerprint: m.fingerprint,
                voter: m.voter,
            })
            .collect(),
        records: status.records as u64,
        platform: status.platform,
        rss_bytes: 0,
        baseline_rss_bytes: 0,
    }
}

#[tonic::async_trait]
impl Admin for NodeAdmin {
    async fn node_status(
        &self,
        _request: Request<v1::NodeStatusRequest>,
    ) -> Result<Response<v1::NodeStatusResponse>, Status> {
        let mut status = status_to_wire(self.hsm.status());
        status.rss_bytes = resident_bytes();
        status.baseline_rss_bytes = self.baseline_rss;
        Ok(Response::new(status))
    }

    async fn evidence(
        &self,
        _request: Request<v1::EvidenceRequest>,
    ) -> Result<Response<v1::EvidenceResponse>, Status> {
        let evidence = self.hsm.evidence().map_err(hsm_status)?;
        Ok(Response::new(v1::EvidenceResponse {
            fleet_key: self.hsm.fleet_key().map(hex::encode).unwrap_or_default(),
            evidence_json: serde_json::to_string(&evidence)
                .map_err(|e| Status::internal(e.to_string()))?,
        }))
    }
}
