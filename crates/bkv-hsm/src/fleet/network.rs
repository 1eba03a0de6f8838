//! Raft's network, inside the HSM: every Raft message is sealed to its recipient's attested
//! identity before the host sees it, and every answer is checked the same way. The host
//! only carries bytes ([`PeerTransport`]).

use super::{MemberNode, Shared, TypeConfig};
use crate::channel::Envelope;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the host could not deliver a message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("peer transport: {0}")]
pub struct TransportError(pub String);

/// The host's side of peer traffic: carries sealed bytes to the member serving a
/// datacenter and brings back its sealed answer. Untrusted: it may drop, delay, replay
/// or alter anything, and the HSM refuses what does not authenticate.
pub trait PeerTransport: Send + Sync + 'static {
    /// Sends `message` to the member serving `dc` and returns its answer.
    fn call(&self, dc: &str, message: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, TransportError>>;
}

/// A Raft request as sealed between members.
#[derive(Serialize, Deserialize)]
pub(crate) enum PeerRequest {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
}

/// A Raft answer as sealed between members.
#[derive(Serialize, Deserialize)]
pub(crate) enum PeerResponse {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
}

/// Makes one [`PeerClient`] per target member.
pub(crate) struct PeerNetwork {
    pub(crate) shared: Arc<Shared>,
    pub(crate) transport: Arc<dyn PeerTransport>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &MemberNode) -> Self::Network {
        PeerClient {
            target,
            dc: node.dc.clone(),
            shared: self.shared.clone(),
            transport: self.transport.clone(),
        }
    }
}

/// Raft's connection to one member.
pub(crate) struct PeerClient {
    target: u64,
    dc: String,
    shared: Arc<Shared>,
    transport: Arc<dyn PeerTransport>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PeerFault(String);

fn unreachable<E>(why: impl std::fmt::Display) -> RPCError<u64, MemberNode, E>
where
    E: std::error::Error,
{
    RPCError::Unreachable(Unreachable::new(&PeerFault(why.to_string())))
}

impl PeerClient {
    async fn call<E: std::error::Error>(
        &self,
        request: PeerRequest,
    ) -> Result<PeerResponse, RPCError<u64, MemberNode, E>> {
        self.shared.ensure_peer(self.target).map_err(unreachable)?;
        let plain = super::wiped::serialize(&request)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let (envelope, counter) = self
            .shared
            .channels
            .seal(self.target, 0, &plain)
            .map_err(unreachable)?;
        let wire = postcard::to_allocvec(&envelope)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let answer = self
            .transport
            .call(&self.dc, wire)
            .await
            .map_err(unreachable)?;
        let envelope: Envelope = postcard::from_bytes(&answer).map_err(unreachable)?;
        let (from, plain) = self
            .shared
            .channels
            .open(&envelope, counter)
            .map_err(unreachable)?;
        if from != self.target {
            return Err(unreachable("answer from another member"));
        }
        self.shared.mark_alive(self.target);
        postcard::from_bytes(&plain).map_err(unreachable)
    }
}

// The error type is openraft's, fixed by its `RaftNetwork` trait.
#[allow(clippy::result_large_err)]
fn remote<T, E: std::error::Error>(
    target: u64,
    result: Result<T, RaftError<u64, E>>,
) -> Result<T, RPCError<u64, MemberNode, RaftError<u64, E>>> {
    result.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, MemberNode, RaftError<u64>>> {
        match self.call(PeerRequest::Append(rpc)).await? {
            PeerResponse::Append(result) => remote(self.target, result),
            _ => Err(unreachable("mismatched answer")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, MemberNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self.call(PeerRequest::Snapshot(rpc)).await? {
            PeerResponse::Snapshot(result) => remote(self.target, result),
            _ => Err(unreachable("mismatched answer")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, MemberNode, RaftError<u64>>> {
        match self.call(PeerRequest::Vote(rpc)).await? {
            PeerResponse::Vote(result) => remote(self.target, result),
            _ => Err(unreachable("mismatched answer")),
        }
    }
}
