//! The simulated network between the HSMs of a fleet: the untrusted host's side, which
//! may drop, duplicate, delay, reorder and replay sealed peer messages, and cut the
//! fleet into partitions. Every decision comes from a per-link RNG seeded by the run's
//! seed. It also checks the one thing the channels promise on their own: the very same
//! sealed bytes are never accepted twice by the same HSM.

use crate::report::FaultCounts;
use bkv_hsm::fleet::BoxFuture;
use bkv_hsm::{FleetHsm, HsmError, PeerTransport, TransportError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Per-message fault probabilities, drawn once per run from its seed.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultRates {
    /// A request or its answer is lost.
    pub drop: f64,
    /// A request is delivered twice.
    pub duplicate: f64,
    /// A message waits 20–300 ms.
    pub delay: f64,
    /// A message is held 100–600 ms so that later ones overtake it.
    pub reorder: f64,
    /// An old message (or an old answer) is delivered again.
    pub replay: f64,
}

/// How many old messages are kept for replays.
const REPLAY_MEMORY: usize = 256;

struct NetState {
    seed: u64,
    members: BTreeMap<String, Arc<FleetHsm>>,
    // Partition side of each datacenter; members on different sides cannot talk.
    sides: BTreeMap<String, u8>,
    rates: FaultRates,
    links: BTreeMap<(String, String), Link>,
    recent: VecDeque<(String, Vec<u8>)>,
    recent_answers: BTreeMap<String, Vec<u8>>,
    accepted: HashSet<(u64, [u8; 32])>,
    join_answers: VecDeque<(u64, Vec<u8>)>,
    counts: FaultCounts,
    violations: Vec<String>,
}

struct Link {
    rng: StdRng,
    next_seq: u64,
    max_delivered: u64,
}

/// What the network decided for one message.
struct Plan {
    seq: u64,
    delay_ms: u64,
    drop_request: bool,
    drop_answer: bool,
    duplicate: bool,
    replay_old: Option<(String, Vec<u8>)>,
    replay_answer: Option<Vec<u8>>,
}

/// The simulated network shared by every member of a run.
pub struct Network {
    state: Mutex<NetState>,
}

impl Network {
    /// An empty, fully connected network with no faults.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(NetState {
                seed,
                members: BTreeMap::new(),
                sides: BTreeMap::new(),
                rates: FaultRates::default(),
                links: BTreeMap::new(),
                recent: VecDeque::new(),
                recent_answers: BTreeMap::new(),
                accepted: HashSet::new(),
                join_answers: VecDeque::new(),
                counts: FaultCounts::default(),
                violations: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().expect("network lock")
    }

    /// Sets the per-message fault rates.
    pub fn set_rates(&self, rates: FaultRates) {
        self.lock().rates = rates;
    }

    /// Plugs a live member into datacenter `dc`.
    pub fn plug(&self, dc: &str, hsm: Arc<FleetHsm>) {
        self.lock().members.insert(dc.to_string(), hsm);
    }

    /// Unplugs datacenter `dc` (its member crashed).
    pub fn unplug(&self, dc: &str) -> Option<Arc<FleetHsm>> {
        self.lock().members.remove(dc)
    }

    /// The live member of `dc`.
    pub fn member(&self, dc: &str) -> Option<Arc<FleetHsm>> {
        self.lock().members.get(dc).cloned()
    }

    /// Every live member, by datacenter.
    pub fn members(&self) -> Vec<(String, Arc<FleetHsm>)> {
        let state = self.lock();
        state
            .members
            .iter()
            .map(|(dc, m)| (dc.clone(), m.clone()))
            .collect()
    }

    /// Cuts the fleet in two: `isolated` on one side, everyone else on the other.
    pub fn partition(&self, isolated: &[String]) {
        let mut state = self.lock();
        state.sides = isolated.iter().map(|dc| (dc.clone(), 1)).collect();
        state.counts.partitions += 1;
    }

    /// Heals every partition.
    pub fn heal(&self) {
        let mut state = self.lock();
        if !state.sides.is_empty() {
            state.sides.clear();
            state.counts.heals += 1;
        }
    }

    /// Whether the fleet is cut.
    pub fn partitioned(&self) -> bool {
        !self.lock().sides.is_empty()
    }

    /// Counts a crash or a restart.
    pub fn count(&self, f: impl FnOnce(&mut FaultCounts)) {
        f(&mut self.lock().counts)
    }

    /// Faults injected so far.
    pub fn counts(&self) -> FaultCounts {
        self.lock().counts
    }

    /// Violations the network saw (a replayed message accepted).
    pub fn take_violations(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().violations)
    }

    fn connected(&self, a: &str, b: &str) -> bool {
        let state = self.lock();
        state.sides.get(a).copied().unwrap_or(0) == state.sides.get(b).copied().unwrap_or(0)
    }

    fn plan(&self, from: &str, to: &str) -> Plan {
        let mut state = self.lock();
        let rates = state.rates;
        let seed = state.seed;
        let key = (from.to_string(), to.to_string());
        let link = state.links.entry(key).or_insert_with(|| {
            let mut h = Sha256::new();
            h.update(seed.to_be_bytes());
            h.update(from.as_bytes());
            h.update([0]);
            h.update(to.as_bytes());
            let d: [u8; 32] = h.finalize().into();
            Link {
                rng: StdRng::from_seed(d),
                next_seq: 0,
                max_delivered: 0,
            }
        });
        link.next_seq += 1;
        let seq = link.next_seq;
        let rng = &mut link.rng;
        let mut delay_ms = rng.gen_range(0..5);
        let delayed = rng.gen_bool(rates.delay);
        let reordered = rng.gen_bool(rates.reorder);
        let drop_request = rng.gen_bool(rates.drop / 2.0);
        let drop_answer = rng.gen_bool(rates.drop / 2.0);
        let duplicate = rng.gen_bool(rates.duplicate);
        let replay = rng.gen_bool(rates.replay);
        let replay_answer = rng.gen_bool(rates.replay / 2.0);
        let pick: usize = rng.gen();
        if delayed {
            delay_ms += rng.gen_range(20..300);
        }
        if reordered {
            delay_ms += rng.gen_range(100..600);
        }
        let replay_old = (replay && !state.recent.is_empty())
            .then(|| state.recent[pick % state.recent.len()].clone());
        let replay_answer = if replay_answer {
            state.recent_answers.get(to).cloned()
        } else {
            None
        };
        let c = &mut state.counts;
        c.delays += u64::from(delayed);
        c.drops += u64::from(drop_request) + u64::from(drop_answer && !drop_request);
        c.dups += u64::from(duplicate && !drop_request);
        c.replays += u64::from(replay_old.is_some()) + u64::from(replay_answer.is_some());
        Plan {
            seq,
            delay_ms,
            drop_request,
            drop_answer,
            duplicate,
            replay_old,
            replay_answer,
        }
    }

    /// Delivers `message` to the member of `dc`, checking that identical bytes are never
    /// accepted twice by one HSM.
    async fn deliver(&self, dc: &str, message: &[u8]) -> Result<Vec<u8>, TransportError> {
        let member = self
            .member(dc)
            .ok_or_else(|| TransportError("down".into()))?;
        let node_id = member.attestation().node_id;
        let digest: [u8; 32] = Sha256::digest(message).into();
        let answer = member.handle_peer(message).await;
        let mut state = self.lock();
        if answer.is_ok() && !state.accepted.insert((node_id, digest)) {
            state.violations.push(format!(
                "channel: member {node_id} in {dc} accepted the same sealed message twice"
            ));
        }
        if let Ok(answer) = &answer {
            state.recent_answers.insert(dc.to_string(), answer.clone());
        }
        answer.map_err(|e| TransportError(e.to_string()))
    }

    fn remember(&self, dc: &str, message: &[u8]) {
        let mut state = self.lock();
        if state.recent.len() == REPLAY_MEMORY {
            state.recent.pop_front();
        }
        state.recent.push_back((dc.to_string(), message.to_vec()));
    }

    fn delivered(&self, from: &str, to: &str, seq: u64) {
        let mut state = self.lock();
        let key = (from.to_string(), to.to_string());
        let mut overtaken = false;
        if let Some(link) = state.links.get_mut(&key) {
            overtaken = seq < link.max_delivered;
            link.max_delivered = link.max_delivered.max(seq);
        }
        if overtaken {
            state.counts.reorders += 1;
        }
    }

    /// One peer call from `from` to `to`, with every fault the plan says.
    async fn call(
        self: Arc<Self>,
        from: String,
        from_node: u64,
        to: String,
        message: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        let plan = self.plan(&from, &to);
        tokio::time::sleep(Duration::from_millis(plan.delay_ms)).await;
        // A crashed HSM sends nothing, even from tasks that outlived it.
        let sender_alive = self
            .member(&from)
            .is_some_and(|m| m.attestation().node_id == from_node);
        if !sender_alive || !self.connected(&from, &to) {
            return Err(TransportError("unreachable".into()));
        }
        if plan.drop_request {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Err(TransportError("dropped".into()));
        }
        if let Some((old_dc, old)) = &plan.replay_old {
            if self.connected(&from, old_dc) {
                let _ = self.deliver(old_dc, old).await;
            }
        }
        self.remember(&to, &message);
        self.delivered(&from, &to, plan.seq);
        let answer = self.deliver(&to, &message).await;
        if plan.duplicate {
            let _ = self.deliver(&to, &message).await;
        }
        if plan.drop_answer || !self.connected(&from, &to) {
            return Err(TransportError("answer lost".into()));
        }
        match plan.replay_answer {
            Some(old) if answer.is_ok() => Ok(old),
            _ => answer,
        }
    }

    /// A join request from `from` to the member of `to`, as the host carries it.
    pub async fn join(&self, from: &str, to: &str, request: &[u8]) -> Result<Vec<u8>, HsmError> {
        if !self.connected(from, to) {
            return Err(HsmError::Unavailable);
        }
        let member = self.member(to).ok_or(HsmError::Unavailable)?;
        member.handle_join(request).await
    }

    /// Remembers a join answer (the host sees them all) for later replays.
    pub fn remember_join_answer(&self, node_id: u64, answer: &[u8]) {
        let mut state = self.lock();
        if state.join_answers.len() == 16 {
            state.join_answers.pop_front();
        }
        state.join_answers.push_back((node_id, answer.to_vec()));
    }

    /// An old join answer meant for another member, if the plan for this link says replay.
    pub fn stale_join_answer(&self, from: &str, to: &str, node_id: u64) -> Option<Vec<u8>> {
        let replay = {
            let mut state = self.lock();
            let rate = state.rates.replay;
            let key = (from.to_string(), to.to_string());
            state
                .links
                .get_mut(&key)
                .is_some_and(|l| l.rng.gen_bool(rate))
        };
        if !replay {
            return None;
        }
        let mut state = self.lock();
        let old = state
            .join_answers
            .iter()
            .rev()
            .find(|(id, _)| *id != node_id)
            .map(|(_, a)| a.clone())?;
        state.counts.replays += 1;
        Some(old)
    }

    /// Records a violation seen by the harness around the network.
    pub fn violation(&self, what: String) {
        self.lock().violations.push(what);
    }
}

/// One member's outlet to the network: knows who sends, as a real host does.
pub struct SimLink {
    /// The network.
    pub network: Arc<Network>,
    /// The sender's datacenter.
    pub from: String,
    /// The sender's node id (set once its HSM exists).
    pub from_node: Mutex<u64>,
}

impl PeerTransport for SimLink {
    fn call(&self, dc: &str, message: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        let from_node = *self.from_node.lock().expect("link lock");
        let network = self.network.clone();
        Box::pin(network.call(self.from.clone(), from_node, dc.to_string(), message))
    }
}
