//! Raft's log and state machine, kept in HSM memory only. Nothing here touches a disk:
//! a restarted HSM is a new member that is caught up by its peers (DESIGN.md §4).

use super::wiped::{self, SnapshotBytes};
use super::{MemberNode, Shared, TypeConfig};
use crate::fleet::state::{FleetCommand, FleetOutcome, FleetState};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

type NodeId = u64;

#[derive(Default)]
struct LogData {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
}

/// The Raft log, in memory.
#[derive(Clone, Default)]
pub(crate) struct LogStore {
    inner: Arc<Mutex<LogData>>,
}

impl LogStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogData> {
        self.inner.lock().expect("log lock")
    }

    /// The entries still in the log within `range`.
    pub(crate) fn entries(&self, range: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
        self.lock()
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        Ok(self
            .lock()
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let data = self.lock();
        let last = data
            .log
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(data.last_purged);
        Ok(LogState {
            last_purged_log_id: data.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut data = self.lock();
            for entry in entries {
                data.log.insert(entry.log_id.index, entry);
            }
        }
        // Memory is this store's durable medium: the entry is "flushed" once inserted.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.lock().log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut data = self.lock();
        let keep = data.log.split_off(&(log_id.index + 1));
        data.log = keep;
        data.last_purged = Some(log_id);
        Ok(())
    }
}

/// What the state machine holds beside the fleet state.
#[derive(Default)]
pub(crate) struct MachineData {
    pub(crate) state: FleetState,
    pub(crate) last_applied: Option<LogId<NodeId>>,
    pub(crate) last_membership: StoredMembership<NodeId, MemberNode>,
    // No serialized copy is kept: a snapshot is made from the live state when asked for,
    // which halves memory per record. Only whether one exists is remembered.
    has_snapshot: bool,
    snapshots_built: u64,
    commands_since_snapshot: u64,
    snapshot_asked: bool,
}

impl MachineData {
    /// The state as it is now and the metadata of a snapshot of it. Cheap (the record
    /// table is copy-on-write), so the state-machine lock is held only for this; the
    /// copy is serialized afterwards by [`serialize_snapshot`] while entries keep applying.
    fn freeze(&mut self) -> (FleetState, SnapshotMeta<NodeId, MemberNode>) {
        let meta = self.snapshot_meta();
        (self.state.clone(), meta)
    }

    /// Records that a snapshot of the state as it is now exists, and returns its metadata.
    fn snapshot_meta(&mut self) -> SnapshotMeta<NodeId, MemberNode> {
        self.snapshots_built += 1;
        self.has_snapshot = true;
        let snapshot_id = format!(
            "{}-{}",
            self.last_applied.map(|l| l.index).unwrap_or(0),
            self.snapshots_built
        );
        SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id,
        }
    }
}

/// Serializes a frozen state off the async workers: a large table takes long enough to
/// hold up heartbeats if it ran on one of them.
async fn serialize_snapshot(
    (state, meta): (FleetState, SnapshotMeta<NodeId, MemberNode>),
) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
    let bytes = tokio::task::spawn_blocking(move || wiped::serialize(&state))
        .await
        .map_err(|e| StorageIOError::read_state_machine(&e))?
        .map_err(|e| StorageIOError::read_state_machine(&e))?;
    Ok(Snapshot {
        meta,
        snapshot: Box::new(SnapshotBytes::new(bytes)),
    })
}

/// The state machine: applies committed entries to the [`FleetState`] in `Shared`.
#[derive(Clone)]
pub(crate) struct StateMachineStore {
    shared: Arc<Shared>,
    snapshot_every: u64,
}

impl StateMachineStore {
    pub(crate) fn new(shared: Arc<Shared>, snapshot_every: u64) -> Self {
        Self {
            shared,
            snapshot_every,
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // openraft 0.9 keeps only the metadata of a snapshot it has built, to purge its
        // log (`core::sm::worker`, `build_snapshot`): the bytes would be made and thrown
        // away. They are made when a member needs them, from the state as it is then
        // (`get_current_snapshot`). Should anything try to install these, the empty
        // bytes do not decode: it fails, it does not install an empty table.
        let meta = {
            let mut machine = self.shared.machine();
            // The point openraft purges its log to: the count of commands it keeps
            // restarts here, not at a copy made to catch a member up.
            machine.commands_since_snapshot = 0;
            machine.snapshot_asked = false;
            machine.snapshot_meta()
        };
        Ok(Snapshot {
            meta,
            snapshot: Box::default(),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, MemberNode>), StorageError<NodeId>>
    {
        let machine = self.shared.machine();
        Ok((machine.last_applied, machine.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<FleetOutcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let outcomes = {
            let mut machine = self.shared.machine();
            let outcomes: Vec<FleetOutcome> = entries
                .into_iter()
                .map(|entry| {
                    machine.last_applied = Some(entry.log_id);
                    match entry.payload {
                        EntryPayload::Blank => FleetOutcome::None,
                        EntryPayload::Normal(command) => {
                            if let FleetCommand::Records(commands) = &command {
                                machine.commands_since_snapshot += commands.len() as u64;
                            }
                            machine.state.apply(&command)
                        }
                        EntryPayload::Membership(membership) => {
                            machine.last_membership =
                                StoredMembership::new(Some(entry.log_id), membership);
                            FleetOutcome::None
                        }
                    }
                })
                .collect();
            // A snapshot serializes the whole table: a large one is taken after changes in
            // proportion to its size (an eighth), so that its cost per command stays flat
            // while the log it lets Raft drop stays small beside the table.
            let due = self
                .snapshot_every
                .max(machine.state.table.len() as u64 / 8);
            // Asked once: the count restarts when the snapshot is taken.
            if machine.commands_since_snapshot >= due && !machine.snapshot_asked {
                machine.snapshot_asked = true;
                self.shared.snapshot_due.notify_one();
            }
            outcomes
        };
        self.shared.after_state_change();
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<SnapshotBytes>, StorageError<NodeId>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MemberNode>,
        snapshot: Box<SnapshotBytes>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_bytes();
        let state: FleetState =
            tokio::task::spawn_blocking(move || postcard::from_bytes::<FleetState>(&bytes))
                .await
                .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?
                .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        {
            let mut machine = self.shared.machine();
            machine.state = state;
            machine.last_applied = meta.last_log_id;
            machine.last_membership = meta.last_membership.clone();
            machine.has_snapshot = true;
            machine.commands_since_snapshot = 0;
            machine.snapshot_asked = false;
        }
        self.shared.after_state_change();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let frozen = {
            let mut machine = self.shared.machine();
            if !machine.has_snapshot {
                return Ok(None);
            }
            // A snapshot of the current state: it covers at least what the last one did.
            machine.freeze()
        };
        serialize_snapshot(frozen).await.map(Some)
    }
}
