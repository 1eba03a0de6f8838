//! Real OPAQUE clients (opaque-ke, low Argon2id cost) driving the real HSM calls, and
//! reporting to the oracle every guess they could test.

use crate::oracle::Oracle;
use bkv_core::seal::{self, release_context, LABEL_BACKUP_KEY_WRAP, LABEL_KEY_RELEASE};
use bkv_core::{AccountId, KsfParams, Suite};
use bkv_hsm::{FleetHsm, HsmError};
use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialResponse, Identifiers, RegistrationResponse,
};
use rand::rngs::StdRng;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};

/// The cheap Argon2id cost the simulated clients use.
pub const KSF: KsfParams = KsfParams {
    memory_kib: 8,
    iterations: 1,
    parallelism: 1,
};

fn argon() -> argon2::Argon2<'static> {
    KSF.argon2().expect("a valid test cost")
}

/// What one client operation ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum OpResult {
    /// Enrolled; the SHA-256 of the wrapped key names the enrollment.
    Enrolled([u8; 32]),
    /// The backup key came back (and matched).
    Recovered,
    /// A wrong PIN got a KE2: one guess tested.
    WrongGuess,
    /// The right PIN got a KE2 that did not open (the record was replaced meanwhile).
    NotOpened,
    /// The HSM refused.
    Failed(HsmError),
}

/// Enrolls `account` with `pin`, wrapping `backup_key`.
pub async fn enroll(
    hsm: &FleetHsm,
    oracle: &Mutex<Oracle>,
    rng: &mut StdRng,
    account: &AccountId,
    pin: &[u8],
    backup_key: &[u8; 32],
) -> OpResult {
    let start = ClientRegistration::<Suite>::start(rng, pin).expect("registration start");
    let started = match hsm.enroll_start(account, &start.message.serialize()).await {
        Ok(s) => s,
        Err(e) => return OpResult::Failed(e),
    };
    let response = RegistrationResponse::deserialize(&started.registration_response)
        .expect("the HSM sends a valid registration response");
    let ksf = argon();
    let finish = start
        .state
        .finish(
            rng,
            pin,
            response,
            ClientRegistrationFinishParameters::new(Identifiers::default(), Some(&ksf)),
        )
        .expect("registration finish");
    let wrapped = seal::seal(
        rng,
        LABEL_BACKUP_KEY_WRAP,
        &finish.export_key,
        &account.credential_identifier(),
        backup_key,
    );
    let digest: [u8; 32] = Sha256::digest(&wrapped).into();
    oracle.lock().expect("oracle").enroll_called(account);
    match hsm
        .enroll_finish(
            account,
            &started.registration_id,
            &finish.message.serialize(),
            &wrapped,
            KSF,
        )
        .await
    {
        Ok(_) => {
            oracle.lock().expect("oracle").enroll_acked(account, digest);
            OpResult::Enrolled(digest)
        }
        Err(e) => OpResult::Failed(e),
    }
}

/// Tries `pin` for `account`; with `expect` the backup key it should release. A client
/// that cannot open KE2 aborts the login when `abort` says so, or walks away.
#[allow(clippy::too_many_arguments)]
pub async fn recover(
    hsm: &Arc<FleetHsm>,
    oracle: &Mutex<Oracle>,
    rng: &mut StdRng,
    account: &AccountId,
    pin: &[u8],
    expect: Option<[u8; 32]>,
    abort: bool,
    violations: &Mutex<Vec<String>>,
) -> OpResult {
    let start = ClientLogin::<Suite>::start(rng, pin).expect("login start");
    let started = match hsm.recover_start(account, &start.message.serialize()).await {
        Ok(s) => s,
        Err(e) => {
            oracle.lock().expect("oracle").start_failed(account);
            return OpResult::Failed(e);
        }
    };
    // KE2 left the HSM: from here the guess can be tested.
    oracle.lock().expect("oracle").ke2(account);
    let ke2 = CredentialResponse::deserialize(&started.ke2).expect("the HSM sends a valid KE2");
    let ksf = argon();
    let finished = start.state.finish(
        rng,
        pin,
        ke2,
        ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&ksf)),
    );
    let Ok(finished) = finished else {
        if abort {
            let _ = hsm.recover_abort(account, &started.login_id).await;
        }
        return if expect.is_some() {
            OpResult::NotOpened
        } else {
            OpResult::WrongGuess
        };
    };
    if expect.is_none() {
        violations
            .lock()
            .expect("violations")
            .push(format!("{account}: a PIN never enrolled opened a KE2"));
    }
    oracle.lock().expect("oracle").correct_ke3(account);
    let released = match hsm
        .recover_finish(account, &started.login_id, &finished.message.serialize())
        .await
    {
        Ok(r) => r,
        Err(e) => return OpResult::Failed(e),
    };
    let wrapped = seal::open(
        LABEL_KEY_RELEASE,
        &finished.session_key,
        &release_context(&started.login_id, account),
        &released.sealed_wrapped_key,
    );
    let Ok(wrapped) = wrapped else {
        violations.lock().expect("violations").push(format!(
            "{account}: released key does not open under the session key"
        ));
        return OpResult::Recovered;
    };
    oracle
        .lock()
        .expect("oracle")
        .released(account, Sha256::digest(&wrapped[..]).into());
    let key = seal::open(
        LABEL_BACKUP_KEY_WRAP,
        &finished.export_key,
        &account.credential_identifier(),
        &wrapped,
    );
    match (key, expect) {
        (Ok(key), Some(want)) if key[..] == want[..] => {}
        _ => violations.lock().expect("violations").push(format!(
            "{account}: the released backup key is not the enrolled one"
        )),
    }
    OpResult::Recovered
}

/// A correct login that nobody tells the oracle about (broken mode `HiddenReset`).
pub async fn hidden_login(hsm: &FleetHsm, rng: &mut StdRng, account: &AccountId, pin: &[u8]) {
    let start = ClientLogin::<Suite>::start(rng, pin).expect("login start");
    let Ok(started) = hsm.recover_start(account, &start.message.serialize()).await else {
        return;
    };
    let ke2 = CredentialResponse::deserialize(&started.ke2).expect("valid KE2");
    let ksf = argon();
    if let Ok(finished) = start.state.finish(
        rng,
        pin,
        ke2,
        ClientLoginFinishParameters::new(None, Identifiers::default(), Some(&ksf)),
    ) {
        let _ = hsm
            .recover_finish(account, &started.login_id, &finished.message.serialize())
            .await;
    }
}
