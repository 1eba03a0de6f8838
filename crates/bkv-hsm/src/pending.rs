//! Logins between KE2 and KE3: each is a typed state that a KE3 consumes once.

use crate::platform::Platform;
use bkv_core::{AccountId, Suite};
use opaque_ke::ServerLogin;
use std::collections::HashMap;

/// Names one pending login; random, so it cannot be guessed by another account.
pub type LoginId = [u8; 16];

/// A login whose KE2 has left the HSM (its guess is already spent) and that awaits its KE3.
pub(crate) struct AwaitingKe3 {
    pub(crate) account: AccountId,
    pub(crate) generation: u64,
    pub(crate) deadline_ms: u64,
    pub(crate) server_login: ServerLogin<Suite>,
}

/// The bounded set of logins in flight on this HSM. Never replicated: a login that
/// loses its HSM fails cleanly, and its guess stays spent.
pub(crate) struct PendingLogins {
    logins: HashMap<LoginId, AwaitingKe3>,
    // Logins taken for their KE3 whose reset is not committed yet: still in flight.
    finishing: HashMap<(AccountId, u64), usize>,
    capacity: usize,
}

/// Most logins one account may have awaiting their KE3 at once.
pub(crate) const MAX_LOGINS_PER_ACCOUNT: usize = 8;

impl PendingLogins {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            logins: HashMap::new(),
            finishing: HashMap::new(),
            capacity,
        }
    }

    /// Drops expired logins and says whether one more fits, for `account` and overall.
    pub(crate) fn has_room(&mut self, account: &AccountId, now_ms: u64) -> bool {
        if self.logins.len() >= self.capacity {
            self.logins.retain(|_, login| login.deadline_ms > now_ms);
        }
        let mine = self
            .logins
            .values()
            .filter(|l| l.account == *account && l.deadline_ms > now_ms)
            .count();
        self.logins.len() < self.capacity && mine < MAX_LOGINS_PER_ACCOUNT
    }

    /// Marks a taken login as finishing (its reset not yet committed).
    pub(crate) fn begin_finish(&mut self, account: &AccountId, generation: u64) {
        *self
            .finishing
            .entry((account.clone(), generation))
            .or_default() += 1;
    }

    /// The finishing login's outcome is committed (or failed).
    pub(crate) fn end_finish(&mut self, account: &AccountId, generation: u64) {
        let key = (account.clone(), generation);
        if let Some(n) = self.finishing.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.finishing.remove(&key);
            }
        }
    }

    pub(crate) fn insert(&mut self, platform: &dyn Platform, login: AwaitingKe3) -> LoginId {
        loop {
            let mut id = [0u8; 16];
            platform.fill_random(&mut id);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.logins.entry(id) {
                slot.insert(login);
                return id;
            }
        }
    }

    /// Takes the login `id` if it belongs to `account` and is still within its deadline.
    /// A login that belongs to another account is left where it is.
    pub(crate) fn take(
        &mut self,
        id: &LoginId,
        account: &AccountId,
        now_ms: u64,
    ) -> Option<AwaitingKe3> {
        if self.logins.get(id)?.account != *account {
            return None;
        }
        let login = self.logins.remove(id)?;
        (login.deadline_ms > now_ms).then_some(login)
    }

    /// Whether `account` has a login in flight for `generation` that may still succeed.
    pub(crate) fn in_flight(&self, account: &AccountId, generation: u64, now_ms: u64) -> bool {
        self.finishing.contains_key(&(account.clone(), generation))
            || self.logins.values().any(|l| {
                l.account == *account && l.generation == generation && l.deadline_ms > now_ms
            })
    }

    /// Forgets every login of `account` (its record was replaced).
    pub(crate) fn forget_account(&mut self, account: &AccountId) {
        self.logins.retain(|_, l| l.account != *account);
    }
}

/// Names one registration between its start and finish.
pub type RegistrationId = [u8; 16];

/// A registration whose OPRF evaluation left the HSM, under a fresh salt.
pub(crate) struct AwaitingUpload {
    pub(crate) account: AccountId,
    pub(crate) salt: [u8; 16],
    pub(crate) deadline_ms: u64,
}

/// The bounded set of registrations in flight on this HSM.
pub(crate) struct PendingRegistrations {
    registrations: HashMap<RegistrationId, AwaitingUpload>,
    capacity: usize,
}

impl PendingRegistrations {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            registrations: HashMap::new(),
            capacity,
        }
    }

    /// Remembers a registration; refuses when full of live ones.
    pub(crate) fn insert(
        &mut self,
        platform: &dyn Platform,
        now_ms: u64,
        pending: AwaitingUpload,
    ) -> Option<RegistrationId> {
        if self.registrations.len() >= self.capacity {
            self.registrations.retain(|_, r| r.deadline_ms > now_ms);
        }
        if self.registrations.len() >= self.capacity {
            return None;
        }
        let mut id = [0u8; 16];
        platform.fill_random(&mut id);
        self.registrations.insert(id, pending);
        Some(id)
    }

    /// Puts back a registration whose commit failed, so that the client may retry it.
    pub(crate) fn restore(&mut self, id: RegistrationId, pending: AwaitingUpload) {
        self.registrations.insert(id, pending);
    }

    /// Takes registration `id` if it belongs to `account` and is within its deadline.
    pub(crate) fn take(
        &mut self,
        id: &RegistrationId,
        account: &AccountId,
        now_ms: u64,
    ) -> Option<AwaitingUpload> {
        if self.registrations.get(id)?.account != *account {
            return None;
        }
        let pending = self.registrations.remove(id)?;
        (pending.deadline_ms > now_ms).then_some(pending)
    }
}
