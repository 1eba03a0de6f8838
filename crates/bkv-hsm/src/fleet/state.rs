//! The replicated state of a fleet: its genesis, its members' admissions, and the record
//! table. A pure `apply(command) -> outcome`, like [`RecordTable`] which it wraps; Raft
//! feeds it the same commands in the same order on every member.

use crate::channel::{Attestation, SealedSecret};
use crate::records::{Command, Outcome, RecordTable};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a fleet is, fixed at its creation inside the founding HSM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    /// Random id every peer message is bound to.
    pub fleet_id: [u8; 32],
    /// The fleet's OPAQUE public key, which clients pin.
    pub fleet_key: [u8; 32],
    /// Guesses per record.
    pub max_attempts: u32,
    /// Code measurements allowed to join.
    pub approved_measurements: Vec<[u8; 32]>,
    /// The founding HSM's attestation.
    pub founder: Attestation,
    /// The founding HSM's platform signature over the ceremony
    /// ([`crate::evidence::ceremony_statement`]).
    pub ceremony_signature: Vec<u8>,
}

/// A member's admission: its attestation and the fleet secret sealed to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// The member's attestation, checked by the leader that admitted it.
    pub attestation: Attestation,
    /// The fleet's secrets, sealed to the member's identity key (none for the founder).
    pub sealed_secret: Option<SealedSecret>,
}

/// A change to the fleet's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FleetCommand {
    /// Create the fleet. Accepted once.
    Found(Genesis),
    /// Admit a member (before it joins the Raft membership).
    Admit(Admission),
    /// Change the record table: the commands in order, each with its own outcome. The
    /// leader batches what arrives while a commit is under way into one entry.
    Records(Vec<Command>),
}

/// The result of a [`FleetCommand`] (or of a Raft entry that carries none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FleetOutcome {
    /// Raft's own entries (blank, membership).
    None,
    /// The fleet exists now.
    Founded,
    /// The member is admitted.
    Admitted,
    /// The command was refused; nothing changed.
    Refused(String),
    /// The record table's answers, one per command, in order.
    Records(Vec<Outcome>),
}

/// Everything a fleet replicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetState {
    /// Set by the first `Found`.
    pub genesis: Option<Genesis>,
    /// Admissions by node id.
    pub admissions: BTreeMap<u64, Admission>,
    /// The records.
    pub table: RecordTable,
}

impl FleetState {
    /// Applies one command. Deterministic.
    pub fn apply(&mut self, command: &FleetCommand) -> FleetOutcome {
        match command {
            FleetCommand::Found(genesis) => {
                if self.genesis.is_some() {
                    return FleetOutcome::Refused("the fleet is already founded".into());
                }
                self.admissions.insert(
                    genesis.founder.node_id,
                    Admission {
                        attestation: genesis.founder.clone(),
                        sealed_secret: None,
                    },
                );
                self.genesis = Some(genesis.clone());
                FleetOutcome::Founded
            }
            FleetCommand::Admit(admission) => {
                let Some(genesis) = &self.genesis else {
                    return FleetOutcome::Refused("the fleet is not founded".into());
                };
                if !genesis
                    .approved_measurements
                    .contains(&admission.attestation.measurement)
                {
                    return FleetOutcome::Refused("code measurement not approved".into());
                }
                self.admissions
                    .insert(admission.attestation.node_id, admission.clone());
                FleetOutcome::Admitted
            }
            FleetCommand::Records(commands) => {
                if self.genesis.is_none() {
                    return FleetOutcome::Refused("the fleet is not founded".into());
                }
                FleetOutcome::Records(commands.iter().map(|c| self.table.apply(c)).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bkv_core::AccountId;

    fn attestation(node_id: u64, measurement: [u8; 32]) -> Attestation {
        Attestation {
            dc: "dc1".into(),
            node_id,
            channel_key: [node_id as u8; 32],
            measurement,
            root: [0; 32],
            signature: vec![],
        }
    }

    fn genesis() -> Genesis {
        Genesis {
            fleet_id: [1; 32],
            fleet_key: [2; 32],
            max_attempts: 10,
            approved_measurements: vec![[3; 32]],
            founder: attestation(1, [3; 32]),
            ceremony_signature: vec![],
        }
    }

    #[test]
    fn nothing_happens_before_founding() {
        let mut state = FleetState::default();
        let spend = FleetCommand::Records(vec![Command::SpendGuess {
            account: AccountId::new("t", "u").unwrap(),
            generation: 1,
        }]);
        assert!(matches!(state.apply(&spend), FleetOutcome::Refused(_)));
        let admit = FleetCommand::Admit(Admission {
            attestation: attestation(2, [3; 32]),
            sealed_secret: None,
        });
        assert!(matches!(state.apply(&admit), FleetOutcome::Refused(_)));
        assert_eq!(state, FleetState::default());
    }

    #[test]
    fn a_fleet_is_founded_once() {
        let mut state = FleetState::default();
        assert_eq!(
            state.apply(&FleetCommand::Found(genesis())),
            FleetOutcome::Founded
        );
        let mut other = genesis();
        other.fleet_key = [9; 32];
        assert!(matches!(
            state.apply(&FleetCommand::Found(other)),
            FleetOutcome::Refused(_)
        ));
        assert_eq!(state.genesis.unwrap().fleet_key, [2; 32]);
    }

    #[test]
    fn only_approved_code_is_admitted() {
        let mut state = FleetState::default();
        state.apply(&FleetCommand::Found(genesis()));
        let rogue = FleetCommand::Admit(Admission {
            attestation: attestation(2, [4; 32]),
            sealed_secret: None,
        });
        assert!(matches!(state.apply(&rogue), FleetOutcome::Refused(_)));
        assert!(!state.admissions.contains_key(&2));
        let good = FleetCommand::Admit(Admission {
            attestation: attestation(3, [3; 32]),
            sealed_secret: None,
        });
        assert_eq!(state.apply(&good), FleetOutcome::Admitted);
        assert!(state.admissions.contains_key(&3));
    }
}
