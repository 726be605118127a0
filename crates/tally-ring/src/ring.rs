//! The consistent-hash ring and the value types it hands out.

use crate::error::RingError;
use crate::hashing::{idempotency_stripe, key_hash, token_hash};

/// Virtual nodes per unit of weight used unless configured otherwise.
///
/// With `v` virtual nodes per node and three equal nodes, the standard
/// deviation of each node's owned share is about `1 / (3 * sqrt(v))`; at 4096
/// that is about 0.5 percentage points, so every node stays within
/// 33.3% ± 3 points with overwhelming probability. The cost is small: a
/// token takes 12 bytes (a `u64` value and a `u32` node index), and lookup is
/// a binary search, so going from 3 × 64 to 3 × 4096 tokens adds only about
/// six comparisons per lookup.
pub const DEFAULT_VNODES_PER_WEIGHT: u32 = 4096;

/// Upper bound on the virtual nodes of a single node.
///
/// Guards against a typo in a weight (say 40000 instead of 4) silently
/// building a ring of hundreds of millions of tokens. A million tokens per
/// node is far past the point where more tokens improve balance.
pub const MAX_VNODES_PER_NODE: u32 = 1_000_000;

/// A member as configured: its id and its relative weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Unique, non-empty node id. It is hashed to place the node's tokens,
    /// so renaming a node moves its data even if its address stays the same.
    pub id: String,
    /// Relative capacity; a node of weight 2 owns about twice the hash space
    /// of a node of weight 1. Must be at least 1.
    pub weight: u32,
}

/// A member as placed on a built [`Ring`].
#[derive(Debug, Clone, PartialEq)]
pub struct RingNode {
    /// The node id, as given in its [`NodeSpec`].
    pub id: String,
    /// The node weight, as given in its [`NodeSpec`].
    pub weight: u32,
    /// Number of virtual nodes (tokens): `vnodes_per_weight * weight`.
    pub vnodes: u32,
    /// Share of the 64-bit hash space this node owns, in `0.0 ..= 1.0`. The
    /// shares of all nodes of a ring sum to 1.
    pub owned_fraction: f64,
}

/// Where one stripe of a counter lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripePlacement {
    /// The stripe number.
    pub stripe: u32,
    /// The stripe's position on the ring, [`key_hash`]`(counter, stripe)`.
    pub hash: u64,
    /// Index into [`Ring::nodes`] of the owning node.
    pub node_index: usize,
}

/// An immutable consistent-hash ring built from a membership list.
///
/// See the [crate documentation](crate) for the exact placement rules and the
/// in-memory layout.
#[derive(Debug, Clone)]
pub struct Ring {
    nodes: Vec<RingNode>,
    tokens: Vec<u64>,
    token_nodes: Vec<u32>,
    vnodes_per_weight: u32,
}

impl Ring {
    /// Builds the ring for `nodes`, giving each `vnodes_per_weight * weight`
    /// virtual nodes.
    ///
    /// Order of `nodes` does not matter: nodes are sorted by id.
    ///
    /// # Errors
    ///
    /// Returns a [`RingError`] if `nodes` is empty, `vnodes_per_weight` is 0,
    /// or any node has an empty or duplicate id, a weight of 0, or more than
    /// [`MAX_VNODES_PER_NODE`] virtual nodes. Checks run in id order, so the
    /// error reported does not depend on the order of `nodes`.
    pub fn new(nodes: &[NodeSpec], vnodes_per_weight: u32) -> Result<Ring, RingError> {
        if nodes.is_empty() {
            return Err(RingError::NoNodes);
        }
        if vnodes_per_weight == 0 {
            return Err(RingError::ZeroVnodes);
        }

        let mut sorted_specs: Vec<&NodeSpec> = nodes.iter().collect();
        sorted_specs.sort_unstable_by(|left, right| left.id.cmp(&right.id));

        let mut ring_nodes = Vec::with_capacity(sorted_specs.len());
        for (position, spec) in sorted_specs.iter().enumerate() {
            if spec.id.is_empty() {
                return Err(RingError::EmptyNodeId);
            }
            // Sorted order puts equal ids next to each other.
            if position > 0 && sorted_specs[position - 1].id == spec.id {
                return Err(RingError::DuplicateNodeId(spec.id.clone()));
            }
            if spec.weight == 0 {
                return Err(RingError::ZeroWeight(spec.id.clone()));
            }
            let vnodes = u64::from(vnodes_per_weight) * u64::from(spec.weight);
            let vnodes = match u32::try_from(vnodes) {
                Ok(vnodes) if vnodes <= MAX_VNODES_PER_NODE => vnodes,
                _ => {
                    return Err(RingError::TooManyVnodes {
                        node_id: spec.id.clone(),
                        vnodes,
                        limit: MAX_VNODES_PER_NODE,
                    })
                }
            };
            ring_nodes.push(RingNode {
                id: spec.id.clone(),
                weight: spec.weight,
                vnodes,
                owned_fraction: 0.0,
            });
        }

        let total_vnodes: usize = ring_nodes.iter().map(|node| node.vnodes as usize).sum();
        let mut token_pairs: Vec<(u64, u32)> = Vec::with_capacity(total_vnodes);
        for (node_index, node) in ring_nodes.iter().enumerate() {
            // Each node already holds up to a million tokens of 12 bytes, so
            // four billion nodes could never fit in memory in the first place.
            let node_index = u32::try_from(node_index).expect("fewer than 2^32 nodes");
            token_pairs.extend(
                (0..node.vnodes).map(|vnode_index| (token_hash(&node.id, vnode_index), node_index)),
            );
        }
        // Node indices follow id order, so sorting by (token, node index) is
        // the specified (token, node id) order. Equal pairs are identical, so
        // an unstable sort is still deterministic.
        token_pairs.sort_unstable();

        let tokens: Vec<u64> = token_pairs.iter().map(|&(token, _)| token).collect();
        let token_nodes: Vec<u32> = token_pairs.iter().map(|&(_, node)| node).collect();
        drop(token_pairs);

        let fractions = owned_fractions(&tokens, &token_nodes, ring_nodes.len());
        for (node, fraction) in ring_nodes.iter_mut().zip(fractions) {
            node.owned_fraction = fraction;
        }

        Ok(Ring {
            nodes: ring_nodes,
            tokens,
            token_nodes,
            vnodes_per_weight,
        })
    }

    /// The members, sorted by id, with their owned fractions filled in.
    ///
    /// Node indices returned by the other methods index into this slice.
    #[must_use]
    pub fn nodes(&self) -> &[RingNode] {
        &self.nodes
    }

    /// Index into [`Ring::nodes`] of the node with id `node_id`, if it is a
    /// member.
    #[must_use]
    pub fn node_index(&self, node_id: &str) -> Option<usize> {
        self.nodes
            .binary_search_by(|node| node.id.as_str().cmp(node_id))
            .ok()
    }

    /// The `vnodes_per_weight` the ring was built with.
    #[must_use]
    pub fn vnodes_per_weight(&self) -> u32 {
        self.vnodes_per_weight
    }

    /// Total number of tokens (virtual nodes) on the ring.
    #[must_use]
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Index of the node that owns `hash`: the node of the first token
    /// `>= hash`, wrapping around to the first token.
    #[inline]
    #[must_use]
    pub fn owner_of_hash(&self, hash: u64) -> usize {
        self.token_nodes[self.first_token_at_or_after(hash)] as usize
    }

    /// Index of the node that owns stripe `stripe` of counter `counter`.
    #[inline]
    #[must_use]
    pub fn owner(&self, counter: &str, stripe: u32) -> usize {
        self.owner_of_hash(key_hash(counter, stripe))
    }

    /// Index into [`Ring::nodes`] of the node that applies increments of
    /// `counter` carrying `idempotency_key` (and so remembers the key), with
    /// `stripes` stripes per counter.
    #[must_use]
    pub fn key_owner(&self, counter: &str, idempotency_key: &str, stripes: u32) -> usize {
        self.owner(counter, idempotency_stripe(idempotency_key, stripes))
    }

    /// One number for where every idempotency key lives: two rings with
    /// `stripes` stripes have the same stamp exactly when they place every
    /// key on the same node id (up to hash collisions). It covers the
    /// members' ids and weights, `vnodes_per_weight` and `stripes`, not
    /// addresses. Never 0, which stands for "no membership".
    ///
    /// `XXH3_64(seed = 0)` of, in id order, `id length as 4 little-endian
    /// bytes ++ id ++ weight as 4 little-endian bytes` per node, then
    /// `vnodes_per_weight` and `stripes` as 4 little-endian bytes each.
    #[must_use]
    pub fn keyed_stamp(&self, stripes: u32) -> u64 {
        let mut bytes = Vec::new();
        for node in &self.nodes {
            bytes.extend_from_slice(&(node.id.len() as u32).to_le_bytes());
            bytes.extend_from_slice(node.id.as_bytes());
            bytes.extend_from_slice(&node.weight.to_le_bytes());
        }
        bytes.extend_from_slice(&self.vnodes_per_weight.to_le_bytes());
        bytes.extend_from_slice(&stripes.to_le_bytes());
        xxhash_rust::xxh3::xxh3_64(&bytes).max(1)
    }

    /// Distinct nodes clockwise from `hash`, starting with its owner; each
    /// node once.
    ///
    /// Yields every member exactly once, in the order a replica or failover
    /// target should be picked: the first item is [`Ring::owner_of_hash`],
    /// the next is the owner of the first token further along that belongs
    /// to a different node, and so on.
    pub fn successors(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        Successors {
            ring: self,
            next_position: self.first_token_at_or_after(hash),
            tokens_left: self.tokens.len(),
            seen: vec![false; self.nodes.len()],
            nodes_left: self.nodes.len(),
        }
    }

    /// Placement of stripes `0 .. stripes` of `counter`, in stripe order.
    #[must_use]
    pub fn locate(&self, counter: &str, stripes: u32) -> Vec<StripePlacement> {
        (0..stripes)
            .map(|stripe| {
                let hash = key_hash(counter, stripe);
                StripePlacement {
                    stripe,
                    hash,
                    node_index: self.owner_of_hash(hash),
                }
            })
            .collect()
    }

    /// Position in `tokens` of the token that owns `hash`.
    #[inline]
    fn first_token_at_or_after(&self, hash: u64) -> usize {
        let position = self.tokens.partition_point(|&token| token < hash);
        if position == self.tokens.len() {
            0
        } else {
            position
        }
    }
}

/// Owned fraction of each node, indexed by node index.
///
/// `tokens` must be sorted and non-empty.
fn owned_fractions(tokens: &[u64], token_nodes: &[u32], node_count: usize) -> Vec<f64> {
    const HASH_SPACE: u128 = 1 << 64;

    // Summing exact integer arcs and dividing once keeps the fractions'
    // total within rounding of 1, where summing per-token f64 shares would
    // accumulate error over millions of tokens.
    let mut owned_hashes = vec![0_u128; node_count];
    let first = tokens[0];
    let last = tokens[tokens.len() - 1];
    // The wrap-around arc runs from after the last token through the first
    // one. Written as 2^64 minus the span it also covers a ring whose tokens
    // are all equal (including a single token), which owns all 2^64 hashes.
    owned_hashes[token_nodes[0] as usize] += HASH_SPACE - u128::from(last - first);
    for position in 1..tokens.len() {
        let arc = tokens[position] - tokens[position - 1];
        owned_hashes[token_nodes[position] as usize] += u128::from(arc);
    }

    owned_hashes
        .into_iter()
        .map(|hashes| hashes as f64 / HASH_SPACE as f64)
        .collect()
}

/// Iterator behind [`Ring::successors`].
struct Successors<'ring> {
    ring: &'ring Ring,
    next_position: usize,
    tokens_left: usize,
    seen: Vec<bool>,
    nodes_left: usize,
}

impl Iterator for Successors<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        // Stopping once every node has been seen avoids walking the rest of
        // the (possibly millions of) tokens for nothing.
        while self.nodes_left > 0 && self.tokens_left > 0 {
            let node_index = self.ring.token_nodes[self.next_position] as usize;
            self.next_position += 1;
            if self.next_position == self.ring.tokens.len() {
                self.next_position = 0;
            }
            self.tokens_left -= 1;
            if !self.seen[node_index] {
                self.seen[node_index] = true;
                self.nodes_left -= 1;
                return Some(node_index);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Every node has at least one token, so all remaining nodes will be
        // found before the tokens run out.
        (self.nodes_left, Some(self.nodes_left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, weight: u32) -> NodeSpec {
        NodeSpec {
            id: id.to_owned(),
            weight,
        }
    }

    fn three_equal_nodes() -> Vec<NodeSpec> {
        vec![spec("node-c", 1), spec("node-a", 1), spec("node-b", 1)]
    }

    #[test]
    fn the_keyed_stamp_changes_exactly_with_where_keys_go() {
        let ring = Ring::new(&three_equal_nodes(), 64).unwrap();
        let stamp = ring.keyed_stamp(16);
        assert_ne!(stamp, 0);
        // The input order does not matter.
        let mut reordered = three_equal_nodes();
        reordered.reverse();
        assert_eq!(Ring::new(&reordered, 64).unwrap().keyed_stamp(16), stamp);
        // Every input of placement does.
        assert_ne!(ring.keyed_stamp(17), stamp);
        assert_ne!(
            Ring::new(&three_equal_nodes(), 65).unwrap().keyed_stamp(16),
            stamp
        );
        let mut heavier = three_equal_nodes();
        heavier[0].weight = 2;
        assert_ne!(Ring::new(&heavier, 64).unwrap().keyed_stamp(16), stamp);
        let mut grown = three_equal_nodes();
        grown.push(spec("node-d", 1));
        assert_ne!(Ring::new(&grown, 64).unwrap().keyed_stamp(16), stamp);
        // Ids are length-prefixed: "ab" + "c" is not "a" + "bc".
        let split = |left: &str, right: &str| {
            Ring::new(&[spec(left, 1), spec(right, 1)], 8)
                .unwrap()
                .keyed_stamp(4)
        };
        assert_ne!(split("ab", "c"), split("a", "bc"));
    }

    #[test]
    fn a_key_is_owned_where_its_stripe_is() {
        let ring = Ring::new(&three_equal_nodes(), 64).unwrap();
        for request in 0..100 {
            let key = format!("request-{request}");
            let stripe = idempotency_stripe(&key, 16);
            assert_eq!(
                ring.key_owner("likes", &key, 16),
                ring.owner("likes", stripe)
            );
        }
    }

    #[test]
    fn empty_membership_is_rejected() {
        assert_eq!(
            Ring::new(&[], DEFAULT_VNODES_PER_WEIGHT).unwrap_err(),
            RingError::NoNodes
        );
    }

    #[test]
    fn zero_vnodes_per_weight_is_rejected() {
        assert_eq!(
            Ring::new(&three_equal_nodes(), 0).unwrap_err(),
            RingError::ZeroVnodes
        );
    }

    #[test]
    fn duplicate_node_id_is_rejected() {
        let nodes = vec![spec("node-a", 1), spec("node-b", 1), spec("node-a", 2)];
        assert_eq!(
            Ring::new(&nodes, 16).unwrap_err(),
            RingError::DuplicateNodeId("node-a".to_owned())
        );
    }

    #[test]
    fn zero_weight_is_rejected() {
        let nodes = vec![spec("node-a", 1), spec("node-b", 0)];
        assert_eq!(
            Ring::new(&nodes, 16).unwrap_err(),
            RingError::ZeroWeight("node-b".to_owned())
        );
    }

    #[test]
    fn empty_node_id_is_rejected() {
        let nodes = vec![spec("node-a", 1), spec("", 1)];
        assert_eq!(Ring::new(&nodes, 16).unwrap_err(), RingError::EmptyNodeId);
    }

    #[test]
    fn too_many_vnodes_is_rejected() {
        let nodes = vec![spec("node-a", 1), spec("node-b", 245)];
        assert_eq!(
            Ring::new(&nodes, DEFAULT_VNODES_PER_WEIGHT).unwrap_err(),
            RingError::TooManyVnodes {
                node_id: "node-b".to_owned(),
                vnodes: 245 * 4096,
                limit: MAX_VNODES_PER_NODE,
            }
        );
    }

    #[test]
    fn vnodes_beyond_u32_are_reported_exactly() {
        let nodes = vec![spec("node-a", u32::MAX)];
        assert_eq!(
            Ring::new(&nodes, u32::MAX).unwrap_err(),
            RingError::TooManyVnodes {
                node_id: "node-a".to_owned(),
                vnodes: u64::from(u32::MAX) * u64::from(u32::MAX),
                limit: MAX_VNODES_PER_NODE,
            }
        );
    }

    #[test]
    fn exactly_the_vnode_limit_is_accepted() {
        let nodes = vec![spec("node-a", 1)];
        let ring = Ring::new(&nodes, MAX_VNODES_PER_NODE).unwrap();
        assert_eq!(ring.token_count(), MAX_VNODES_PER_NODE as usize);
    }

    #[test]
    fn error_does_not_depend_on_input_order() {
        let forward = vec![spec("node-b", 0), spec("node-a", 0)];
        let backward = vec![spec("node-a", 0), spec("node-b", 0)];
        assert_eq!(
            Ring::new(&forward, 16).unwrap_err(),
            RingError::ZeroWeight("node-a".to_owned())
        );
        assert_eq!(
            Ring::new(&backward, 16).unwrap_err(),
            Ring::new(&forward, 16).unwrap_err()
        );
    }

    #[test]
    fn error_messages_are_lowercase_without_trailing_period() {
        let errors = [
            RingError::NoNodes,
            RingError::DuplicateNodeId("node-a".to_owned()),
            RingError::ZeroWeight("node-a".to_owned()),
            RingError::ZeroVnodes,
            RingError::TooManyVnodes {
                node_id: "node-a".to_owned(),
                vnodes: 2_000_000,
                limit: MAX_VNODES_PER_NODE,
            },
            RingError::EmptyNodeId,
        ];
        for error in errors {
            let message = error.to_string();
            assert!(message.starts_with(|first: char| first.is_lowercase()));
            assert!(!message.ends_with('.'));
        }
        assert_eq!(
            RingError::TooManyVnodes {
                node_id: "node-a".to_owned(),
                vnodes: 2_000_000,
                limit: MAX_VNODES_PER_NODE,
            }
            .to_string(),
            "node \"node-a\" would have 2000000 vnodes, more than the limit of 1000000"
        );
    }

    #[test]
    fn nodes_are_sorted_by_id_with_vnode_counts() {
        let nodes = vec![spec("node-c", 1), spec("node-a", 3), spec("node-b", 2)];
        let ring = Ring::new(&nodes, 8).unwrap();
        let ids: Vec<&str> = ring.nodes().iter().map(|node| node.id.as_str()).collect();
        assert_eq!(ids, ["node-a", "node-b", "node-c"]);
        let vnodes: Vec<u32> = ring.nodes().iter().map(|node| node.vnodes).collect();
        assert_eq!(vnodes, [24, 16, 8]);
        assert_eq!(ring.token_count(), 48);
        assert_eq!(ring.vnodes_per_weight(), 8);
        assert_eq!(ring.node_index("node-b"), Some(1));
        assert_eq!(ring.node_index("node-z"), None);
    }

    #[test]
    fn tokens_are_sorted_and_match_token_hash() {
        let ring = Ring::new(&three_equal_nodes(), 64).unwrap();
        assert!(ring.tokens.windows(2).all(|pair| pair[0] <= pair[1]));
        for (&token, &node_index) in ring.tokens.iter().zip(&ring.token_nodes) {
            let node = &ring.nodes()[node_index as usize];
            assert!((0..node.vnodes).any(|vnode_index| token_hash(&node.id, vnode_index) == token));
        }
    }

    #[test]
    fn owner_is_first_token_at_or_after_hash() {
        let ring = Ring::new(&three_equal_nodes(), 64).unwrap();
        for position in 0..ring.tokens.len() {
            let token = ring.tokens[position];
            let expected = ring.token_nodes[position] as usize;
            assert_eq!(ring.owner_of_hash(token), expected);
            if position > 0 && ring.tokens[position - 1] < token - 1 {
                assert_eq!(ring.owner_of_hash(token - 1), expected);
            }
        }
    }

    #[test]
    fn hash_beyond_the_largest_token_wraps_to_the_first_token() {
        let ring = Ring::new(&three_equal_nodes(), 64).unwrap();
        let first_owner = ring.token_nodes[0] as usize;
        let largest = *ring.tokens.last().unwrap();
        assert!(
            largest < u64::MAX,
            "astronomically unlikely for this fixed ring"
        );
        assert_eq!(ring.owner_of_hash(largest + 1), first_owner);
        assert_eq!(ring.owner_of_hash(u64::MAX), first_owner);
        assert_eq!(ring.owner_of_hash(0), first_owner);
        assert_eq!(ring.owner_of_hash(ring.tokens[0]), first_owner);
    }

    #[test]
    fn owner_matches_owner_of_key_hash() {
        let ring = Ring::new(&three_equal_nodes(), 64).unwrap();
        for stripe in 0..32 {
            assert_eq!(
                ring.owner("requests", stripe),
                ring.owner_of_hash(key_hash("requests", stripe))
            );
        }
    }

    #[test]
    fn successors_yield_each_node_once_starting_with_the_owner() {
        let nodes: Vec<NodeSpec> = (0..7)
            .map(|number| spec(&format!("node-{number}"), 1))
            .collect();
        let ring = Ring::new(&nodes, 32).unwrap();
        for sample in 0..200_u64 {
            let hash = sample.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let successors: Vec<usize> = ring.successors(hash).collect();
            assert_eq!(successors.len(), 7);
            assert_eq!(successors[0], ring.owner_of_hash(hash));
            let mut sorted = successors.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        }
    }

    #[test]
    fn successors_follow_token_order() {
        let ring = Ring::new(&three_equal_nodes(), 64).unwrap();
        let hash = ring.tokens[10];
        let mut expected = Vec::new();
        for offset in 0..ring.tokens.len() {
            let node_index = ring.token_nodes[(10 + offset) % ring.tokens.len()] as usize;
            if !expected.contains(&node_index) {
                expected.push(node_index);
            }
        }
        assert_eq!(ring.successors(hash).collect::<Vec<_>>(), expected);
        assert_eq!(ring.successors(hash).size_hint(), (3, Some(3)));
    }

    #[test]
    fn successors_of_a_single_node_ring() {
        let ring = Ring::new(&[spec("solo", 1)], 1).unwrap();
        assert_eq!(ring.successors(12345).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn locate_returns_one_placement_per_stripe_in_order() {
        let ring = Ring::new(&three_equal_nodes(), 64).unwrap();
        let placements = ring.locate("requests", 16);
        assert_eq!(placements.len(), 16);
        for (expected_stripe, placement) in (0..16).zip(&placements) {
            assert_eq!(placement.stripe, expected_stripe);
            assert_eq!(placement.hash, key_hash("requests", expected_stripe));
            assert_eq!(
                placement.node_index,
                ring.owner("requests", expected_stripe)
            );
        }
        assert!(ring.locate("requests", 0).is_empty());
    }

    #[test]
    fn single_node_owns_everything() {
        for vnodes_per_weight in [1, 7, DEFAULT_VNODES_PER_WEIGHT] {
            let ring = Ring::new(&[spec("solo", 1)], vnodes_per_weight).unwrap();
            assert_eq!(ring.nodes()[0].owned_fraction, 1.0);
            assert_eq!(ring.owner_of_hash(0), 0);
            assert_eq!(ring.owner_of_hash(u64::MAX), 0);
        }
    }

    #[test]
    fn owned_fractions_handle_degenerate_token_sets() {
        // All tokens equal: the first one owns the whole space.
        assert_eq!(owned_fractions(&[42, 42, 42], &[1, 0, 1], 2), [0.0, 1.0]);
        // Tokens at the extremes of the space: the wrap-around arc of the
        // token at 0 holds hash 0 alone.
        let fractions = owned_fractions(&[0, u64::MAX], &[0, 1], 2);
        assert_eq!(fractions[0], 1.0 / 2.0_f64.powi(64));
        assert!((fractions[1] - 1.0).abs() < 1e-15);
        // Two tokens splitting the space in half.
        assert_eq!(
            owned_fractions(&[1 << 63, u64::MAX], &[0, 1], 2),
            [0.5, 0.5]
        );
    }

    #[test]
    fn owned_fractions_sum_to_one() {
        let nodes = vec![spec("node-a", 1), spec("node-b", 2), spec("node-c", 5)];
        let ring = Ring::new(&nodes, DEFAULT_VNODES_PER_WEIGHT).unwrap();
        let total: f64 = ring.nodes().iter().map(|node| node.owned_fraction).sum();
        assert!((total - 1.0).abs() < 1e-9, "total {total}");
    }

    #[test]
    fn equal_nodes_own_about_a_third_each() {
        let ring = Ring::new(&three_equal_nodes(), DEFAULT_VNODES_PER_WEIGHT).unwrap();
        for node in ring.nodes() {
            assert!(
                (node.owned_fraction - 1.0 / 3.0).abs() < 0.03,
                "{} owns {}",
                node.id,
                node.owned_fraction
            );
        }
    }

    #[test]
    fn weight_two_owns_about_twice_weight_one() {
        let nodes = vec![spec("light", 1), spec("heavy", 2)];
        let ring = Ring::new(&nodes, DEFAULT_VNODES_PER_WEIGHT).unwrap();
        let heavy = &ring.nodes()[ring.node_index("heavy").unwrap()];
        let light = &ring.nodes()[ring.node_index("light").unwrap()];
        assert_eq!(heavy.vnodes, 2 * light.vnodes);
        let ratio = heavy.owned_fraction / light.owned_fraction;
        assert!((ratio - 2.0).abs() < 0.15, "ratio {ratio}");
        assert!((heavy.owned_fraction - 2.0 / 3.0).abs() < 0.03);
    }

    #[test]
    fn input_order_does_not_change_the_ring() {
        let forward = three_equal_nodes();
        let mut backward = forward.clone();
        backward.reverse();
        let forward_ring = Ring::new(&forward, 64).unwrap();
        let backward_ring = Ring::new(&backward, 64).unwrap();
        assert_eq!(forward_ring.nodes(), backward_ring.nodes());
        assert_eq!(forward_ring.tokens, backward_ring.tokens);
        assert_eq!(forward_ring.token_nodes, backward_ring.token_nodes);
    }
}
