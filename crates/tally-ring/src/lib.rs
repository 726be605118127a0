//! Consistent-hash ring and stripe placement for Tally.
//!
//! Every Tally counter is split into stripes so that hot counters spread their
//! increments over several shard nodes. This crate decides which node owns each
//! `(counter, stripe)` pair. It is pure logic: no I/O, no async, no clock, no
//! randomness. Two processes given the same membership always compute the same
//! placement, which is what lets the coordinator, the shards and the CLI agree
//! without talking to each other.
//!
//! # Hashing specification
//!
//! The placement is fully determined by the rules below, so a tool written in
//! another language can reproduce it exactly. All hashes are XXH3 64-bit
//! (`XXH3_64bits_withSeed` in the reference C library), all integers are
//! unsigned 64-bit, and all strings are hashed as their UTF-8 bytes with no
//! terminator or length prefix.
//!
//! 1. **Key hash.** The position of stripe `stripe` (a `u32`) of counter
//!    `counter` is `XXH3_64(counter ++ stripe as 4 little-endian bytes,
//!    seed = 0)`. See [`key_hash`].
//! 2. **Tokens.** A node with weight `w` gets `vnodes_per_weight * w` virtual
//!    nodes with indices `0 .. vnodes_per_weight * w`. Virtual node `i` of node
//!    `id` sits at `XXH3_64(id ++ i as 4 little-endian bytes, seed =
//!    TOKEN_SEED)` where [`TOKEN_SEED`] is `0x7461_6c6c_7900_0000` ("tally"
//!    in ASCII), so tokens and keys never share a hash function even when a
//!    node id equals a counter name. See [`token_hash`].
//! 3. **Node order.** Nodes are sorted by id in byte-wise lexicographic order;
//!    a node's index is its position in that order. The order of the input
//!    list never matters.
//! 4. **Token order.** Tokens are sorted by `(token value, node index)`. Equal
//!    token values are astronomically unlikely, and this tie-break keeps the
//!    order deterministic whenever they occur.
//! 5. **Ownership.** The owner of hash `h` is the node of the first token whose
//!    value is `>= h`. If every token is `< h`, the owner is the node of the
//!    first token (the ring wraps around). See [`Ring::owner_of_hash`].
//! 6. **Owned fraction.** Each token owns the arc from the previous token
//!    (exclusive) to itself (inclusive); the first token's arc wraps around
//!    from the last token, so it is `2^64 - (last - first)` hashes long. A
//!    node's owned fraction is the sum of its tokens' arcs divided by `2^64`.
//!    A ring whose tokens all share one value therefore gives the whole space
//!    to the first token, and a single token owns a fraction of exactly 1.
//! 7. **Idempotency stripe.** An increment carrying an idempotency key is
//!    applied to stripe `XXH3_64(key, seed = 0) % stripes`, so retries of the
//!    same request always land on the same stripe. See [`idempotency_stripe`].
//!
//! Why the index is appended rather than used as the seed: for inputs of 1
//! to 3 bytes XXH3 combines only the first, middle and last byte with the
//! seed, and does so weakly, so short node ids that share those bytes (`"n1"`
//! and `"n12"`) got mostly identical tokens and one took the other's share.
//! Appending 4 bytes makes every input at least 5 bytes long, which goes
//! through XXH3's full mixing; any node id and any counter name spread well.
//!
//! Reference values, useful to check another implementation (they agree with
//! the reference C library as wrapped by Python's `xxhash` package):
//!
//! | call                                        | value                |
//! |---------------------------------------------|----------------------|
//! | `key_hash("requests", 0)`                   | `0xacf39e68edb7c227` |
//! | `key_hash("requests", 7)`                   | `0x0ec59770d27d97d0` |
//! | `token_hash("node-a", 0)`                   | `0x62511c5a66ff28fd` |
//! | `token_hash("node-a", 4095)`                | `0x21ccf0ffb3389a70` |
//! | `idempotency_stripe("request-42", 16)`      | `7`                  |
//!
//! # Layout
//!
//! A [`Ring`] holds:
//!
//! - `nodes`: one [`RingNode`] per member, sorted by id, each carrying its
//!   weight, its number of virtual nodes and its owned fraction (computed once
//!   when the ring is built);
//! - `tokens`: every virtual node's token value, sorted, in a flat `Vec<u64>`;
//! - `token_nodes`: a parallel `Vec<u32>` holding the node index of each token.
//!
//! Keeping token values apart from node indices means the binary search on the
//! increment hot path only touches a dense array of `u64`, which is kinder to
//! the cache than an array of `(u64, u32)` pairs padded to 16 bytes. The ring
//! is immutable: a membership change builds a new ring.
//!
//! The crate is split into [`hashing`] (the hash functions and their
//! constants), [`ring`] (the ring itself and its value types) and [`error`]
//! (the construction errors); everything public is re-exported at the root.
//!
//! # Examples
//!
//! ```
//! use tally_ring::{NodeSpec, Ring, DEFAULT_VNODES_PER_WEIGHT};
//!
//! let nodes = vec![
//!     NodeSpec { id: "node-a".to_owned(), weight: 1 },
//!     NodeSpec { id: "node-b".to_owned(), weight: 1 },
//!     NodeSpec { id: "node-c".to_owned(), weight: 2 },
//! ];
//! let ring = Ring::new(&nodes, DEFAULT_VNODES_PER_WEIGHT)?;
//!
//! // Each stripe of a counter is placed independently.
//! let placements = ring.locate("requests", 4);
//! assert_eq!(placements.len(), 4);
//! for placement in &placements {
//!     let owner = &ring.nodes()[placement.node_index];
//!     assert_eq!(ring.owner("requests", placement.stripe), placement.node_index);
//!     println!("stripe {} lives on {}", placement.stripe, owner.id);
//! }
//!
//! // The weight-2 node owns roughly half of the hash space.
//! let heavy = ring.node_index("node-c").expect("node-c is a member");
//! assert!((ring.nodes()[heavy].owned_fraction - 0.5).abs() < 0.05);
//! # Ok::<(), tally_ring::RingError>(())
//! ```

#![deny(missing_docs)]

pub mod error;
pub mod hashing;
pub mod ring;

pub use error::RingError;
pub use hashing::{idempotency_stripe, key_hash, token_hash, TOKEN_SEED};
pub use ring::{
    NodeSpec, Ring, RingNode, StripePlacement, DEFAULT_VNODES_PER_WEIGHT, MAX_VNODES_PER_NODE,
};
