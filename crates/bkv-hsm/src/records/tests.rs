use super::*;

fn alice() -> AccountId {
    AccountId::new("t", "alice").unwrap()
}

fn enrollment(tag: u8) -> Enrollment {
    Enrollment {
        registration: Zeroizing::new(vec![tag; 192]),
        wrapped_key: Zeroizing::new(vec![tag; 72]),
        ksf: KsfParams {
            memory_kib: 8,
            iterations: 1,
            parallelism: 1,
        },
        oprf_salt: [tag; 16],
    }
}

fn enroll(table: &mut RecordTable, tag: u8, max: u32) -> u64 {
    match table.apply(&Command::Enroll {
        account: alice(),
        enrollment: enrollment(tag),
        max_attempts: max,
    }) {
        Outcome::Enrolled {
            generation,
            attempts_left,
        } => {
            assert_eq!(attempts_left, max);
            generation
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn spend(table: &mut RecordTable, generation: u64) -> Outcome {
    table.apply(&Command::SpendGuess {
        account: alice(),
        generation,
    })
}

#[test]
fn never_enrolled_account_has_nothing_to_spend() {
    let mut table = RecordTable::new();
    assert_eq!(table.get(&alice()), RecordView::NotEnrolled);
    assert_eq!(spend(&mut table, 1), Outcome::NotEnrolled);
    assert_eq!(
        table.apply(&Command::ResetGuesses {
            account: alice(),
            generation: 1
        }),
        Outcome::NotEnrolled
    );
    assert_eq!(
        table.apply(&Command::Destroy {
            account: alice(),
            generation: 1
        }),
        Outcome::NotEnrolled
    );
    assert_eq!(table, RecordTable::new(), "refused commands change nothing");
}

#[test]
fn guesses_count_down_then_the_record_is_destroyed() {
    let mut table = RecordTable::new();
    let generation = enroll(&mut table, 1, 3);
    for left in [2, 1, 0] {
        assert_eq!(
            spend(&mut table, generation),
            Outcome::GuessSpent {
                attempts_left: left
            }
        );
    }
    // No guesses left: the next attempt destroys instead of spending.
    assert_eq!(spend(&mut table, generation), Outcome::Destroyed);
    assert_eq!(table.get(&alice()), RecordView::Destroyed);
    assert_eq!(table.active_records(), 0);
}

#[test]
fn destroy_is_refused_while_guesses_are_left() {
    // A Destroy decided when the budget was 0 must not land after a correct PIN reset it.
    let mut table = RecordTable::new();
    let generation = enroll(&mut table, 1, 1);
    spend(&mut table, generation);
    table.apply(&Command::ResetGuesses {
        account: alice(),
        generation,
    });
    assert_eq!(
        table.apply(&Command::Destroy {
            account: alice(),
            generation
        }),
        Outcome::GuessesLeft { attempts_left: 1 }
    );
    assert!(matches!(table.get(&alice()), RecordView::Active(_)));
}

#[test]
fn destroyed_record_never_comes_back() {
    let mut table = RecordTable::new();
    let generation = enroll(&mut table, 1, 1);
    spend(&mut table, generation);
    assert_eq!(
        table.apply(&Command::Destroy {
            account: alice(),
            generation
        }),
        Outcome::Destroyed
    );
    for command in [
        Command::SpendGuess {
            account: alice(),
            generation,
        },
        Command::ResetGuesses {
            account: alice(),
            generation,
        },
        Command::Destroy {
            account: alice(),
            generation,
        },
    ] {
        assert_eq!(table.apply(&command), Outcome::AlreadyDestroyed);
        assert_eq!(table.get(&alice()), RecordView::Destroyed);
    }
}

#[test]
fn correct_pin_restores_the_full_budget() {
    let mut table = RecordTable::new();
    let generation = enroll(&mut table, 1, 10);
    spend(&mut table, generation);
    spend(&mut table, generation);
    assert_eq!(
        table.apply(&Command::ResetGuesses {
            account: alice(),
            generation
        }),
        Outcome::GuessesReset { attempts_left: 10 }
    );
}

#[test]
fn reset_at_zero_attempts_restores_budget() {
    // The last guess was the right PIN: KE3 arrives while attempts_left is 0.
    let mut table = RecordTable::new();
    let generation = enroll(&mut table, 1, 1);
    assert_eq!(
        spend(&mut table, generation),
        Outcome::GuessSpent { attempts_left: 0 }
    );
    assert_eq!(
        table.apply(&Command::ResetGuesses {
            account: alice(),
            generation
        }),
        Outcome::GuessesReset { attempts_left: 1 }
    );
}

#[test]
fn re_enrollment_replaces_the_record_and_restores_the_budget() {
    let mut table = RecordTable::new();
    let first = enroll(&mut table, 1, 10);
    spend(&mut table, first);
    let second = enroll(&mut table, 2, 10);
    assert!(second > first);
    match table.get(&alice()) {
        RecordView::Active(r) => {
            assert_eq!(r.attempts_left, 10);
            assert_eq!(r.enrollment, enrollment(2));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn commands_for_a_replaced_enrollment_are_stale() {
    let mut table = RecordTable::new();
    let first = enroll(&mut table, 1, 10);
    let second = enroll(&mut table, 2, 10);
    let before = table.clone();
    assert_eq!(spend(&mut table, first), Outcome::StaleGeneration);
    assert_eq!(
        table.apply(&Command::ResetGuesses {
            account: alice(),
            generation: first
        }),
        Outcome::StaleGeneration
    );
    assert_eq!(
        table.apply(&Command::Destroy {
            account: alice(),
            generation: first
        }),
        Outcome::StaleGeneration
    );
    assert_eq!(table, before);
    assert_eq!(
        spend(&mut table, second),
        Outcome::GuessSpent { attempts_left: 9 }
    );
}

#[test]
fn enrolling_after_destruction_starts_a_new_generation() {
    let mut table = RecordTable::new();
    let first = enroll(&mut table, 1, 1);
    table.apply(&Command::Destroy {
        account: alice(),
        generation: first,
    });
    let second = enroll(&mut table, 2, 5);
    assert!(second > first);
    // The old generation's commands cannot touch the new record.
    assert_eq!(spend(&mut table, first), Outcome::StaleGeneration);
}

#[test]
fn zero_budget_enrollment_is_destroyed_by_its_first_guess() {
    let mut table = RecordTable::new();
    let generation = enroll(&mut table, 1, 0);
    assert_eq!(spend(&mut table, generation), Outcome::Destroyed);
}

#[test]
fn accounts_are_independent() {
    let mut table = RecordTable::new();
    let generation = enroll(&mut table, 1, 2);
    let bob = AccountId::new("t", "bob").unwrap();
    assert_eq!(
        table.apply(&Command::SpendGuess {
            account: bob.clone(),
            generation
        }),
        Outcome::NotEnrolled
    );
    assert_eq!(table.get(&bob), RecordView::NotEnrolled);
    assert_eq!(
        spend(&mut table, generation),
        Outcome::GuessSpent { attempts_left: 1 }
    );
}

#[test]
fn debug_output_redacts_secrets() {
    let text = format!("{:?}", enrollment(0xAB));
    assert!(text.contains("(redacted)"));
    assert!(!text.contains("171"), "raw bytes must not appear: {text}");
}

#[test]
fn retire_destroys_only_the_enrollment_it_names() {
    let mut table = RecordTable::default();
    let first = enroll(&mut table, 1, 3);
    let second = enroll(&mut table, 2, 3);
    let retire = |g| Command::Retire {
        account: alice(),
        generation: g,
    };
    // A ticket from the replaced enrollment changes nothing.
    assert_eq!(table.apply(&retire(first)), Outcome::StaleGeneration);
    assert!(matches!(table.get(&alice()), RecordView::Active(_)));
    // The live one is retired whatever its budget, and stays gone.
    assert_eq!(table.apply(&retire(second)), Outcome::Retired);
    assert_eq!(table.get(&alice()), RecordView::Destroyed);
    assert_eq!(table.apply(&retire(second)), Outcome::AlreadyDestroyed);
    // A later enrollment gets a newer generation, so old tickets cannot reach it.
    let third = enroll(&mut table, 3, 3);
    assert!(third > second);
    assert_eq!(table.apply(&retire(second)), Outcome::StaleGeneration);
}

fn user(n: u32) -> AccountId {
    AccountId::new("t", format!("user{n}")).unwrap()
}

fn enroll_many(table: &mut RecordTable, users: u32) {
    for n in 0..users {
        table.apply(&Command::Enroll {
            account: user(n),
            enrollment: enrollment(n as u8),
            max_attempts: 5,
        });
    }
}

#[test]
fn a_copy_keeps_the_table_as_it_was_while_the_original_changes() {
    let mut table = RecordTable::new();
    enroll_many(&mut table, 3_000);
    let frozen = table.clone();
    let before = postcard::to_allocvec(&frozen).unwrap();
    for n in 0..3_000 {
        table.apply(&Command::SpendGuess {
            account: user(n),
            generation: 1,
        });
    }
    table.apply(&Command::Retire {
        account: user(7),
        generation: 1,
    });
    table.apply(&Command::Enroll {
        account: user(3_000),
        enrollment: enrollment(1),
        max_attempts: 5,
    });
    assert_eq!((frozen.len(), table.len()), (3_000, 3_001));
    assert_eq!(postcard::to_allocvec(&frozen).unwrap(), before);
    let RecordView::Active(record) = frozen.get(&user(7)) else {
        panic!("the copy lost a record")
    };
    assert_eq!(record.attempts_left, 5);
    assert_eq!(table.get(&user(7)), RecordView::Destroyed);
    let RecordView::Active(record) = table.get(&user(8)) else {
        panic!("the original lost a record")
    };
    assert_eq!(record.attempts_left, 4);
}

#[test]
fn a_table_survives_its_wire_form_and_refuses_an_account_twice() {
    let mut table = RecordTable::new();
    enroll_many(&mut table, 2_000);
    spend(&mut table, 1);
    let bytes = postcard::to_allocvec(&table).unwrap();
    let back: RecordTable = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, table);
    assert_eq!(back.active_records(), 2_000);
    assert_eq!(back.len(), 2_000);

    // The same entry written twice in one map.
    let mut one = RecordTable::new();
    enroll(&mut one, 1, 3);
    let (account, slot) = one.slots().next().unwrap();
    let entry = postcard::to_allocvec(&(account, slot)).unwrap();
    let once = [&[1u8][..], &entry].concat();
    assert_eq!(postcard::from_bytes::<RecordTable>(&once).unwrap(), one);
    let twice = [&[2u8][..], &entry, &entry].concat();
    assert!(postcard::from_bytes::<RecordTable>(&twice).is_err());
}
