//! Which replica serves a read, among those the health checker allows.
//! Pure: the proxy supplies the candidates, a ticket (a round-robin counter
//! or a random number) and the client's hash.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    #[default]
    RoundRobin,
    LeastConnections,
    Random,
    /// The same client address goes to the same replica while it stays eligible.
    ClientHash,
}

/// A node eligible for the read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The node's index in its shard.
    pub node: usize,
    /// In the proxy's own zone.
    pub local: bool,
    /// Server connections of this node in use now.
    pub in_use: usize,
}

/// Picks a node. Candidates in the proxy's zone come first when there are any.
/// `ticket` is a round-robin counter (RoundRobin, and LeastConnections ties) or
/// a random number (Random); `client` is a hash of the client's address.
pub fn choose(cands: &[Candidate], strategy: Strategy, ticket: u64, client: u64) -> Option<usize> {
    let local = cands.iter().filter(|c| c.local).count();
    let pool: Vec<&Candidate> = if local > 0 {
        cands.iter().filter(|c| c.local).collect()
    } else {
        cands.iter().collect()
    };
    if pool.is_empty() {
        return None;
    }
    let n = pool.len() as u64;
    let pick = match strategy {
        Strategy::RoundRobin | Strategy::Random => pool[(ticket % n) as usize],
        Strategy::LeastConnections => {
            let least = pool.iter().map(|c| c.in_use).min().unwrap_or(0);
            let tied: Vec<_> = pool.iter().filter(|c| c.in_use == least).collect();
            tied[(ticket % tied.len() as u64) as usize]
        }
        // Rendezvous hashing: a client keeps its replica when others come and go.
        Strategy::ClientHash => pool
            .iter()
            .max_by_key(|c| mix(client ^ mix(c.node as u64 + 1)))
            .copied()?,
    };
    Some(pick.node)
}

/// A 64-bit finaliser (splitmix64): spreads nearby inputs over the range.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(n: usize) -> Vec<Candidate> {
        (1..=n)
            .map(|node| Candidate {
                node,
                local: false,
                in_use: 0,
            })
            .collect()
    }

    fn counts(picks: impl Iterator<Item = Option<usize>>) -> [usize; 4] {
        let mut c = [0; 4];
        for p in picks {
            c[p.unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_alternates() {
        let c = cands(2);
        let got = counts((0..1000).map(|t| choose(&c, Strategy::RoundRobin, t, 0)));
        assert_eq!(got, [0, 500, 500, 0]);
    }

    #[test]
    fn random_spreads_evenly() {
        let c = cands(3);
        let got = counts((0..30_000u64).map(|t| choose(&c, Strategy::Random, mix(t), 0)));
        for n in &got[1..] {
            assert!((9_000..11_000).contains(n), "{got:?}");
        }
    }

    #[test]
    fn least_connections_prefers_the_idle_node() {
        let mut c = cands(3);
        c[0].in_use = 5;
        c[1].in_use = 1;
        c[2].in_use = 1;
        let got = counts((0..100).map(|t| choose(&c, Strategy::LeastConnections, t, 0)));
        assert_eq!(got, [0, 0, 50, 50]);
    }

    #[test]
    fn client_hash_is_sticky_and_spreads_clients() {
        let c = cands(3);
        let mut per_node = [0usize; 4];
        for client in 0..3000u64 {
            let h = mix(client);
            let first = choose(&c, Strategy::ClientHash, 0, h).unwrap();
            for t in 1..5 {
                assert_eq!(choose(&c, Strategy::ClientHash, t, h), Some(first));
            }
            per_node[first] += 1;
            // Losing another replica does not move this client.
            let without: Vec<_> = c
                .iter()
                .copied()
                .filter(|x| x.node == first || x.node != (first % 3) + 1)
                .collect();
            assert_eq!(choose(&without, Strategy::ClientHash, 0, h), Some(first));
        }
        for n in &per_node[1..] {
            assert!((800..1200).contains(n), "{per_node:?}");
        }
    }

    #[test]
    fn own_zone_first() {
        let mut c = cands(3);
        c[2].local = true;
        for t in 0..10 {
            assert_eq!(choose(&c, Strategy::RoundRobin, t, 0), Some(3));
        }
        assert_eq!(choose(&[], Strategy::RoundRobin, 0, 0), None);
    }
}
