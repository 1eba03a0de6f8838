//! Per-account rate limits at the frontend: a flood of calls for one account is refused
//! before it reaches the fleet, and guess-spending calls (`RecoverStart`) have a
//! tighter budget of their own, so that even a holder of the account's token burns the
//! guess budget only slowly. The guess limit itself is enforced in the HSMs; this only
//! slows the flood down and keeps it off other users.

use bkv_core::AccountId;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Accounts tracked at once; beyond it, idle (full) buckets are forgotten first.
const MAX_TRACKED: usize = 100_000;

/// Rate limits per account (`[rate_limit]` in frontend.toml).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Calls per second per account, sustained (0 turns every limit off).
    pub per_second: f64,
    /// Calls per account allowed in a burst.
    pub burst: u32,
    /// Guess-spending calls (`RecoverStart`) per minute per account, sustained.
    pub guesses_per_minute: f64,
    /// Guess-spending calls per account allowed in a burst.
    pub guess_burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: 10.0,
            burst: 30,
            guesses_per_minute: 6.0,
            guess_burst: 3,
        }
    }
}

impl RateLimit {
    /// No limit at all (benchmarks).
    pub const OFF: RateLimit = RateLimit {
        per_second: 0.0,
        burst: 0,
        guesses_per_minute: 0.0,
        guess_burst: 0,
    };

    /// Whether any limit applies.
    pub fn is_on(&self) -> bool {
        self.per_second > 0.0
    }
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One token bucket per account.
struct Buckets {
    rate_per_sec: f64,
    burst: f64,
    map: HashMap<AccountId, Bucket>,
}

impl Buckets {
    fn new(rate_per_sec: f64, burst: u32) -> Self {
        Self {
            rate_per_sec,
            burst: f64::from(burst.max(1)),
            map: HashMap::new(),
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_sec).min(self.burst);
        bucket.at = now;
    }

    /// Whether one token is available for `account` (not taken yet), or how long to wait.
    fn peek(&mut self, account: &AccountId, now: Instant) -> Result<(), Duration> {
        let Some(mut bucket) = self.map.get(account).copied() else {
            return Ok(());
        };
        self.refill(&mut bucket, now);
        self.map.insert(account.clone(), bucket);
        if bucket.tokens >= 1.0 {
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.rate_per_sec;
            Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::from_secs(3600)))
        }
    }

    fn take(&mut self, account: &AccountId, now: Instant) {
        if self.map.len() >= MAX_TRACKED && !self.map.contains_key(account) {
            let (rate, burst) = (self.rate_per_sec, self.burst);
            self.map.retain(|_, b| {
                let idle = now.saturating_duration_since(b.at).as_secs_f64();
                b.tokens + idle * rate < burst
            });
        }
        let mut bucket = self.map.get(account).copied().unwrap_or(Bucket {
            tokens: self.burst,
            at: now,
        });
        self.refill(&mut bucket, now);
        bucket.tokens -= 1.0;
        self.map.insert(account.clone(), bucket);
    }
}

/// The limits of one frontend.
pub struct AccountLimiter {
    calls: Mutex<Buckets>,
    /// None when guesses have no limit of their own.
    guesses: Option<Mutex<Buckets>>,
}

impl std::fmt::Debug for AccountLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountLimiter").finish_non_exhaustive()
    }
}

impl AccountLimiter {
    /// A limiter for `limit`, or none when it is off.
    pub fn new(limit: RateLimit) -> Option<Self> {
        limit.is_on().then(|| Self {
            calls: Mutex::new(Buckets::new(limit.per_second, limit.burst)),
            guesses: (limit.guesses_per_minute > 0.0).then(|| {
                Mutex::new(Buckets::new(
                    limit.guesses_per_minute / 60.0,
                    limit.guess_burst,
                ))
            }),
        })
    }

    /// Admits one call for `account` (a guess-spending one if `spends_guess`), or says
    /// how long to wait. A refused call takes nothing from either budget.
    pub fn admit(
        &self,
        account: &AccountId,
        spends_guess: bool,
        now: Instant,
    ) -> Result<(), Duration> {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.peek(account, now)?;
        if let (true, Some(guesses)) = (spends_guess, &self.guesses) {
            let mut guesses = guesses.lock().unwrap_or_else(|e| e.into_inner());
            guesses.peek(account, now)?;
            guesses.take(account, now);
        }
        calls.take(account, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> AccountId {
        AccountId::new("t", "alice").unwrap()
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let limiter = AccountLimiter::new(RateLimit::default()).unwrap();
        let t0 = Instant::now();
        for _ in 0..30 {
            assert!(limiter.admit(&alice(), false, t0).is_ok());
        }
        let wait = limiter.admit(&alice(), false, t0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Another account is not affected.
        assert!(limiter
            .admit(&AccountId::new("t", "bob").unwrap(), false, t0)
            .is_ok());
        // A tenth of a second later one more call fits, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.admit(&alice(), false, t1).is_ok());
        assert!(limiter.admit(&alice(), false, t1).is_err());
    }

    #[test]
    fn guesses_have_a_tighter_budget_and_refusals_take_nothing() {
        let limiter = AccountLimiter::new(RateLimit::default()).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.admit(&alice(), true, t0).is_ok());
        }
        for _ in 0..20 {
            assert!(limiter.admit(&alice(), true, t0).is_err());
        }
        // The refused guesses took no ordinary calls: 27 are left of the burst.
        for _ in 0..27 {
            assert!(limiter.admit(&alice(), false, t0).is_ok());
        }
        assert!(limiter.admit(&alice(), false, t0).is_err());
        // Six guesses a minute: one more after ten seconds.
        let t1 = t0 + Duration::from_secs(10);
        assert!(limiter.admit(&alice(), true, t1).is_ok());
        assert!(limiter.admit(&alice(), true, t1).is_err());
    }

    #[test]
    fn no_guess_limit_of_its_own_never_panics() {
        let limit = RateLimit {
            guesses_per_minute: 0.0,
            ..RateLimit::default()
        };
        let limiter = AccountLimiter::new(limit).unwrap();
        let t0 = Instant::now();
        for _ in 0..30 {
            assert!(limiter.admit(&alice(), true, t0).is_ok());
        }
        assert!(limiter.admit(&alice(), true, t0).is_err());
    }

    #[test]
    fn off_means_no_limiter() {
        assert!(AccountLimiter::new(RateLimit::OFF).is_none());
    }
}
