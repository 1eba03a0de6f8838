//! The simulated world: a fleet of real HSMs, their hosts (joining, as `bkv-node`
//! does), the network, the clients, and the driver that draws every step from the seed.

use crate::network::{FaultRates, Network, SimLink};
use crate::oracle::{BrokenMode, Oracle};
use crate::platform::SimPlatform;
use crate::report::{OpCounts, Report, Violation};
use crate::SimConfig;
use bkv_core::AccountId;
use bkv_hsm::{FleetHsm, HsmConfig, HsmError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};

/// HSM timing in the simulation (the node's defaults, scaled for simulated time).
fn hsm_config() -> HsmConfig {
    HsmConfig {
        login_deadline_ms: 10_000,
        max_pending_logins: 64,
        commit_timeout_ms: 3_000,
        quorum_freshness_ms: 1_500,
        member_silence_ms: 2_000,
        heartbeat_ms: 150,
        snapshot_every: 1_000_000,
    }
}

/// What the driver drew for one step. Always the same number of draws, whatever happens,
/// so that the schedule of step k depends on the seed and k only.
struct StepPlan {
    action: u32,
    victim: usize,
    member_seed: u64,
    isolate: usize,
    shuffle: u64,
    mid_delay: u64,
    mid_fault: u32,
    ops: Vec<OpPlan>,
    pause_ms: u64,
}

#[derive(Clone)]
pub(crate) struct OpPlan {
    pub(crate) kind: u32,
    pub(crate) account: usize,
    pub(crate) pin: u64,
    pub(crate) key: [u8; 32],
    pub(crate) seed: u64,
    pub(crate) abort: bool,
}

/// An acknowledged enrollment as its client remembers it: the PIN and the backup key.
type Enrolled = (Vec<u8>, [u8; 32]);

/// State shared between the driver and the tasks of a step.
pub(crate) struct Shared {
    pub(crate) net: Arc<Network>,
    pub(crate) epoch: Instant,
    pub(crate) dcs: Vec<String>,
    pub(crate) oracle: Mutex<Oracle>,
    pub(crate) violations: Mutex<Vec<String>>,
    pub(crate) joiners: Mutex<BTreeMap<String, JoinHandle<()>>>,
    pub(crate) crashed: Mutex<BTreeSet<String>>,
    pub(crate) ops: Mutex<OpCounts>,
    // Latest acknowledged (PIN, backup key) per account.
    pub(crate) enrolled: Mutex<BTreeMap<AccountId, Enrolled>>,
    pub(crate) broken: Option<BrokenMode>,
}

pub(crate) struct World {
    config: SimConfig,
    rng: StdRng,
    shared: Arc<Shared>,
    accounts: Vec<AccountId>,
    report: Report,
}

impl World {
    pub(crate) fn new(config: SimConfig) -> Self {
        let dcs = (1..=config.members).map(|i| format!("dc{i}")).collect();
        let accounts = (0..config.accounts)
            .map(|i| AccountId::new("sim", format!("user{i}")).expect("valid account"))
            .collect();
        let shared = Arc::new(Shared {
            net: Network::new(config.seed),
            epoch: Instant::now(),
            dcs,
            oracle: Mutex::new(Oracle::new(config.broken)),
            violations: Mutex::new(Vec::new()),
            joiners: Mutex::new(BTreeMap::new()),
            crashed: Mutex::new(BTreeSet::new()),
            ops: Mutex::new(OpCounts::default()),
            enrolled: Mutex::new(BTreeMap::new()),
            broken: config.broken,
        });
        Self {
            rng: StdRng::seed_from_u64(config.seed),
            report: Report {
                seed: config.seed,
                ..Report::default()
            },
            config,
            shared,
            accounts,
        }
    }

    pub(crate) async fn run(mut self) -> Report {
        let rates = self.draw_rates();
        if let Err(e) = self.boot().await {
            self.violation(0, format!("liveness: the fleet did not form: {e}"));
            return self.finish().await;
        }
        self.trace(format!(
            "boot: {} members; fault rates {rates:?}",
            self.config.members
        ));
        self.shared.net.set_rates(rates);
        for step in 1..=self.config.steps {
            let plan = self.draw_step();
            self.step(step, plan).await;
            self.report.steps = step;
            if !self.report.violations.is_empty() {
                break;
            }
        }
        if self.report.violations.is_empty() {
            self.settle().await;
        }
        self.finish().await
    }

    fn draw_rates(&mut self) -> FaultRates {
        let k = self.config.faults;
        let mut rate = |on: bool, max: f64| {
            let r = self.rng.gen_range(0.0..max);
            if on {
                r
            } else {
                0.0
            }
        };
        FaultRates {
            drop: rate(k.drops, 0.10),
            duplicate: rate(k.dups, 0.05),
            delay: rate(k.delays, 0.20),
            reorder: rate(k.reorders, 0.05),
            replay: rate(k.replays, 0.05),
        }
    }

    fn draw_step(&mut self) -> StepPlan {
        let n = self.config.members;
        let rng = &mut self.rng;
        let action = rng.gen_range(0..100);
        let victim = rng.gen_range(0..n);
        let member_seed = rng.gen();
        let isolate = rng.gen_range(1..n.max(2));
        let shuffle = rng.gen();
        let mid_delay = rng.gen_range(0..1_500);
        let mid_fault = rng.gen_range(0..100);
        let count = rng.gen_range(1..=3);
        let ops = (0..3)
            .map(|_| OpPlan {
                kind: rng.gen_range(0..100),
                account: rng.gen_range(0..self.config.accounts),
                pin: rng.gen(),
                key: rng.gen(),
                seed: rng.gen(),
                abort: rng.gen_bool(0.7),
            })
            .take(count)
            .collect();
        let pause_ms = rng.gen_range(0..800);
        StepPlan {
            action,
            victim,
            member_seed,
            isolate,
            shuffle,
            mid_delay,
            mid_fault,
            ops,
            pause_ms,
        }
    }

    fn trace(&mut self, line: String) {
        self.report.trace.push(line);
    }

    fn violation(&mut self, step: usize, what: String) {
        self.report.violations.push(Violation { step, what });
    }

    async fn boot(&mut self) -> Result<(), String> {
        let dcs = self.shared.dcs.clone();
        let founder = start_member(&self.shared, &dcs[0], self.rng.gen(), false).await?;
        founder
            .found(self.config.max_attempts)
            .await
            .map_err(|e| e.to_string())?;
        for dc in &dcs[1..] {
            start_member(&self.shared, dc, self.rng.gen(), true).await?;
        }
        wait_for(&self.shared, 60_000, all_voters).await;
        if all_voters(&self.shared) {
            Ok(())
        } else {
            Err("not every member became a voter within 60 s".into())
        }
    }

    async fn step(&mut self, step: usize, plan: StepPlan) {
        let faults = self.config.faults;
        let mut line = format!("step {step}:");
        let n = self.config.members;
        match plan.action {
            0..=7 if faults.partitions => {
                let isolated = pick(&self.shared.dcs, plan.isolate, plan.shuffle);
                line += &format!(" partition {isolated:?} from the rest;");
                self.shared.net.partition(&isolated);
            }
            8..=21 if faults.partitions && self.shared.net.partitioned() => {
                line += " heal;";
                self.shared.net.heal();
            }
            22..=31 if faults.crashes => {
                let dc = self.shared.dcs[plan.victim % n].clone();
                if crash(&self.shared, &dc).await {
                    line += &format!(" crash {dc};");
                }
            }
            32..=49 if faults.crashes => {
                let first = self
                    .shared
                    .crashed
                    .lock()
                    .expect("crashed")
                    .iter()
                    .next()
                    .cloned();
                if let Some(dc) = first {
                    line += &format!(" restart {dc} as a new member;");
                    if let Err(e) = start_member(&self.shared, &dc, plan.member_seed, true).await {
                        line += &format!(" (failed: {e})");
                    }
                }
            }
            _ => {}
        }
        // Faults during the operations.
        let chaos = {
            let shared = self.shared.clone();
            let dc = self.shared.dcs[(plan.victim + 1) % n].clone();
            let isolated = pick(&self.shared.dcs, plan.isolate, plan.shuffle ^ 1);
            let (delay, fault) = (plan.mid_delay, plan.mid_fault);
            tokio::spawn(async move {
                sleep(Duration::from_millis(delay)).await;
                if fault < 10 && faults.crashes {
                    if crash(&shared, &dc).await {
                        return format!(" crash {dc} during the operations;");
                    }
                } else if (10..18).contains(&fault) && faults.partitions {
                    shared.net.partition(&isolated);
                    return format!(" partition {isolated:?} during the operations;");
                }
                String::new()
            })
        };
        let mut tasks = Vec::new();
        let mut busy = BTreeSet::new();
        for op in plan.ops {
            // One operation per account at a time, as one device would do.
            if !busy.insert(op.account) {
                continue;
            }
            let account = self.accounts[op.account].clone();
            let shared = self.shared.clone();
            tasks.push(tokio::spawn(async move {
                let (what, result) = crate::ops::client_op(&shared, &account, &op).await;
                format!(" {what} {account} -> {result};")
            }));
        }
        for task in tasks {
            line += &task
                .await
                .unwrap_or_else(|e| format!(" (op panicked: {e})"));
        }
        line += &chaos.await.unwrap_or_default();
        sleep(Duration::from_millis(plan.pause_ms)).await;
        self.trace(line);
        self.check(step, false);
    }

    fn check(&mut self, step: usize, settled: bool) {
        let mut found = self.shared.net.take_violations();
        found.extend(std::mem::take(
            &mut *self.shared.violations.lock().expect("v"),
        ));
        {
            let mut oracle = self.shared.oracle.lock().expect("oracle");
            for (dc, hsm) in self.shared.net.members() {
                let node_id = hsm.attestation().node_id;
                let view = hsm.audit_view(oracle.cursor(node_id));
                found.extend(oracle.ingest(&dc, node_id, &view));
            }
            found.extend(oracle.check(step, settled));
            self.report.committed_entries = oracle.committed();
        }
        for what in found {
            self.violation(step, what);
        }
    }

    /// Heals everything, restarts every crashed member, waits for one converged fleet,
    /// then checks strictly.
    async fn settle(&mut self) {
        self.shared.net.heal();
        self.shared.net.set_rates(FaultRates::default());
        let crashed: Vec<String> = self
            .shared
            .crashed
            .lock()
            .expect("crashed")
            .iter()
            .cloned()
            .collect();
        for dc in crashed {
            let seed = self.rng.gen();
            if let Err(e) = start_member(&self.shared, &dc, seed, true).await {
                self.trace(format!("settle: restart {dc} failed: {e}"));
            }
        }
        wait_for(&self.shared, 120_000, converged).await;
        let step = self.report.steps;
        if !converged(&self.shared) {
            let view: Vec<String> = self
                .shared
                .net
                .members()
                .iter()
                .map(|(dc, m)| {
                    let s = m.status();
                    let voters = s.members.iter().filter(|v| v.voter).count();
                    format!(
                        "{dc}: {} term {} applied {} members {} voters {}",
                        s.role,
                        s.term,
                        s.applied_index,
                        s.members.len(),
                        voters
                    )
                })
                .collect();
            self.violation(
                step,
                format!(
                    "liveness: the healed fleet did not converge within 120 s [{}]",
                    view.join("; ")
                ),
            );
        }
        self.trace("settle: healed, restarted, converged".into());
        self.check(step, true);
    }

    async fn finish(mut self) -> Report {
        let joiners = std::mem::take(&mut *self.shared.joiners.lock().expect("joiners"));
        for (_, task) in joiners {
            task.abort();
        }
        for (_, hsm) in self.shared.net.members() {
            hsm.shutdown().await;
        }
        self.report.faults = self.shared.net.counts();
        self.report.ops = *self.shared.ops.lock().expect("ops");
        self.report
    }
}

/// `count` datacenters picked from `dcs` by `shuffle`.
fn pick(dcs: &[String], count: usize, shuffle: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(shuffle);
    let mut all = dcs.to_vec();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.gen_range(0..=i));
    }
    all.truncate(count);
    all.sort();
    all
}

/// Starts a fresh HSM in `dc` and, unless it founds the fleet, its host's join loop.
async fn start_member(
    shared: &Arc<Shared>,
    dc: &str,
    seed: u64,
    join: bool,
) -> Result<Arc<FleetHsm>, String> {
    let link = Arc::new(SimLink {
        network: shared.net.clone(),
        from: dc.to_string(),
        from_node: Mutex::new(0),
    });
    let platform = Arc::new(SimPlatform::new(seed, shared.epoch));
    let hsm = FleetHsm::start(platform, dc, hsm_config(), link.clone())
        .await
        .map_err(|e| e.to_string())?;
    *link.from_node.lock().expect("link") = hsm.attestation().node_id;
    shared.net.plug(dc, hsm.clone());
    if shared.crashed.lock().expect("crashed").remove(dc) {
        shared.net.count(|c| c.restarts += 1);
    }
    if join {
        let task = tokio::spawn(keep_membership(shared.clone(), hsm.clone(), dc.to_string()));
        if let Some(old) = shared
            .joiners
            .lock()
            .expect("joiners")
            .insert(dc.to_string(), task)
        {
            old.abort();
        }
    }
    Ok(hsm)
}

/// The host's join loop, as `bkv-node` runs it: ask every peer (the leader first, once
/// known) until this HSM votes. The untrusted host may also feed it stale join answers.
async fn keep_membership(shared: Arc<Shared>, hsm: Arc<FleetHsm>, dc: String) {
    let me = hsm.attestation().node_id;
    let mut hint: Option<String> = None;
    loop {
        if hsm.is_voter() {
            sleep(Duration::from_millis(1_000)).await;
            continue;
        }
        let mut order: Vec<String> = hint.iter().cloned().collect();
        order.extend(
            shared
                .dcs
                .iter()
                .filter(|d| **d != dc && Some(*d) != hint.as_ref())
                .cloned(),
        );
        let mut joined = false;
        for peer in order {
            if let Some(stale) = shared.net.stale_join_answer(&dc, &peer, me) {
                if hsm.accept_join_answer(&stale).is_ok() {
                    shared.net.violation(format!(
                        "join: member {me} in {dc} accepted a join answer sealed to another member"
                    ));
                }
            }
            match shared.net.join(&dc, &peer, &hsm.join_request()).await {
                Ok(answer) => {
                    shared.net.remember_join_answer(me, &answer);
                    if hsm.accept_join_answer(&answer).is_ok() {
                        hint = Some(peer);
                        joined = true;
                        break;
                    }
                }
                Err(HsmError::NotLeader {
                    leader_dc: Some(leader),
                }) => hint = Some(leader),
                Err(_) => {}
            }
        }
        sleep(Duration::from_millis(if joined { 3_000 } else { 500 })).await;
    }
}

/// Crashes the member of `dc` if the fleet can afford it: a majority of the slots must
/// stay served by live voters, or the fleet would lose committed records (DESIGN.md §4).
async fn crash(shared: &Arc<Shared>, dc: &str) -> bool {
    let n = shared.dcs.len();
    let tolerated = (n - 1) / 2;
    let members = shared.net.members();
    let live_voters = members.iter().filter(|(_, m)| m.is_voter()).count();
    let target_votes = members.iter().any(|(d, m)| d == dc && m.is_voter());
    let down_after = n - live_voters + usize::from(target_votes);
    if !members.iter().any(|(d, _)| d == dc) || down_after > tolerated {
        return false;
    }
    let Some(hsm) = shared.net.unplug(dc) else {
        return false;
    };
    if let Some(task) = shared.joiners.lock().expect("joiners").remove(dc) {
        task.abort();
    }
    shared
        .crashed
        .lock()
        .expect("crashed")
        .insert(dc.to_string());
    shared.net.count(|c| c.crashes += 1);
    hsm.shutdown().await;
    true
}

fn all_voters(shared: &Shared) -> bool {
    let members = shared.net.members();
    members.len() == shared.dcs.len() && members.iter().all(|(_, m)| m.is_voter())
}

/// Every slot served by a voter, one leader, every member applied as far as the leader.
fn converged(shared: &Shared) -> bool {
    if !all_voters(shared) {
        return false;
    }
    let statuses: Vec<_> = shared
        .net
        .members()
        .iter()
        .map(|(_, m)| m.status())
        .collect();
    let leaders: Vec<_> = statuses.iter().filter(|s| s.role == "leader").collect();
    let [leader] = leaders[..] else {
        return false;
    };
    statuses
        .iter()
        .all(|s| s.applied_index == leader.applied_index && s.members.len() == shared.dcs.len())
}

async fn wait_for(shared: &Shared, millis: u64, check: impl Fn(&Shared) -> bool) {
    let deadline = Instant::now() + Duration::from_millis(millis);
    while Instant::now() < deadline && !check(shared) {
        sleep(Duration::from_millis(100)).await;
    }
}
