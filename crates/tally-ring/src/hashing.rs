//! The hash functions that define placement.
//!
//! These functions are the wire-level contract of the ring: changing any of
//! them moves every counter to a different node, so they are specified in the
//! crate documentation and pinned by reference-value tests.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3};

/// Seed of virtual-node tokens: "tally" in ASCII in the high five bytes.
///
/// Keys are hashed with seed 0 and tokens with this seed, so a node id that
/// happens to equal a counter name still hashes to unrelated positions.
pub const TOKEN_SEED: u64 = 0x7461_6c6c_7900_0000;

/// Longest name hashed in one call from a stack buffer; longer ones (never
/// seen in Tally, which caps counter names at 256 bytes) use the streaming
/// hasher, which gives the same value.
const STACK_HASH_BYTES: usize = 512;

/// XXH3_64 of `name` followed by `suffix` as 4 little-endian bytes.
///
/// Why a suffix rather than a seed per stripe or vnode: for inputs of 1 to 3
/// bytes XXH3 only mixes the first, middle and last byte with the seed, so
/// short names that differ in one byte got mostly identical tokens (node
/// ids "n1" and "n12" shared 3,786 of 4,096). Appending 4 bytes makes every
/// input at least 5 bytes long, which goes through XXH3's full mixing.
#[inline]
fn hash_with_suffix(name: &str, suffix: u32, seed: u64) -> u64 {
    let name = name.as_bytes();
    let suffix = suffix.to_le_bytes();
    // An ArrayVec, not a zeroed array: zeroing 512 bytes per call cost more
    // than hashing a short name.
    let mut buffer = arrayvec::ArrayVec::<u8, STACK_HASH_BYTES>::new();
    if buffer.try_extend_from_slice(name).is_ok() && buffer.try_extend_from_slice(&suffix).is_ok() {
        xxh3_64_with_seed(&buffer, seed)
    } else {
        let mut hasher = Xxh3::with_seed(seed);
        hasher.update(name);
        hasher.update(&suffix);
        hasher.digest()
    }
}

/// Position on the ring of stripe `stripe` of counter `counter`.
///
/// Defined as `XXH3_64(counter bytes ++ stripe as u32 little-endian, seed = 0)`.
///
/// # Examples
///
/// ```
/// use tally_ring::key_hash;
///
/// // Different stripes of one counter land at unrelated positions.
/// assert_ne!(key_hash("requests", 0), key_hash("requests", 1));
/// assert_eq!(key_hash("requests", 0), key_hash("requests", 0));
/// ```
#[inline]
#[must_use]
pub fn key_hash(counter: &str, stripe: u32) -> u64 {
    hash_with_suffix(counter, stripe, 0)
}

/// Position on the ring of virtual node `vnode_index` of node `node_id`.
///
/// Defined as `XXH3_64(node id bytes ++ vnode_index as u32 little-endian,
/// seed = TOKEN_SEED)`.
#[inline]
#[must_use]
pub fn token_hash(node_id: &str, vnode_index: u32) -> u64 {
    hash_with_suffix(node_id, vnode_index, TOKEN_SEED)
}

/// Stripe that an increment carrying `idempotency_key` is applied to.
///
/// Defined as `XXH3_64(key bytes, seed = 0) % stripes`. Pinning a key to one
/// stripe lets the owning shard deduplicate retries locally, without asking
/// the other stripes whether they have already seen the key.
///
/// `stripes` must be at least 1; debug builds assert it. Release builds treat
/// 0 as 1 and return stripe 0 rather than panicking on the hot path.
///
/// # Examples
///
/// ```
/// use tally_ring::idempotency_stripe;
///
/// let stripe = idempotency_stripe("request-42", 16);
/// assert!(stripe < 16);
/// // Retries of the same request always pick the same stripe.
/// assert_eq!(stripe, idempotency_stripe("request-42", 16));
/// ```
#[inline]
#[must_use]
pub fn idempotency_stripe(idempotency_key: &str, stripes: u32) -> u32 {
    debug_assert!(stripes >= 1, "stripes must be at least 1");
    let stripes = u64::from(stripes.max(1));
    let stripe = xxh3_64(idempotency_key.as_bytes()) % stripes;
    // Cannot truncate: the remainder is below `stripes`, which came from a u32.
    stripe as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_seed_spells_tally() {
        assert_eq!(&TOKEN_SEED.to_be_bytes()[..5], b"tally");
        assert_eq!(&TOKEN_SEED.to_be_bytes()[5..], &[0, 0, 0]);
    }

    #[test]
    fn key_hash_appends_the_stripe() {
        assert_eq!(key_hash("requests", 7), xxh3_64(b"requests\x07\0\0\0"));
        assert_eq!(key_hash("requests", 0), xxh3_64(b"requests\0\0\0\0"));
    }

    #[test]
    fn token_hash_appends_the_index_and_uses_the_token_seed() {
        assert_eq!(
            token_hash("node-a", 5),
            xxh3_64_with_seed(b"node-a\x05\0\0\0", TOKEN_SEED)
        );
        assert_ne!(token_hash("node-a", 0), key_hash("node-a", 0));
    }

    #[test]
    fn long_names_hash_like_short_ones() {
        let long = "x".repeat(STACK_HASH_BYTES * 2);
        let mut bytes = long.clone().into_bytes();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(key_hash(&long, 3), xxh3_64(&bytes));
    }

    #[test]
    fn short_node_ids_get_unrelated_tokens() {
        for (left, right) in [("n1", "n12"), ("a", "aa"), ("ab", "abc")] {
            let left: std::collections::HashSet<u64> =
                (0..4096).map(|index| token_hash(left, index)).collect();
            let shared = (0..4096)
                .filter(|&index| left.contains(&token_hash(right, index)))
                .count();
            assert_eq!(shared, 0, "{left:?} and {right:?}");
        }
    }

    #[test]
    fn reference_values_match_the_crate_documentation() {
        assert_eq!(key_hash("requests", 0), 0x5743_8a24_6a8a_92d9);
        assert_eq!(key_hash("requests", 7), 0x4127_8194_ff53_ae13);
        assert_eq!(token_hash("node-a", 0), 0xbeee_cc2e_9c3c_3805);
        assert_eq!(token_hash("node-a", 4095), 0xa76c_e6d8_cbe5_adf7);
        assert_eq!(idempotency_stripe("request-42", 16), 7);
    }

    #[test]
    fn idempotency_stripe_stays_in_range() {
        for stripes in [1, 2, 3, 7, 16, 1000, u32::MAX] {
            for request in 0..500 {
                let key = format!("request-{request}");
                assert!(idempotency_stripe(&key, stripes) < stripes);
            }
        }
    }

    #[test]
    fn idempotency_stripe_with_one_stripe_is_always_zero() {
        for request in 0..100 {
            assert_eq!(idempotency_stripe(&format!("request-{request}"), 1), 0);
        }
    }

    #[test]
    fn idempotency_stripe_spreads_keys_over_all_stripes() {
        let mut seen = [false; 8];
        for request in 0..1000 {
            let stripe = idempotency_stripe(&format!("request-{request}"), 8);
            seen[stripe as usize] = true;
        }
        assert!(seen.iter().all(|&was_seen| was_seen));
    }
}
