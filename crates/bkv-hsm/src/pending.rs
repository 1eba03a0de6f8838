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
    capacity: usize,
}

impl PendingLogins {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            logins: HashMap::new(),
            capacity,
        }
    }

    /// Drops expired logins and says whether one more fits.
    pub(crate) fn has_room(&mut self, now_ms: u64) -> bool {
        if self.logins.len() >= self.capacity {
            self.logins.retain(|_, login| login.deadline_ms > now_ms);
        }
        self.logins.len() < self.capacity
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
        self.logins
            .values()
            .any(|l| l.account == *account && l.generation == generation && l.deadline_ms > now_ms)
    }

    /// Forgets every login of `account` (its record was replaced).
    pub(crate) fn forget_account(&mut self, account: &AccountId) {
        self.logins.retain(|_, l| l.account != *account);
    }
}
