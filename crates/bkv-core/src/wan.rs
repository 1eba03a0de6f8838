//! Simulated wide-area latency between datacenters, for measuring a fleet against its
//! physical floor on one machine. Applied by hosts only when a profile is named.

/// The built-in profile: five datacenters on three continents.
pub const THREE_CONTINENTS: &str = "three-continents";

/// Where each datacenter of [`THREE_CONTINENTS`] stands.
pub const THREE_CONTINENTS_SITES: [&str; 5] = [
    "dc1 us-east (Virginia)",
    "dc2 us-west (Oregon)",
    "dc3 eu-west (Ireland)",
    "dc4 eu-central (Frankfurt)",
    "dc5 ap-northeast (Tokyo)",
];

// One-way delays in milliseconds (half of typical public cloud round trips).
const THREE_CONTINENTS_MS: [[u64; 5]; 5] = [
    [0, 32, 35, 45, 75],
    [32, 0, 65, 75, 50],
    [35, 65, 0, 12, 105],
    [45, 75, 12, 0, 115],
    [75, 50, 105, 115, 0],
];

/// One-way delay from the client to the frontend (which stands in dc1).
const THREE_CONTINENTS_CLIENT_MS: u64 = 20;

/// A named latency profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WanProfile {
    table: &'static [[u64; 5]; 5],
    client_ms: u64,
}

/// The datacenter the frontend stands in.
pub const FRONTEND_DC: &str = "dc1";

fn index(dc: &str) -> Option<usize> {
    let n: usize = dc.strip_prefix("dc")?.parse().ok()?;
    (1..=5).contains(&n).then_some(n - 1)
}

impl WanProfile {
    /// The profile called `name`, if there is one.
    pub fn named(name: &str) -> Option<Self> {
        (name == THREE_CONTINENTS).then_some(Self {
            table: &THREE_CONTINENTS_MS,
            client_ms: THREE_CONTINENTS_CLIENT_MS,
        })
    }

    /// One-way delay in milliseconds from `from` to `to` (0 for unknown datacenters).
    pub fn one_way_ms(&self, from: &str, to: &str) -> u64 {
        match (index(from), index(to)) {
            (Some(a), Some(b)) => self.table[a][b],
            _ => 0,
        }
    }

    /// One-way delay between the client and the frontend.
    pub fn client_ms(&self) -> u64 {
        self.client_ms
    }

    /// The latency floor of one recovery with the leader in `leader` among `dcs`: two
    /// client round trips, the frontend's round trips to the leader, and two majority
    /// commits, each the round trip from the leader to the peer that completes a majority.
    pub fn recovery_floor_ms(&self, leader: &str, dcs: &[&str]) -> u64 {
        let mut peer_rtts: Vec<u64> = dcs
            .iter()
            .filter(|dc| **dc != leader)
            .map(|dc| self.one_way_ms(leader, dc) + self.one_way_ms(dc, leader))
            .collect();
        peer_rtts.sort_unstable();
        let majority = dcs.len() / 2 + 1;
        // The leader counts itself; it waits for majority - 1 peers.
        let commit = if majority > 1 {
            peer_rtts[majority - 2]
        } else {
            0
        };
        let frontend = self.one_way_ms(FRONTEND_DC, leader) + self.one_way_ms(leader, FRONTEND_DC);
        2 * (2 * self.client_ms + frontend + commit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_is_symmetric_and_floor_adds_up() {
        let wan = WanProfile::named(THREE_CONTINENTS).unwrap();
        for a in 1..=5 {
            for b in 1..=5 {
                let (a, b) = (format!("dc{a}"), format!("dc{b}"));
                assert_eq!(wan.one_way_ms(&a, &b), wan.one_way_ms(&b, &a));
            }
        }
        let dcs = ["dc1", "dc2", "dc3", "dc4", "dc5"];
        // Leader in dc1: peers at RTT 64, 70, 90, 150; a majority of 5 needs the 2nd nearest (70).
        assert_eq!(wan.recovery_floor_ms("dc1", &dcs), 2 * (40 + 70));
        assert!(WanProfile::named("moon").is_none());
    }
}
