//! Client operations as the SDK runs them: find the leader, retry what is retryable,
//! and count the outcome.

use crate::client::{self, OpResult};
use crate::oracle::BrokenMode;
use crate::world::{OpPlan, Shared};
use bkv_core::AccountId;
use bkv_hsm::{FleetHsm, HsmError};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::sleep;

/// The member that believes it leads in the highest term, as a frontend would find it.
fn leader(shared: &Shared) -> Option<Arc<FleetHsm>> {
    shared
        .net
        .members()
        .into_iter()
        .map(|(_, m)| (m.status(), m))
        .filter(|(s, _)| s.role == "leader")
        .max_by_key(|(s, _)| s.term)
        .map(|(_, m)| m)
}

fn retryable(result: &OpResult) -> bool {
    matches!(
        result,
        OpResult::Failed(
            HsmError::NotLeader { .. }
                | HsmError::Unavailable
                | HsmError::NotReady
                | HsmError::LoginUnknown
        )
    )
}

/// One client operation, retried against the leader a few times as the SDK does.
pub(crate) async fn client_op(
    shared: &Arc<Shared>,
    account: &AccountId,
    op: &OpPlan,
) -> (&'static str, String) {
    let mut rng = StdRng::seed_from_u64(op.seed);
    let enrolled = shared
        .enrolled
        .lock()
        .expect("enrolled")
        .get(account)
        .cloned();
    let what = match op.kind {
        0..=29 => "enroll",
        30..=59 if enrolled.is_some() => "recover",
        30..=94 => "guess",
        _ => "status",
    };
    let (what, result) = 'attempts: {
        let mut last = (what, OpResult::Failed(HsmError::Unavailable));
        for _ in 0..6 {
            let Some(hsm) = leader(shared) else {
                sleep(Duration::from_millis(400)).await;
                continue;
            };
            last = match op.kind {
                0..=29 => {
                    let pin = format!("pin-{}", op.pin).into_bytes();
                    let r = client::enroll(&hsm, &shared.oracle, &mut rng, account, &pin, &op.key)
                        .await;
                    if matches!(r, OpResult::Enrolled(_)) {
                        shared
                            .enrolled
                            .lock()
                            .expect("enrolled")
                            .insert(account.clone(), (pin, op.key));
                    }
                    ("enroll", r)
                }
                30..=59 if enrolled.is_some() => {
                    let (pin, key) = enrolled.clone().expect("checked");
                    let r = client::recover(
                        &hsm,
                        &shared.oracle,
                        &mut rng,
                        account,
                        &pin,
                        Some(key),
                        op.abort,
                        &shared.violations,
                    )
                    .await;
                    ("recover", r)
                }
                30..=94 => {
                    let pin = format!("wrong-{}", op.pin).into_bytes();
                    let r = client::recover(
                        &hsm,
                        &shared.oracle,
                        &mut rng,
                        account,
                        &pin,
                        None,
                        op.abort,
                        &shared.violations,
                    )
                    .await;
                    if r == OpResult::WrongGuess && shared.broken == Some(BrokenMode::HiddenReset) {
                        if let Some((pin, _)) = &enrolled {
                            client::hidden_login(&hsm, &mut rng, account, pin).await;
                        }
                    }
                    ("guess", r)
                }
                _ => {
                    let r = match hsm.record_status(account).await {
                        Ok(_) => OpResult::NotOpened,
                        Err(e) => OpResult::Failed(e),
                    };
                    ("status", r)
                }
            };
            if !retryable(&last.1) {
                break 'attempts last;
            }
            sleep(Duration::from_millis(400)).await;
        }
        last
    };
    {
        let mut ops = shared.ops.lock().expect("ops");
        match (&result, what) {
            (OpResult::Enrolled(_), _) => ops.enrolls += 1,
            (OpResult::Recovered, _) => ops.recoveries += 1,
            (OpResult::WrongGuess, _) => ops.wrong_guesses += 1,
            (OpResult::NotOpened, "status") => {}
            _ => ops.errors += 1,
        }
    }
    let shown = match &result {
        OpResult::Failed(e) => format!("error ({e})"),
        OpResult::Enrolled(_) => "enrolled".into(),
        OpResult::NotOpened if what == "status" => "ok".into(),
        other => format!("{other:?}").to_lowercase(),
    };
    (what, shown)
}
