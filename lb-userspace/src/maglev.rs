//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016): builds the lookup
//! table ("ring") that the data plane indexes with `flow_hash % M`.
//!
//! Why Maglev: each backend gets a share of the table proportional to its weight, and
//! removing or adding one backend moves little more than that backend's own share, so
//! flows without a connection-table entry (after a failover between LB hosts, an LRU
//! eviction, a reload) mostly keep their backend.
//!
//! Why this code: every LB host behind one ECMP group must build the *same* table from
//! the same input. So the hash is our own (FNV-1a + murmur3 finaliser, stable across
//! Rust releases, unlike `DefaultHasher`), backends are sorted by name before use (input
//! order does not matter) and every tie is broken by name order.
//!
//! Algorithm: offset = h1(name) mod M, skip = h2(name) mod (M-1) + 1, and backend `i`
//! prefers slots `(offset + j*skip) mod M` for j = 0, 1, ... (M prime, so this visits
//! every slot). Weights fix each backend's slot count up front by largest-remainder
//! apportionment of M (within one slot of `M * w / sum(w)`; a backend with weight > 0
//! always gets at least one slot). Backends then take turns in Sainte-Laguë order (next
//! turn to the smallest `(placed + 1/2) / w`, ties to the smaller name), each claiming its
//! next preferred empty slot, until every count is met. With equal weights this is
//! exactly classic Maglev.

use std::fmt;

/// One backend as input of [`build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevInput<'a> {
    /// Stable identity of the backend (e.g. its address); decides its slots.
    pub name: &'a [u8],
    /// Relative share of the table; 0 means absent from the table.
    pub weight: u32,
}

/// Why [`build`] refused its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size is not prime (permutations would not visit every slot).
    NotPrime(u32),
    /// Fewer slots than backends with weight > 0.
    TooSmall { m: u32, backends: usize },
    /// Two inputs have the same name; their indices in the caller's slice.
    DuplicateName(usize, usize),
    /// More inputs than a `u32` table entry can index.
    TooManyBackends(usize),
}

impl fmt::Display for MaglevError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotPrime(m) => write!(f, "maglev table size {m} is not prime"),
            Self::TooSmall { m, backends } => {
                write!(f, "maglev table size {m} < {backends} weighted backends")
            }
            Self::DuplicateName(a, b) => {
                write!(f, "maglev backends {a} and {b} have the same name")
            }
            Self::TooManyBackends(n) => write!(f, "{n} maglev backends do not fit in u32"),
        }
    }
}

impl std::error::Error for MaglevError {}

/// Builds a table of `m` entries, each an index into `backends`.
///
/// Backends with weight 0 are absent; if no backend has weight > 0 the table is empty
/// (`Ok(vec![])`). The result depends only on `seed` and the set of (name, weight)
/// pairs, not on their order in `backends`.
///
/// Errors: `m` not prime, `m` smaller than the number of backends with weight > 0, two
/// backends (weighted or not) with the same name, more than `u32::MAX` backends.
///
/// Cost: expected O(M log M) time, about 2 ms for M = 65537 and 1000 backends, and
/// about 16 bytes of scratch per slot, so `m` is expected to be moderate (default 65537).
pub fn build(seed: u32, backends: &[MaglevInput<'_>], m: u32) -> Result<Vec<u32>, MaglevError> {
    build_inner(seed, backends, m, false).map(|(t, _)| t)
}

/// No second choice for a slot (see [`build_with_seconds`]).
pub const NO_SECOND: u32 = u32::MAX;

/// As [`build`], and for each slot the *second choice*: the first other backend whose
/// preference walk reached the slot after it was taken (an index into `backends`), or
/// [`NO_SECOND`] (slots no other walk crossed before the table filled: ~2%). When a backend
/// joins and takes a slot, the slot's old owner is usually its second choice: what the
/// stateless mode carries when the previous owner is not known.
pub fn build_with_seconds(
    seed: u32,
    backends: &[MaglevInput<'_>],
    m: u32,
) -> Result<(Vec<u32>, Vec<u32>), MaglevError> {
    build_inner(seed, backends, m, true)
}

fn build_inner(
    seed: u32,
    backends: &[MaglevInput<'_>],
    m: u32,
    seconds: bool,
) -> Result<(Vec<u32>, Vec<u32>), MaglevError> {
    if !is_prime(m) {
        return Err(MaglevError::NotPrime(m));
    }
    let len =
        u32::try_from(backends.len()).map_err(|_| MaglevError::TooManyBackends(backends.len()))?;

    // Caller indices in name order; equal names end up adjacent, smaller index first.
    let mut order: Vec<u32> = (0..len).collect();
    order.sort_unstable_by(|&a, &b| {
        let (x, y) = (&backends[a as usize], &backends[b as usize]);
        x.name.cmp(y.name).then(a.cmp(&b))
    });
    if let Some(pair) = order
        .windows(2)
        .find(|p| backends[p[0] as usize].name == backends[p[1] as usize].name)
    {
        return Err(MaglevError::DuplicateName(
            pair[0] as usize,
            pair[1] as usize,
        ));
    }
    order.retain(|&i| backends[i as usize].weight > 0);
    if order.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    if order.len() > m as usize {
        return Err(MaglevError::TooSmall {
            m,
            backends: order.len(),
        });
    }

    let weights: Vec<u32> = order.iter().map(|&i| backends[i as usize].weight).collect();
    let quota = apportion(m, &weights);
    let mut second = if seconds {
        vec![NO_SECOND; m as usize]
    } else {
        Vec::new()
    };
    let mut table = fill(seed, backends, &order, &weights, &quota, m, &mut second);
    // `fill` works with positions in `order`; hand back the caller's indices.
    for e in &mut table {
        *e = order[*e as usize];
    }
    for e in &mut second {
        if *e != NO_SECOND {
            *e = order[*e as usize];
        }
    }
    Ok((table, second))
}

/// Whether `n` is prime (trial division: at most ~11k steps for a u32).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let mut d = 5u32;
    // d <= 65537 here, so d * d and d + 2 cannot overflow u32 before the loop ends.
    while d <= n / d {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The smallest prime `>= n`.
///
/// # Panics
/// If `n > 4_294_967_291`, the largest prime that fits in a `u32`.
pub fn next_prime(n: u32) -> u32 {
    const LARGEST_U32_PRIME: u32 = 4_294_967_291;
    assert!(n <= LARGEST_U32_PRIME, "no u32 prime >= {n}");
    let mut p = n.max(2);
    while !is_prime(p) {
        p += 1;
    }
    p
}

/// Slot counts for `weights` (all > 0, at most `m` of them) summing to `m`:
/// largest-remainder (Hamilton) apportionment, ties to the earlier backend, then any
/// backend left with no slot takes one from the backend with the most.
fn apportion(m: u32, weights: &[u32]) -> Vec<u32> {
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let mut quota = Vec::with_capacity(weights.len());
    let mut remainder = Vec::with_capacity(weights.len());
    for &w in weights {
        let exact = u128::from(m) * u128::from(w);
        quota.push((exact / total) as u32); // <= m
        remainder.push(exact % total);
    }
    let given: u64 = quota.iter().map(|&q| u64::from(q)).sum();
    let left = (u64::from(m) - given) as usize; // < weights.len()
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_unstable_by(|&a, &b| remainder[b].cmp(&remainder[a]).then(a.cmp(&b)));
    for &i in &by_remainder[..left] {
        quota[i] += 1;
    }
    // Only with extreme weight ratios. Since m >= backends, while some quota is 0 another
    // is >= 2, so the donor keeps at least one slot.
    for i in 0..quota.len() {
        if quota[i] == 0 {
            let donor = (0..quota.len())
                .max_by(|&a, &b| quota[a].cmp(&quota[b]).then(b.cmp(&a)))
                .unwrap_or(i);
            quota[donor] -= 1;
            quota[i] = 1;
        }
    }
    quota
}

/// Turn order of the fill: backend `pos`'s turn `k` (k < quota) comes at time
/// `(2k + 1) / (2 * weight)`; earlier time first, ties to the smaller `pos` (name order).
///
/// A heap costs too much here (M pops). Instead: counting sort of all M turns into at
/// most M buckets by the fixed-point time `floor(time * 2^32) >> shift`, which is
/// monotone in the exact time, then an exact sort inside each bucket.
fn schedule(weights: &[u32], quota: &[u32], m: u32) -> Vec<u64> {
    // Fixed-point times of one backend's turns, without a division per turn.
    let times = |pos: usize| {
        let w = u64::from(weights[pos]);
        let (step, step_rem) = ((1u64 << 32) / w, (1u64 << 32) % w);
        let (mut t, mut rem) = ((1u64 << 31) / w, (1u64 << 31) % w);
        (0..quota[pos]).map(move |k| {
            let this = (t, k);
            (t, rem) = (t + step, rem + step_rem);
            if rem >= w {
                (t, rem) = (t + 1, rem - w);
            }
            this
        })
    };
    // (2k + 1) * 2^31 < 2^64 since k < 2^32.
    let last = |pos: usize| ((2 * u64::from(quota[pos]) - 1) << 31) / u64::from(weights[pos]);
    let latest = (0..weights.len()).map(last).max().unwrap_or(0);
    let shift = (0..64).find(|&s| latest >> s < u64::from(m)).unwrap_or(63);
    let buckets = (latest >> shift) as usize + 1;

    // ends[b] counts bucket b, then becomes its start + count, i.e. its end.
    let mut ends = vec![0u32; buckets];
    for pos in 0..weights.len() {
        for (t, _) in times(pos) {
            ends[(t >> shift) as usize] += 1;
        }
    }
    for b in 1..buckets {
        ends[b] += ends[b - 1];
    }
    // A turn is (pos << 32) | k. Filled back to front, so `ends[b]` ends as b's start.
    let mut turns = vec![0u64; m as usize];
    for pos in (0..weights.len()).rev() {
        for (t, k) in times(pos) {
            let b = (t >> shift) as usize;
            ends[b] -= 1;
            turns[ends[b] as usize] = (pos as u64) << 32 | u64::from(k);
        }
    }
    let exact = |a: &u64, b: &u64| {
        let (pa, pb) = ((a >> 32) as usize, (b >> 32) as usize);
        let na = 2 * u128::from(*a as u32) + 1;
        let nb = 2 * u128::from(*b as u32) + 1;
        (na * u128::from(weights[pb]))
            .cmp(&(nb * u128::from(weights[pa])))
            .then(pa.cmp(&pb))
    };
    let starts = ends;
    for (b, &start) in starts.iter().enumerate() {
        let end = starts.get(b + 1).map_or(m, |&e| e) as usize;
        let bucket = &mut turns[start as usize..end];
        if !bucket.is_sorted_by(|a, b| exact(a, b).is_lt()) {
            bucket.sort_unstable_by(exact);
        }
    }
    turns
}

/// The Maglev fill. Returns a full table of positions in `order`.
fn fill(
    seed: u32,
    backends: &[MaglevInput<'_>],
    order: &[u32],
    weights: &[u32],
    quota: &[u32],
    m: u32,
    second: &mut [u32],
) -> Vec<u32> {
    const EMPTY: u32 = u32::MAX; // positions are < m <= u32::MAX - 4
    let mut next = Vec::with_capacity(order.len()); // next preferred slot of each backend
    let mut skip = Vec::with_capacity(order.len());
    for &i in order {
        let name = backends[i as usize].name;
        next.push((hash64(seed, 1, name) % u64::from(m)) as u32);
        skip.push((hash64(seed, 2, name) % u64::from(m - 1)) as u32 + 1);
    }
    // (cur + skip) mod m without overflow: cur < m, 1 <= skip < m.
    let step = |cur: u32, skip: u32| {
        if cur >= m - skip {
            cur - (m - skip)
        } else {
            cur + skip
        }
    };

    let mut table = vec![EMPTY; m as usize];
    // Quotas sum to m, so there are exactly m turns; and while the table is not full,
    // each backend's remaining permutation holds an empty slot.
    let turns = schedule(weights, quota, m);
    // Walking the permutation costs ~m / (empty slots) probes per turn: most of the walk
    // is spent in the last few turns. Those (about sqrt(m)/2) take the shortcut below.
    let (walk, endgame) = turns.split_at((m - (m.isqrt() / 2).max(1)) as usize);
    for &turn in walk {
        let (p, pos) = ((turn >> 32) as usize, (turn >> 32) as u32);
        let (mut cur, skip) = (next[p], skip[p]);
        while table[cur as usize] != EMPTY {
            if let Some(s) = second.get_mut(cur as usize) {
                if *s == EMPTY && table[cur as usize] != pos {
                    *s = pos;
                }
            }
            cur = step(cur, skip);
        }
        table[cur as usize] = pos;
        next[p] = step(cur, skip);
    }
    // Same result without the walk: empty slot `s` is `(s - next) / skip mod m` steps
    // ahead in the backend's permutation; take the nearest one.
    let mut empty: Vec<u32> = (0..m).filter(|&s| table[s as usize] == EMPTY).collect();
    for &turn in endgame {
        let (p, pos) = ((turn >> 32) as usize, (turn >> 32) as u32);
        let (cur, inv) = (next[p], inverse(skip[p], m));
        let ahead = |s: u32| {
            let diff = if s >= cur { s - cur } else { s + (m - cur) };
            u64::from(diff) * u64::from(inv) % u64::from(m)
        };
        let nearest = (0..empty.len()).min_by_key(|&k| ahead(empty[k]));
        let slot = empty.swap_remove(nearest.unwrap_or_default());
        table[slot as usize] = pos;
        next[p] = step(slot, skip[p]);
    }
    table
}

/// `a^-1 mod m` for prime `m` and `0 < a < m` (extended Euclid).
fn inverse(a: u32, m: u32) -> u32 {
    let (mut r0, mut r1) = (i64::from(m), i64::from(a));
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(i64::from(m)) as u32
}

/// Seeded 64-bit FNV-1a over `domain`, `seed` (little-endian) and `name`, finished with
/// murmur3's fmix64 so that similar names get unrelated offsets and skips.
fn hash64(seed: u32, domain: u8, name: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for &b in [domain].iter().chain(&seed.to_le_bytes()).chain(name) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65537;
    const SEED: u32 = 0x5eed;

    fn names(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:80", i / 256, i % 256).into_bytes())
            .collect()
    }

    fn inputs<'a>(names: &'a [Vec<u8>], weights: &[u32]) -> Vec<MaglevInput<'a>> {
        names
            .iter()
            .zip(weights)
            .map(|(n, &weight)| MaglevInput { name: n, weight })
            .collect()
    }

    /// Deterministic pseudo-random numbers (splitmix64).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u32 {
            (self.next() % n) as u32
        }
    }

    /// Deterministic weights in 1..=100.
    fn assorted_weights(n: usize) -> Vec<u32> {
        let mut rng = Rng(42);
        (0..n).map(|_| rng.below(100) + 1).collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u32> {
        let mut c = vec![0; n];
        for &e in table {
            c[e as usize] += 1;
        }
        c
    }

    /// Every share is within one slot of exact (largest remainder), and within 1% of it.
    /// Only the former is guaranteed: 1% of a tiny share (weight 1 of a sum of ~5000 is
    /// ~13 slots) is a fraction of a slot; the inputs here happen to allow it.
    fn assert_shares(table: &[u32], weights: &[u32]) {
        assert_eq!(table.len(), M as usize);
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let mut worst = 0f64;
        for (i, &c) in counts(table, weights.len()).iter().enumerate() {
            let exact = f64::from(M) * f64::from(weights[i]) / total;
            let err = (f64::from(c) - exact).abs();
            assert!(err < 1.0, "backend {i}: {c} slots, exact share {exact:.2}");
            assert!(
                err <= 0.01 * exact,
                "backend {i}: {c} slots, exact {exact:.2}"
            );
            worst = worst.max(err / exact);
        }
        println!("worst share error {:.3}%", worst * 100.0);
    }

    #[test]
    fn equal_weights_share() {
        let names = names(100);
        let weights = vec![1; 100];
        let table = build(SEED, &inputs(&names, &weights), M).unwrap();
        assert_shares(&table, &weights);
    }

    #[test]
    fn assorted_weights_share() {
        let names = names(100);
        let weights = assorted_weights(100);
        assert!(weights.contains(&1) || weights.iter().min() < Some(&5));
        let table = build(SEED, &inputs(&names, &weights), M).unwrap();
        assert_shares(&table, &weights);
    }

    /// Slots whose backend (by name) differs after removing backend `victim`.
    fn moved_on_removal(weights: &[u32], victim: usize) -> (usize, usize) {
        let names = names(weights.len());
        let all = inputs(&names, weights);
        let mut rest = all.clone();
        rest.remove(victim);
        let before = build(SEED, &all, M).unwrap();
        let after = build(SEED, &rest, M).unwrap();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|&(&b, &a)| all[b as usize].name != rest[a as usize].name)
            .count();
        let own = before.iter().filter(|&&b| b as usize == victim).count();
        (moved, own)
    }

    #[test]
    fn removal_disruption() {
        for n in [100usize, 10] {
            let (moved, own) = moved_on_removal(&vec![1; n], n / 2);
            let pct = 100.0 * moved as f64 / f64::from(M);
            println!(
                "removing 1 of {n} moved {pct:.2}% of slots (ideal {:.2}%)",
                100.0 / n as f64
            );
            assert!(moved >= own);
            assert!(moved <= 2 * M as usize / n, "{moved} slots moved");
        }
        // Weighted: the removed backend's own slots must move, plus some churn.
        let weights = assorted_weights(100);
        for victim in [0, 50] {
            let (moved, own) = moved_on_removal(&weights, victim);
            println!(
                "weighted: removing backend {victim} (weight {}) moved {:.2}% of slots (its own {:.2}%)",
                weights[victim],
                100.0 * moved as f64 / f64::from(M),
                100.0 * own as f64 / f64::from(M),
            );
            assert!(moved >= own);
            assert!(
                moved <= 2 * own + M as usize / 100,
                "{moved} slots moved, own {own}"
            );
        }
    }

    /// The second choice is another backend (never the slot's owner), the same table comes
    /// with it, and nearly every slot has one.
    #[test]
    fn second_choices_are_other_backends_of_the_same_table() {
        let names = names(10);
        let weights = assorted_weights(10);
        let input = inputs(&names, &weights);
        let (table, second) = build_with_seconds(SEED, &input, M).unwrap();
        assert_eq!(table, build(SEED, &input, M).unwrap());
        assert_eq!(second.len(), M as usize);
        let mut none = 0;
        for (s, (&t, &c)) in table.iter().zip(&second).enumerate() {
            if c == NO_SECOND {
                none += 1;
                continue;
            }
            assert_ne!(t, c, "slot {s}: second choice is its owner");
            assert!((c as usize) < input.len());
        }
        // Slots no other backend's walk crossed before the table filled (those filled in
        // the last turns, and some of the lightest backends'): a few percent.
        println!("{none} of {M} slots without a second choice");
        assert!(none <= M as usize / 20, "{none} slots without a second");
    }

    /// When a backend joins, the slots it takes mostly name their old owner as second
    /// choice: an LB host that never saw the old ring carries the right secondary for
    /// most moved flows. (Measured, not guaranteed: the first walker over a slot is not
    /// always its old owner.)
    #[test]
    fn a_joining_backend_s_slots_mostly_name_their_old_owner_second() {
        let names = names(11);
        let weights = vec![1; 11];
        let before = build(SEED, &inputs(&names[..10], &weights[..10]), M).unwrap();
        let (after, second) = build_with_seconds(SEED, &inputs(&names, &weights), M).unwrap();
        let (mut taken, mut named) = (0, 0);
        for s in 0..M as usize {
            if after[s] == 10 {
                taken += 1;
                named += (second[s] == before[s]) as usize;
            }
        }
        println!("{named} of {taken} slots the new backend took name their old owner");
        assert!(taken > 0);
        assert!(
            named * 10 >= taken * 9,
            "{named} of {taken} slots the new backend took name their old owner"
        );
    }

    #[test]
    fn deterministic_and_order_independent() {
        let names = names(50);
        let weights = assorted_weights(50);
        let input = inputs(&names, &weights);
        let a = build(SEED, &input, M).unwrap();
        assert_eq!(a, build(SEED, &input, M).unwrap());

        // A fixed shuffle (reverse, then interleave halves).
        let mut shuffled = input.clone();
        shuffled.reverse();
        let (x, y) = shuffled.split_at(25);
        let shuffled: Vec<_> = x.iter().zip(y).flat_map(|(p, q)| [*p, *q]).collect();
        assert_ne!(shuffled, input);
        let b = build(SEED, &shuffled, M).unwrap();
        assert_ne!(a, b); // indices differ...
        for (&i, &j) in a.iter().zip(&b) {
            assert_eq!(input[i as usize].name, shuffled[j as usize].name); // ...names do not
        }
    }

    #[test]
    fn edge_cases_and_errors() {
        let names = names(20);
        let w = |ws: &[u32]| inputs(&names, ws);
        assert_eq!(build(SEED, &[], M), Ok(vec![]));
        assert_eq!(build(SEED, &w(&[0, 0, 0]), M), Ok(vec![]));
        assert_eq!(build(SEED, &[], 65536), Err(MaglevError::NotPrime(65536)));
        assert_eq!(build(SEED, &w(&[1]), 1), Err(MaglevError::NotPrime(1)));
        assert_eq!(build(SEED, &w(&[1]), 0), Err(MaglevError::NotPrime(0)));
        let dup = [
            MaglevInput {
                name: b"b",
                weight: 1,
            },
            MaglevInput {
                name: b"a",
                weight: 1,
            },
            MaglevInput {
                name: b"b",
                weight: 0,
            },
        ];
        assert_eq!(build(SEED, &dup, M), Err(MaglevError::DuplicateName(0, 2)));
        assert_eq!(
            build(SEED, &w(&[1; 8]), 7),
            Err(MaglevError::TooSmall { m: 7, backends: 8 })
        );
        // Weight-0 backends do not count towards the size limit nor appear.
        let t = build(SEED, &w(&[1, 0, 1, 1, 0, 1, 1, 1, 1]), 7).unwrap();
        assert_eq!(counts(&t, 9), [1, 0, 1, 1, 0, 1, 1, 1, 1]);

        for m in [2, 3, 7, 13, 251] {
            for n in 1..=m.min(20) as usize {
                let t = build(SEED, &w(&vec![1; n]), m).unwrap();
                assert_eq!(t.len(), m as usize);
                let c = counts(&t, n);
                let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
                assert!(*lo >= 1 && hi - lo <= 1, "m={m} n={n}: {c:?}");
            }
        }
        // Extreme weights: every weighted backend still gets a slot.
        let t = build(SEED, &w(&[u32::MAX, 1, 1, u32::MAX]), 13).unwrap();
        assert_eq!(counts(&t, 4), [5, 1, 1, 6]);
        let t = build(SEED, &w(&[u32::MAX; 20]), M).unwrap();
        assert_shares(&t, &[1; 20]);
    }

    #[test]
    fn seed_changes_table() {
        let names = names(100);
        let input = inputs(&names, &[1; 100]);
        let a = build(SEED, &input, M).unwrap();
        let b = build(SEED + 1, &input, M).unwrap();
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < 2 * M as usize / 100, "{same} slots unchanged");
        assert_eq!(counts(&a, 100), counts(&b, 100));
    }

    /// Pins the hash and the fill: tables must agree across hosts and versions (rolling
    /// upgrades). If this fails, the change breaks agreement with running LBs.
    #[test]
    fn stable_output() {
        assert_eq!(hash64(0, 1, b""), 16995224125412211392);
        assert_eq!(hash64(0x5eed, 2, b"10.0.0.1:80"), 3028509004327749409);
        let few = names(3);
        let t = build(7, &inputs(&few, &[1, 2, 3]), 13).unwrap();
        assert_eq!(t, [2, 2, 2, 1, 1, 0, 0, 1, 2, 1, 2, 2, 2]);
        let names = names(100);
        let t = build(SEED, &inputs(&names, &assorted_weights(100)), M).unwrap();
        let digest = t
            .iter()
            .fold(0u64, |h, &e| h.wrapping_mul(31).wrapping_add(e.into()));
        assert_eq!(digest, 9579228493232964347);
    }

    /// The textbook algorithm, slowly: same quotas and hash, but each turn found by a
    /// linear scan for the smallest `(2 * placed + 1) / (2 * weight)` and each slot by
    /// walking the permutation. `build`'s bucketed schedule and endgame must match it.
    fn reference(seed: u32, backends: &[MaglevInput<'_>], m: u32) -> Vec<u32> {
        let mut order: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .collect();
        order.sort_by_key(|&i| backends[i].name);
        let weights: Vec<u32> = order.iter().map(|&i| backends[i].weight).collect();
        let quota = apportion(m, &weights);
        let m64 = u64::from(m);
        let mut next: Vec<u64> = order
            .iter()
            .map(|&i| hash64(seed, 1, backends[i].name) % m64)
            .collect();
        let skip: Vec<u64> = order
            .iter()
            .map(|&i| hash64(seed, 2, backends[i].name) % (m64 - 1) + 1)
            .collect();
        let mut placed = vec![0u32; order.len()];
        let mut table = vec![None; m as usize];
        for _ in 0..m {
            let time = |p: usize| (2 * u128::from(placed[p]) + 1, u128::from(weights[p]));
            let p = (0..order.len())
                .filter(|&p| placed[p] < quota[p])
                .min_by(|&a, &b| {
                    let ((na, wa), (nb, wb)) = (time(a), time(b));
                    (na * wb).cmp(&(nb * wa))
                })
                .unwrap();
            loop {
                let slot = next[p] as usize;
                next[p] = (next[p] + skip[p]) % m64;
                if table[slot].is_none() {
                    table[slot] = Some(order[p] as u32);
                    break;
                }
            }
            placed[p] += 1;
        }
        table.into_iter().map(Option::unwrap).collect()
    }

    #[test]
    fn matches_reference() {
        let mut rng = Rng(7);
        let names = names(300);
        for m in [2, 3, 5, 13, 101, 251, 1009, 4099, 65537] {
            for case in 0..6 {
                let n = 1 + rng.below(u64::from(m.min(if m > 5000 { 60 } else { 300 }))) as usize;
                let weights: Vec<u32> = (0..n)
                    .map(|_| match case {
                        0 => 1,
                        1 => rng.below(100) + 1,
                        2 => rng.below(4), // some zeros
                        3 => [1, u32::MAX][rng.below(2) as usize],
                        _ => rng.next() as u32 | 1,
                    })
                    .collect();
                let input = inputs(&names[..n], &weights);
                let seed = rng.next() as u32;
                let Ok(table) = build(seed, &input, m) else {
                    panic!("m={m} case {case}")
                };
                if weights.iter().all(|&w| w == 0) {
                    assert!(table.is_empty());
                    continue;
                }
                assert_eq!(table, reference(seed, &input, m), "m={m} case {case} n={n}");
            }
        }
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..60).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            small,
            [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59]
        );
        assert!(is_prime(65537) && is_prime(4_294_967_291) && is_prime(65521));
        assert!(!is_prime(65536) && !is_prime(65521 * 65519) && !is_prime(u32::MAX));
        assert_eq!(next_prime(0), 2);
        assert_eq!(next_prime(65536), 65537);
        assert_eq!(next_prime(65537), 65537);
        assert_eq!(next_prime(4_294_967_280), 4_294_967_291);
    }
}
