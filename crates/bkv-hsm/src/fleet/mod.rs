//! A fleet member: the HSM's side of the Raft group that replicates the record table.
//!
//! Raft (`openraft`) runs here, inside the trusted boundary, over the sealed channels of
//! [`crate::channel`]; its log and state live in this HSM's memory only. A member that
//! restarts is a new member with a fresh identity: it asks the leader to join, the
//! leader checks its attestation, commits its admission (with the fleet secrets sealed
//! to it), adds it as a learner, and swaps it for the dead member of its datacenter.

pub mod audit;
mod commit;
mod network;
pub mod state;
mod store;
mod vault;
mod wiped;

pub use network::{BoxFuture, PeerTransport, TransportError};

use crate::channel::{open_secret, seal_secret, Attestation, Envelope, Identity, PeerChannels};
use crate::error::HsmError;
use crate::pending::{PendingLogins, PendingRegistrations};
use crate::platform::{Platform, PlatformRng};
use bkv_core::Suite;
use network::{PeerNetwork, PeerRequest, PeerResponse};
use opaque_ke::ServerSetup;
use openraft::{ChangeMembers, Config, Raft, ServerState};
use serde::{Deserialize, Serialize};
use state::{Admission, FleetCommand, FleetOutcome, Genesis};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use store::{LogStore, MachineData, StateMachineStore};

/// A Raft node as the fleet knows it: the datacenter slot it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberNode {
    /// The datacenter name.
    pub dc: String,
}

openraft::declare_raft_types!(
    /// Raft types of a bkv fleet.
    pub TypeConfig:
        D = FleetCommand,
        R = FleetOutcome,
        NodeId = u64,
        Node = MemberNode,
        SnapshotData = wiped::SnapshotBytes,
);

/// Policy and timing of one member.
#[derive(Clone, Copy, Debug)]
pub struct HsmConfig {
    /// How long a KE3 is accepted after its KE2, in milliseconds of the HSM's clock.
    pub login_deadline_ms: u64,
    /// Logins that may await their KE3 at once.
    pub max_pending_logins: usize,
    /// How long a commit may take before the call answers "unavailable".
    pub commit_timeout_ms: u64,
    /// A leader whose last majority acknowledgement is older than this refuses to commit.
    pub quorum_freshness_ms: u64,
    /// A member not heard from for this long may be replaced by a new one in its slot.
    pub member_silence_ms: u64,
    /// Raft heartbeat interval.
    pub heartbeat_ms: u64,
    /// Record commands applied between snapshots, at least (a snapshot lets Raft drop
    /// older log entries, which hold the commands in full); a table of more than eight
    /// times as many accounts snapshots after an eighth of its size.
    pub snapshot_every: u64,
}

impl Default for HsmConfig {
    fn default() -> Self {
        Self {
            login_deadline_ms: 60_000,
            max_pending_logins: 10_000,
            commit_timeout_ms: 5_000,
            quorum_freshness_ms: 1_500,
            member_silence_ms: 2_000,
            heartbeat_ms: 100,
            snapshot_every: 50_000,
        }
    }
}

/// The fleet's secrets, held by every admitted member.
struct FleetSecret {
    setup: ServerSetup<Suite>,
    fleet_key: [u8; 32],
    /// Authenticates retire tickets; derived once, as every recovery uses it.
    retire_key: zeroize::Zeroizing<[u8; 32]>,
}

impl FleetSecret {
    fn new(setup: ServerSetup<Suite>, fleet_key: [u8; 32]) -> Self {
        let ikm = zeroize::Zeroizing::new(setup.serialize().to_vec());
        let retire_key = bkv_core::seal::derive_key(vault::LABEL_RETIRE_KEY, &ikm, &fleet_key);
        Self {
            setup,
            fleet_key,
            retire_key,
        }
    }
}

/// State shared between the Raft storage, the network and the vault operations.
pub(crate) struct Shared {
    platform: Arc<dyn Platform>,
    identity: Arc<Identity>,
    channels: PeerChannels,
    machine: Mutex<MachineData>,
    secret: OnceLock<FleetSecret>,
    last_heard: Mutex<HashMap<u64, u64>>,
    // Raised by the state machine when enough record commands were applied since the
    // last snapshot (see `HsmConfig::snapshot_every`).
    snapshot_due: tokio::sync::Notify,
}

impl Shared {
    pub(crate) fn machine(&self) -> MutexGuard<'_, MachineData> {
        self.machine.lock().expect("state machine lock")
    }

    /// Learns what newly applied state means for this member: the fleet it belongs to,
    /// and its own sealed copy of the fleet secrets.
    pub(crate) fn after_state_change(&self) {
        let (genesis, admission) = {
            let machine = self.machine();
            let Some(genesis) = machine.state.genesis.clone() else {
                return;
            };
            let admission = machine
                .state
                .admissions
                .get(&self.identity.node_id())
                .cloned();
            (genesis, admission)
        };
        self.channels
            .join_fleet(genesis.fleet_id, &genesis.approved_measurements);
        if self.secret.get().is_some() {
            return;
        }
        let Some(sealed) = admission.and_then(|a| a.sealed_secret) else {
            return;
        };
        match open_secret(&self.identity, &genesis.fleet_id, &sealed) {
            Ok(bytes) => match ServerSetup::<Suite>::deserialize(&bytes) {
                Ok(setup)
                    if setup.keypair().public().serialize().as_slice() != genesis.fleet_key =>
                {
                    tracing::error!("the fleet secret sealed to this member does not match the fleet key; not serving");
                }
                Ok(setup) => {
                    let _ = self.secret.set(FleetSecret::new(setup, genesis.fleet_key));
                    tracing::info!("fleet secrets received; this member can serve");
                }
                Err(_) => tracing::error!("sealed fleet secret does not decode"),
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot open the fleet secret sealed to this member")
            }
        }
    }

    /// Makes sure a channel to `node_id` exists, from its admission in the fleet state.
    pub(crate) fn ensure_peer(&self, node_id: u64) -> Result<(), HsmError> {
        let attestation = self
            .machine()
            .state
            .admissions
            .get(&node_id)
            .map(|a| a.attestation.clone())
            .ok_or_else(|| HsmError::PeerRefused(format!("member {node_id} was never admitted")))?;
        self.channels
            .admit_peer(&attestation)
            .map_err(|e| HsmError::PeerRefused(e.to_string()))
    }

    pub(crate) fn mark_alive(&self, node_id: u64) {
        let now = self.platform.now_millis();
        self.last_heard
            .lock()
            .expect("liveness lock")
            .insert(node_id, now);
    }

    fn heard_within(&self, node_id: u64, millis: u64) -> bool {
        let now = self.platform.now_millis();
        self.last_heard
            .lock()
            .expect("liveness lock")
            .get(&node_id)
            .is_some_and(|t| now.saturating_sub(*t) <= millis)
    }
}

/// A join request: the would-be member's attestation.
#[derive(Serialize, Deserialize)]
struct JoinRequest {
    attestation: Attestation,
}

/// What a leader tells an admitted member, sealed to it.
#[derive(Serialize, Deserialize)]
struct JoinAnswer {
    leader: Attestation,
    sealed: crate::channel::SealedSecret,
}

#[derive(Serialize, Deserialize)]
struct JoinInfo {
    genesis: Genesis,
}

/// One member's view of the fleet, for operators.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    /// Raft node id.
    pub node_id: u64,
    /// Datacenter slot.
    pub dc: String,
    /// Identity key fingerprint.
    pub fingerprint: String,
    /// Whether it votes (else it is a learner).
    pub voter: bool,
}

/// This member's status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Raft node id.
    pub node_id: u64,
    /// Datacenter slot.
    pub dc: String,
    /// Identity key fingerprint.
    pub fingerprint: String,
    /// "leader", "follower", "candidate", "learner".
    pub role: String,
    /// Raft term.
    pub term: u64,
    /// Leader's node id, if known.
    pub leader: Option<u64>,
    /// Index of the last applied entry.
    pub applied_index: u64,
    /// Index of the last log entry.
    pub last_log_index: u64,
    /// The fleet key, once this member holds the fleet secrets.
    pub fleet_key: Option<String>,
    /// Members in this member's view of the membership.
    pub members: Vec<MemberView>,
    /// Live records.
    pub records: usize,
    /// What kind of HSM this is.
    pub platform: String,
}

/// One HSM of a fleet.
pub struct FleetHsm {
    shared: Arc<Shared>,
    raft: Raft<TypeConfig>,
    pending: Mutex<PendingLogins>,
    registrations: Mutex<PendingRegistrations>,
    config: HsmConfig,
    membership: tokio::sync::Mutex<()>,
    committer: commit::Committer,
    // A handle on Raft's in-memory log, read by `audit_view`.
    log: LogStore,
}

impl std::fmt::Debug for FleetHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetHsm")
            .field("platform", &self.shared.platform.describe())
            .field("identity", &self.shared.identity)
            .field("secrets", &"(redacted)")
            .finish()
    }
}

/// Sends a heartbeat while this member leads and no majority has answered for
/// `interval_ms`; ends when Raft stops.
async fn heartbeat_when_idle(raft: Raft<TypeConfig>, interval_ms: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis((interval_ms / 4).max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = raft.metrics();
    // openraft computes `millis_since_quorum_ack` only when it publishes metrics, which an
    // idle member does once per tick (1.5 intervals): the value then stands still. Its age
    // is counted from when it was seen published, at worst a quarter interval late.
    let mut leading = false;
    let mut acked: Option<(u64, std::time::Instant)> = None;
    loop {
        tick.tick().await;
        match watch.has_changed() {
            // A stopped Raft drops its metrics sender, whatever role it had.
            Err(_) => return,
            Ok(false) => {}
            Ok(true) => {
                let metrics = watch.borrow_and_update();
                if metrics.running_state.is_err() {
                    return;
                }
                leading = metrics.state == ServerState::Leader;
                acked = metrics
                    .millis_since_quorum_ack
                    .map(|ms| (ms, std::time::Instant::now()));
            }
        }
        let silent_ms = acked.map(|(ms, seen)| ms + seen.elapsed().as_millis() as u64);
        if leading
            && silent_ms.is_none_or(|ms| ms >= interval_ms)
            && raft.trigger().heartbeat().await.is_err()
        {
            return;
        }
    }
}

impl FleetHsm {
    /// Starts a member for datacenter `dc` with a fresh identity; it serves nothing until
    /// it founds a fleet or is admitted to one.
    pub async fn start(
        platform: Arc<dyn Platform>,
        dc: &str,
        config: HsmConfig,
        transport: Arc<dyn PeerTransport>,
    ) -> Result<Arc<Self>, HsmError> {
        let identity = Arc::new(Identity::generate(platform.as_ref(), dc));
        let channels = PeerChannels::new(
            identity.clone(),
            platform.attestation_root(),
            platform.measurement(),
        );
        tracing::info!(platform = platform.describe(), dc, node_id = identity.node_id(),
            fingerprint = %identity.attestation().fingerprint(), "HSM started with a fresh identity");
        let shared = Arc::new(Shared {
            platform,
            identity: identity.clone(),
            channels,
            machine: Mutex::new(MachineData::default()),
            secret: OnceLock::new(),
            last_heard: Mutex::new(HashMap::new()),
            snapshot_due: tokio::sync::Notify::new(),
        });
        let raft_config = Config {
            cluster_name: "bkv".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.heartbeat_ms * 4,
            election_timeout_max: config.heartbeat_ms * 8,
            // Snapshots are asked for by the state machine, by record commands applied
            // rather than by entries: an entry may carry a batch of many.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: (config.snapshot_every / 50).max(1),
            purge_batch_size: 1,
            // The leader heartbeats only when idle (`heartbeat_when_idle`, below).
            enable_heartbeat: false,
            ..Config::default()
        }
        .validate()
        .map_err(|e| HsmError::PeerRefused(format!("raft config: {e}")))?;
        let network = PeerNetwork {
            shared: shared.clone(),
            transport,
        };
        let log = LogStore::default();
        let raft = Raft::new(
            identity.node_id(),
            Arc::new(raft_config),
            network,
            log.clone(),
            StateMachineStore::new(shared.clone(), config.snapshot_every),
        )
        .await
        .map_err(|e| HsmError::PeerRefused(format!("raft start: {e}")))?;
        // openraft 0.9 heartbeats every follower with nothing in flight at each interval,
        // also in the short gaps between entries (while a client makes its next round
        // trip); with one AppendEntries in flight per follower, the next entry then waits
        // a round trip behind it. Entries already keep followers' election timers and the
        // leader's lease fresh, so a heartbeat goes only when no majority answered for an
        // interval.
        tokio::spawn(heartbeat_when_idle(raft.clone(), config.heartbeat_ms));
        let (trigger, due) = (raft.clone(), shared.clone());
        tokio::spawn(async move {
            loop {
                due.snapshot_due.notified().await;
                // An error means Raft has stopped: so does this task.
                if trigger.trigger().snapshot().await.is_err() {
                    return;
                }
            }
        });
        let committer = commit::Committer::new(raft.clone(), shared.clone(), &config);
        Ok(Arc::new(Self {
            shared,
            raft,
            committer,
            pending: Mutex::new(PendingLogins::new(config.max_pending_logins)),
            registrations: Mutex::new(PendingRegistrations::new(config.max_pending_logins)),
            config,
            membership: tokio::sync::Mutex::new(()),
            log,
        }))
    }

    /// This member's attestation.
    pub fn attestation(&self) -> &Attestation {
        self.shared.identity.attestation()
    }

    /// What kind of HSM this is (for banners and logs).
    pub fn describe(&self) -> &'static str {
        self.shared.platform.describe()
    }

    /// The fleet key, once this member holds the fleet secrets.
    pub fn fleet_key(&self) -> Option<[u8; 32]> {
        self.shared.secret.get().map(|s| s.fleet_key)
    }

    /// Founds a new fleet with this member alone: makes the fleet's OPAQUE keys here,
    /// inside this HSM. Returns the fleet key clients pin.
    pub async fn found(&self, max_attempts: u32) -> Result<[u8; 32], HsmError> {
        let me = self.shared.identity.node_id();
        let dc = self.attestation().dc.clone();
        self.raft
            .initialize(std::collections::BTreeMap::from([(me, MemberNode { dc })]))
            .await
            .map_err(|e| HsmError::JoinRefused(format!("cannot found: {e}")))?;
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .state(ServerState::Leader, "founding leader")
            .await
            .map_err(|_| HsmError::Unavailable)?;
        let setup = ServerSetup::<Suite>::new(&mut PlatformRng(self.shared.platform.as_ref()));
        let mut fleet_key = [0u8; 32];
        fleet_key.copy_from_slice(&setup.keypair().public().serialize());
        let mut fleet_id = [0u8; 32];
        self.shared.platform.fill_random(&mut fleet_id);
        let approved_measurements = vec![self.shared.platform.measurement()];
        // The ceremony transcript is signed here, inside the founding HSM, by its platform.
        let ceremony_signature = self
            .shared
            .platform
            .certify(&crate::evidence::ceremony_statement(
                &fleet_id,
                &fleet_key,
                max_attempts,
                &approved_measurements,
                self.attestation(),
            ))
            .to_vec();
        let genesis = Genesis {
            fleet_id,
            fleet_key,
            max_attempts,
            approved_measurements,
            founder: self.attestation().clone(),
            ceremony_signature,
        };
        let _ = self.shared.secret.set(FleetSecret::new(setup, fleet_key));
        match self.commit(FleetCommand::Found(genesis)).await? {
            FleetOutcome::Founded => {
                tracing::info!(fleet_key = %hex(&fleet_key), "fleet founded");
                Ok(fleet_key)
            }
            other => Err(HsmError::JoinRefused(format!(
                "founding refused: {other:?}"
            ))),
        }
    }

    /// The join request a new member sends to the fleet.
    pub fn join_request(&self) -> Vec<u8> {
        postcard::to_allocvec(&JoinRequest {
            attestation: self.attestation().clone(),
        })
        .expect("a join request serializes")
    }

    /// Leader: admits the member whose attestation `request` carries, if its code is
    /// approved and its datacenter slot is free (empty, or held by a silent member).
    /// Returns the answer for the new member; the membership change follows in the background.
    pub async fn handle_join(self: &Arc<Self>, request: &[u8]) -> Result<Vec<u8>, HsmError> {
        let request: JoinRequest =
            postcard::from_bytes(request).map_err(|_| HsmError::Malformed("join request"))?;
        let candidate = request.attestation;
        self.check_leader()?;
        let secret = self.shared.secret.get().ok_or(HsmError::NotReady)?;
        let genesis = self
            .shared
            .machine()
            .state
            .genesis
            .clone()
            .ok_or(HsmError::NotReady)?;
        self.shared
            .channels
            .admit_peer(&candidate)
            .map_err(|e| HsmError::JoinRefused(e.to_string()))?;
        if !genesis
            .approved_measurements
            .contains(&candidate.measurement)
        {
            return Err(HsmError::JoinRefused(
                "code measurement not approved by this fleet".into(),
            ));
        }
        // Refused early here; decided again under the membership lock in `promote`.
        self.slot_holders(&candidate)?;
        let admitted = self
            .shared
            .machine()
            .state
            .admissions
            .contains_key(&candidate.node_id);
        if !admitted {
            let sealed = seal_secret(
                self.shared.platform.as_ref(),
                &self.shared.identity,
                &candidate,
                &genesis.fleet_id,
                &secret.setup.serialize(),
            );
            match self
                .commit(FleetCommand::Admit(Admission {
                    attestation: candidate.clone(),
                    sealed_secret: Some(sealed),
                }))
                .await?
            {
                FleetOutcome::Admitted => {}
                other => return Err(HsmError::JoinRefused(format!("{other:?}"))),
            }
            tracing::info!(dc = %candidate.dc, node_id = candidate.node_id, "member admitted");
        }
        let this = self.clone();
        let promoted = candidate.clone();
        tokio::spawn(async move { this.promote(promoted).await });
        let info = postcard::to_allocvec(&JoinInfo { genesis }).expect("join info serializes");
        let sealed = seal_secret(
            self.shared.platform.as_ref(),
            &self.shared.identity,
            &candidate,
            &JOIN_BINDING,
            &info,
        );
        Ok(postcard::to_allocvec(&JoinAnswer {
            leader: self.attestation().clone(),
            sealed,
        })
        .expect("join answer serializes"))
    }

    /// Members other than `candidate` that hold its datacenter slot; refuses if one of
    /// them is alive (a live slot is never taken over).
    fn slot_holders(&self, candidate: &Attestation) -> Result<Vec<u64>, HsmError> {
        let me = self.shared.identity.node_id();
        let membership = self.shared.machine().last_membership.clone();
        let mut holders = Vec::new();
        for (id, node) in membership.nodes() {
            if *id == candidate.node_id || node.dc != candidate.dc {
                continue;
            }
            if *id == me || self.shared.heard_within(*id, self.config.member_silence_ms) {
                return Err(HsmError::JoinRefused(format!(
                    "datacenter {} is served by a live member",
                    candidate.dc
                )));
            }
            holders.push(*id);
        }
        Ok(holders)
    }

    /// Adds an admitted member as learner, then swaps it for the silent holders of its slot,
    /// deciding who holds the slot again under the membership lock, so that two joins for
    /// one slot cannot both win.
    async fn promote(&self, candidate: Attestation) {
        let _guard = self.membership.lock().await;
        let (id, dc) = (candidate.node_id, candidate.dc.clone());
        let replaced = match self.slot_holders(&candidate) {
            Ok(replaced) => replaced,
            Err(e) => {
                tracing::warn!(node_id = id, %dc, error = %e, "not promoting");
                return;
            }
        };
        let add = tokio::time::timeout(
            Duration::from_secs(30),
            self.raft
                .add_learner(id, MemberNode { dc: dc.clone() }, true),
        )
        .await;
        if !matches!(add, Ok(Ok(_))) {
            tracing::warn!(node_id = id, %dc, "new member did not catch up; it may ask again");
            return;
        }
        let voters = swapped_voters(
            self.shared.machine().last_membership.membership(),
            &replaced,
            id,
        );
        match tokio::time::timeout(
            Duration::from_secs(30),
            self.raft.change_membership(voters, false),
        )
        .await
        {
            Ok(Ok(_)) => tracing::info!(node_id = id, %dc, ?replaced, "member joined the voters"),
            Ok(Err(e)) => {
                tracing::warn!(node_id = id, %dc, error = %e, "membership change failed");
                return;
            }
            Err(_) => {
                tracing::warn!(node_id = id, %dc, "membership change timed out");
                return;
            }
        }
        // A replaced member that died while still a learner is not dropped by the voter
        // change above (it never voted): remove it, or the leader replicates to it forever.
        let dead_learners: BTreeSet<u64> = {
            let machine = self.shared.machine();
            let membership = machine.last_membership.membership();
            replaced
                .iter()
                .copied()
                .filter(|old| membership.get_node(old).is_some())
                .collect()
        };
        if dead_learners.is_empty() {
            return;
        }
        let removal = tokio::time::timeout(
            Duration::from_secs(30),
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(dead_learners.clone()), false),
        )
        .await;
        if !matches!(removal, Ok(Ok(_))) {
            tracing::warn!(node_id = id, %dc, ?dead_learners, "could not remove dead learners; the next join for the slot will");
        }
    }

    /// New member: checks the leader's answer and binds this member to its fleet.
    pub fn accept_join_answer(&self, answer: &[u8]) -> Result<(), HsmError> {
        let answer: JoinAnswer =
            postcard::from_bytes(answer).map_err(|_| HsmError::Malformed("join answer"))?;
        self.shared
            .channels
            .admit_peer(&answer.leader)
            .map_err(|e| HsmError::JoinRefused(e.to_string()))?;
        if answer.sealed.from != answer.leader.channel_key {
            return Err(HsmError::JoinRefused(
                "join answer not sealed by the leader".into(),
            ));
        }
        let info = open_secret(&self.shared.identity, &JOIN_BINDING, &answer.sealed)
            .map_err(|e| HsmError::JoinRefused(e.to_string()))?;
        let info: JoinInfo =
            postcard::from_bytes(&info).map_err(|_| HsmError::Malformed("join info"))?;
        self.shared
            .channels
            .join_fleet(info.genesis.fleet_id, &info.genesis.approved_measurements);
        self.shared
            .channels
            .admit_peer(&answer.leader)
            .map_err(|e| HsmError::JoinRefused(e.to_string()))?;
        Ok(())
    }

    /// Whether this member votes in a settled membership. A member brought in by a change
    /// still in its joint phase is not a voter yet: if the leader that started the change
    /// lost its leadership, nothing else would finish it, so the member's host keeps
    /// asking to join, and the next [`Self::promote`] finishes the change.
    pub fn is_voter(&self) -> bool {
        let me = self.shared.identity.node_id();
        let voter = match &self
            .shared
            .machine()
            .last_membership
            .membership()
            .get_joint_config()[..]
        {
            [settled] => settled.contains(&me),
            _ => false,
        };
        voter && self.fleet_key().is_some()
    }

    /// Handles one sealed Raft message from a peer and returns the sealed answer.
    pub async fn handle_peer(&self, message: &[u8]) -> Result<Vec<u8>, HsmError> {
        let envelope: Envelope =
            postcard::from_bytes(message).map_err(|_| HsmError::Malformed("peer envelope"))?;
        let (from, plain) = self
            .shared
            .channels
            .open(&envelope, 0)
            .map_err(|e| HsmError::PeerRefused(e.to_string()))?;
        let request: PeerRequest =
            postcard::from_bytes(&plain).map_err(|_| HsmError::Malformed("peer request"))?;
        self.shared.mark_alive(from);
        let response = match request {
            PeerRequest::Append(rpc) => PeerResponse::Append(self.raft.append_entries(rpc).await),
            PeerRequest::Vote(rpc) => PeerResponse::Vote(self.raft.vote(rpc).await),
            PeerRequest::Snapshot(rpc) => {
                PeerResponse::Snapshot(self.raft.install_snapshot(rpc).await)
            }
        };
        let plain =
            wiped::serialize(&response).map_err(|_| HsmError::Malformed("peer response"))?;
        let (answer, _) = self
            .shared
            .channels
            .seal(from, envelope.counter, &plain)
            .map_err(|e| HsmError::PeerRefused(e.to_string()))?;
        Ok(postcard::to_allocvec(&answer).expect("an envelope serializes"))
    }

    /// Evidence of this fleet's deployment (ceremony and admitted members' attestations),
    /// from this member's applied state.
    pub fn evidence(&self) -> Result<bkv_core::bundle::Evidence, HsmError> {
        let machine = self.shared.machine();
        let genesis = machine.state.genesis.as_ref().ok_or(HsmError::NotReady)?;
        Ok(crate::evidence::evidence(
            genesis,
            &machine.state.admissions,
        ))
    }

    /// This member's view of itself and the fleet.
    pub fn status(&self) -> NodeStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let machine = self.shared.machine();
        let membership = machine.last_membership.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| MemberView {
                node_id: *id,
                dc: node.dc.clone(),
                fingerprint: machine
                    .state
                    .admissions
                    .get(id)
                    .map(|a| a.attestation.fingerprint())
                    .unwrap_or_default(),
                voter: voters.contains(id),
            })
            .collect();
        let me = self.shared.identity.node_id();
        let role = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Follower if voters.contains(&me) => "follower",
            _ => "learner",
        };
        NodeStatus {
            node_id: me,
            dc: self.attestation().dc.clone(),
            fingerprint: self.attestation().fingerprint(),
            role: role.into(),
            term: metrics.current_term,
            leader: metrics.current_leader,
            applied_index: metrics.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            fleet_key: self.fleet_key().map(|k| hex(&k)),
            members,
            records: machine.state.table.active_records(),
            platform: self.describe().into(),
        }
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }

    /// Refuses unless this member leads and heard from a majority recently.
    fn check_leader(&self) -> Result<(), HsmError> {
        self.committer.check_leader()
    }

    /// Commits `command` through the fleet's majority; the only way state changes.
    async fn commit(&self, command: FleetCommand) -> Result<FleetOutcome, HsmError> {
        self.committer.commit(command).await
    }

    /// Waits until this member leads with a fresh majority and has applied everything
    /// committed before, so that reads see every acknowledged write.
    async fn linearize(&self) -> Result<(), HsmError> {
        self.check_leader()?;
        let read = tokio::time::timeout(
            Duration::from_millis(self.config.commit_timeout_ms),
            self.raft.ensure_linearizable(),
        )
        .await;
        match read {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(openraft::error::RaftError::APIError(
                openraft::error::CheckIsLeaderError::ForwardToLeader(f),
            ))) => Err(HsmError::NotLeader {
                leader_dc: f.leader_node.map(|n| n.dc),
            }),
            _ => Err(HsmError::Unavailable),
        }
    }
}

/// The voters once `candidate` has replaced the `replaced` holders of its slot. The base is
/// the last configuration of `membership`, the goal of any change still in its joint phase:
/// the union of a joint membership would keep a replaced member as a voter for good.
fn swapped_voters(
    membership: &openraft::Membership<u64, MemberNode>,
    replaced: &[u64],
    candidate: u64,
) -> BTreeSet<u64> {
    let mut voters = membership
        .get_joint_config()
        .last()
        .cloned()
        .unwrap_or_default();
    for old in replaced {
        voters.remove(old);
    }
    voters.insert(candidate);
    voters
}

/// Binding for the join answer, which is sealed before the new member knows the fleet id.
const JOIN_BINDING: [u8; 32] = *b"bkv/v1/join-answer\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
