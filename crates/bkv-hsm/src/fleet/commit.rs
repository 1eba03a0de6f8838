//! The leader's way into Raft. Every state change passes here: the leader checks that it
//! leads with a fresh majority, then commits. Record commands are group-committed: while
//! a batch is being committed, the commands that arrive wait and then go together as one
//! Raft entry, so a busy fleet replicates, stores and applies one entry for many guesses.
//! Each command keeps its own outcome, and a caller learns it only once the whole entry is
//! committed and applied, so a guess is still committed before its KE2 can leave.

use super::state::{FleetCommand, FleetOutcome};
use super::{Shared, TypeConfig};
use crate::error::HsmError;
use crate::records::{Command, Outcome};
use openraft::{Raft, ServerState};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Most record commands in one Raft entry (an enrollment is a few hundred bytes).
pub(super) const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<Outcome, HsmError>>;

#[derive(Default)]
struct Queue {
    waiting: Vec<(Command, Reply)>,
    // One batch at a time: with openraft 0.9 replicating one message per follower at a
    // time, a second batch in flight would only wait in the log (docs/performance.md).
    proposing: bool,
}

/// Checks leadership and commits, batching record commands.
#[derive(Clone)]
pub(super) struct Committer {
    raft: Raft<TypeConfig>,
    shared: Arc<Shared>,
    commit_timeout: Duration,
    quorum_freshness_ms: u64,
    queue: Arc<Mutex<Queue>>,
}

impl Committer {
    pub(super) fn new(
        raft: Raft<TypeConfig>,
        shared: Arc<Shared>,
        config: &super::HsmConfig,
    ) -> Self {
        Self {
            raft,
            shared,
            commit_timeout: Duration::from_millis(config.commit_timeout_ms),
            quorum_freshness_ms: config.quorum_freshness_ms,
            queue: Arc::default(),
        }
    }

    /// The datacenter of node `leader`, as this member's membership names it.
    pub(super) fn leader_dc(&self, leader: Option<u64>) -> Option<String> {
        let leader = leader?;
        self.shared
            .machine()
            .last_membership
            .membership()
            .get_node(&leader)
            .map(|n| n.dc.clone())
    }

    /// Refuses unless this member leads and heard from a majority recently.
    pub(super) fn check_leader(&self) -> Result<(), HsmError> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return Err(HsmError::NotLeader {
                leader_dc: self.leader_dc(metrics.current_leader),
            });
        }
        match metrics.millis_since_quorum_ack {
            Some(ms) if ms <= self.quorum_freshness_ms => Ok(()),
            _ => Err(HsmError::Unavailable),
        }
    }

    /// Commits `command` through the fleet's majority, alone in its entry.
    pub(super) async fn commit(&self, command: FleetCommand) -> Result<FleetOutcome, HsmError> {
        self.check_leader()?;
        let write =
            tokio::time::timeout(self.commit_timeout, self.raft.client_write(command)).await;
        match write {
            Ok(Ok(response)) => Ok(response.data),
            Ok(Err(openraft::error::RaftError::APIError(
                openraft::error::ClientWriteError::ForwardToLeader(f),
            ))) => Err(HsmError::NotLeader {
                leader_dc: f.leader_node.map(|n| n.dc),
            }),
            _ => Err(HsmError::Unavailable),
        }
    }

    /// Commits one record command, in a batch with whatever else is waiting, and returns
    /// its own outcome once the batch is committed and applied.
    pub(super) async fn commit_record(&self, command: Command) -> Result<Outcome, HsmError> {
        self.check_leader()?;
        let (reply, answer) = oneshot::channel();
        let start_proposer = {
            let mut queue = self.queue.lock().expect("commit queue lock");
            queue.waiting.push((command, reply));
            !std::mem::replace(&mut queue.proposing, true)
        };
        if start_proposer {
            // Its own task: a caller that goes away must not strand the others' commands.
            tokio::spawn(self.clone().propose());
        }
        answer.await.map_err(|_| HsmError::Unavailable)?
    }

    /// Commits batches until nothing waits.
    async fn propose(self) {
        loop {
            let batch: Vec<(Command, Reply)> = {
                let mut queue = self.queue.lock().expect("commit queue lock");
                if queue.waiting.is_empty() {
                    queue.proposing = false;
                    return;
                }
                let take = queue.waiting.len().min(MAX_BATCH);
                queue.waiting.drain(..take).collect()
            };
            let (commands, replies): (Vec<Command>, Vec<Reply>) = batch.into_iter().unzip();
            let count = commands.len();
            match self.commit(FleetCommand::Records(commands)).await {
                Ok(FleetOutcome::Records(outcomes)) if outcomes.len() == count => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Ok(_) => {
                    for reply in replies {
                        let _ = reply.send(Err(HsmError::NotReady));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}
