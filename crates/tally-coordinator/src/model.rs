//! The internal hop in the coordinator's own types. The shard client turns
//! them into wire messages and back at its edge (`shard_client::rpc`), once;
//! routing, batching, coalescing and the read merge never see a wire type.

use tally_proto::domain::{CounterName, IdempotencyKey, Increment, ProtocolError};
use tally_proto::pb;

/// How far a node's drain has gone, as the internal protocol defines it:
/// an enum whose order is the order of the states.
pub use tally_proto::pb::DrainState;

/// An increment placed on one stripe of its counter: what a node applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeIncrement {
    /// The counter.
    pub counter: CounterName,
    /// The stripe, below the cluster's `stripes`.
    pub stripe: u32,
    /// Amount to add.
    pub delta: i64,
    /// The client's key: the node applies it once per (counter, key).
    pub key: Option<IdempotencyKey>,
    /// The node whose stripe it is, when another node stands in for it
    /// (its adopter, once a drain handed it over): the stand-in checks the
    /// key against its copy of that node's records.
    pub on_behalf_of: Option<std::sync::Arc<str>>,
    /// With `on_behalf_of`, nonzero: that node is down, and the stand-in
    /// takes over its keyed increments if its copy is at most this old.
    pub takeover_max_copy_age_ms: u64,
    /// Keyed: the membership it was routed by (its keyed placement stamp,
    /// `tally_ring::Ring::keyed_stamp`); a node takes it only when its
    /// keyed increments are open to that membership. 0 without a key.
    pub ring: u64,
}

impl StripeIncrement {
    /// `increment`, placed on `stripe`.
    pub fn new(increment: Increment, stripe: u32) -> Self {
        StripeIncrement {
            counter: increment.counter,
            stripe,
            delta: increment.delta,
            key: increment.idempotency_key,
            on_behalf_of: None,
            takeover_max_copy_age_ms: 0,
            ring: 0,
        }
    }
}

impl From<StripeIncrement> for pb::ShardIncrement {
    fn from(increment: StripeIncrement) -> Self {
        pb::ShardIncrement {
            counter: increment.counter.into_string(),
            stripe: increment.stripe,
            delta: increment.delta,
            idempotency_key: increment
                .key
                .map(IdempotencyKey::into_string)
                .unwrap_or_default(),
            on_behalf_of: increment
                .on_behalf_of
                .map(|node| node.to_string())
                .unwrap_or_default(),
            takeover_max_copy_age_ms: increment.takeover_max_copy_age_ms,
            ring: increment.ring,
        }
    }
}

impl TryFrom<pb::ShardIncrement> for StripeIncrement {
    type Error = ProtocolError;

    fn try_from(increment: pb::ShardIncrement) -> Result<Self, Self::Error> {
        Ok(StripeIncrement {
            counter: CounterName::stored(increment.counter)?,
            stripe: increment.stripe,
            delta: increment.delta,
            key: IdempotencyKey::from_wire(increment.idempotency_key)?,
            on_behalf_of: Some(increment.on_behalf_of)
                .filter(|node| !node.is_empty())
                .map(Into::into),
            takeover_max_copy_age_ms: increment.takeover_max_copy_age_ms,
            ring: increment.ring,
        })
    }
}

/// What became of one increment on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied, and durable by the node's durability mode.
    Applied,
    /// A retry of an idempotency key applied before with the same delta:
    /// nothing applied again; the original is durable.
    Duplicate,
    /// Would take the stored entry out of the i64 range; nothing applied.
    Overflow(StripeIncrement),
    /// The idempotency key was applied to the counter before with another
    /// delta; nothing applied.
    KeyConflict {
        /// This increment.
        increment: StripeIncrement,
        /// The delta applied under the key before.
        recorded_delta: i64,
    },
    /// The node is being drained: nothing applied; send it elsewhere.
    Redirect(StripeIncrement),
    /// A keyed increment the node cannot apply before the restore of its
    /// idempotency records (it started empty); nothing applied.
    AwaitsRestore(StripeIncrement),
    /// The node cannot apply it (it said why); nothing applied.
    Unavailable(String),
    /// Sent to a stand-in whose takeover its owner is reconciling: nothing
    /// applied; send it to the owner.
    OwnerBack(StripeIncrement),
    /// The counter is a window that ended by the node's clock, its grace
    /// included (it said when): nothing applied.
    Expired(String),
    /// A keyed increment of a membership the node's keyed increments are
    /// not open to: nothing applied.
    RingRefused {
        /// This increment.
        increment: StripeIncrement,
        /// The membership the node is open to, or sealed toward (0: none).
        ring: u64,
        /// A change to `ring` is under way on the node.
        sealed: bool,
    },
}

impl TryFrom<pb::ApplyResult> for Outcome {
    type Error = String;

    fn try_from(result: pb::ApplyResult) -> Result<Self, Self::Error> {
        use pb::apply_result::Outcome as Wire;
        let increment = |increment: Option<pb::ShardIncrement>| {
            let increment = increment.ok_or("a refusal without its increment")?;
            StripeIncrement::try_from(increment).map_err(|error| error.to_string())
        };
        Ok(match result.outcome.ok_or("an empty result")? {
            Wire::Applied(_) => Outcome::Applied,
            Wire::Duplicate(_) => Outcome::Duplicate,
            Wire::Overflow(refused) => Outcome::Overflow(increment(Some(*refused))?),
            Wire::Redirect(refused) => Outcome::Redirect(increment(Some(*refused))?),
            Wire::AwaitsRestore(refused) => Outcome::AwaitsRestore(increment(Some(*refused))?),
            Wire::Unavailable(why) => Outcome::Unavailable(why),
            Wire::Expired(why) => Outcome::Expired(why),
            Wire::OwnerBack(refused) => Outcome::OwnerBack(increment(Some(*refused))?),
            Wire::RingRefused(refused) => Outcome::RingRefused {
                increment: increment(refused.increment)?,
                ring: refused.ring,
                sealed: refused.sealed,
            },
            Wire::Conflict(conflict) => Outcome::KeyConflict {
                increment: increment(conflict.increment)?,
                recorded_delta: conflict.recorded_delta,
            },
        })
    }
}

/// One node's answer to a read of some counters: for each counter asked,
/// in order, its own part (the sum of its entries) and each copy's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeRead {
    /// The node's own part of each counter; empty once it is handed over.
    pub own: Vec<i128>,
    /// The copies it holds of other nodes' parts.
    pub copies: Vec<CopyRead>,
    /// It started with an empty data directory and awaits a restore: its
    /// part is `own` plus its lost directory's copy.
    pub restoring: bool,
    /// Handed over to this node: its part is that node's copy of it (until
    /// adopted, then that node's own).
    pub drained_to: Option<String>,
    /// Its data directory's id.
    pub directory_id: u64,
    /// With `drained_to`: the version of the final copy handed over.
    pub handed_over_version: u64,
    /// Drained nodes whose part is in this node's own (adopted) or no
    /// longer anyone's copy (dropped).
    pub retired: Vec<String>,
    /// Nodes this node stands in for: its copy of each is their part.
    pub standing_in_for: Vec<String>,
    /// Its replication version when it answered.
    pub version: u64,
    /// The last takeover of each node that ended here.
    pub takeovers_ended: Vec<TakeoverEnded>,
    /// Empty: every counter asked is current on the node. Otherwise one
    /// per counter asked: a window that ended by the node's clock, whose
    /// answer is no part of a total.
    pub expired: Vec<bool>,
    /// The node's clock when it answered, Unix ms.
    pub now_unix_ms: u64,
}

/// A takeover that ended on the node answering: its origin had reconciled
/// at `version`, from data directory `directory_id` (0: unknown).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TakeoverEnded {
    /// The node that was taken over.
    pub origin: String,
    /// Its replication version after its reconciliation: its answers from
    /// that directory below it were given before.
    pub version: u64,
    /// Its data directory then.
    pub directory_id: u64,
}

/// A node's copy of another node's parts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyRead {
    /// Whose parts these are.
    pub origin: String,
    /// The origin's version the copy reflects; higher is fresher.
    pub version: u64,
    /// How long ago (the replica's monotonic clock, ms) the last
    /// replication round that reached the copy began; `None` if none has
    /// since the replica started.
    pub age_ms: Option<u64>,
    /// The origin's data directory the copy comes from.
    pub directory_id: u64,
    /// The origin's part of each counter asked, in order.
    pub parts: Vec<i128>,
}

impl NodeRead {
    /// Checks that the answer covers every one of `expected` counters.
    pub fn from_wire(response: pb::ReadResponse, expected: usize) -> Result<Self, String> {
        let drained_to = Some(response.drained_to).filter(|adopter| !adopter.is_empty());
        // A handed-over node answers for none of its own.
        if drained_to.is_none() && response.counters.len() != expected {
            return Err(format!(
                "answered {} counters for {expected}",
                response.counters.len()
            ));
        }
        if !response.expired.is_empty() && response.expired.len() != expected {
            return Err(format!(
                "flagged {} counters as expired for {expected}",
                response.expired.len()
            ));
        }
        let copies = response
            .replicas
            .into_iter()
            .map(|copy| {
                if copy.counters.len() != expected {
                    return Err(format!(
                        "a copy of {} answered {} counters for {expected}",
                        copy.origin,
                        copy.counters.len()
                    ));
                }
                Ok(CopyRead {
                    origin: copy.origin,
                    version: copy.version,
                    age_ms: copy.age_ms,
                    directory_id: copy.directory_id,
                    parts: sums(&copy.counters),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(NodeRead {
            own: sums(&response.counters),
            copies,
            restoring: response.restoring,
            drained_to,
            directory_id: response.directory_id,
            handed_over_version: response.handed_over_version,
            retired: response.retired,
            standing_in_for: response.standing_in_for,
            version: response.version,
            takeovers_ended: response
                .takeovers_ended
                .into_iter()
                .map(|ended| TakeoverEnded {
                    origin: ended.origin,
                    version: ended.version,
                    directory_id: ended.directory_id,
                })
                .collect(),
            expired: response.expired,
            now_unix_ms: response.now_unix_ms,
        })
    }

    /// Cuts one answer for many callers into one per caller, by the number
    /// of counters each asked, in order. One call is one consistent view of
    /// the node, so each part is too.
    pub fn split(self, lengths: &[usize]) -> Vec<NodeRead> {
        if let [_] = lengths {
            return vec![self];
        }
        let mut start = 0;
        lengths
            .iter()
            .map(|&length| {
                let range = start..start + length;
                start += length;
                NodeRead {
                    // Empty when handed over: then every caller's is.
                    own: self.own.get(range.clone()).unwrap_or_default().to_vec(),
                    copies: self
                        .copies
                        .iter()
                        .map(|copy| CopyRead {
                            origin: copy.origin.clone(),
                            parts: copy.parts[range.clone()].to_vec(),
                            ..*copy
                        })
                        .collect(),
                    restoring: self.restoring,
                    drained_to: self.drained_to.clone(),
                    directory_id: self.directory_id,
                    handed_over_version: self.handed_over_version,
                    retired: self.retired.clone(),
                    standing_in_for: self.standing_in_for.clone(),
                    version: self.version,
                    takeovers_ended: self.takeovers_ended.clone(),
                    // Empty when none expired: then every caller's is.
                    expired: self.expired.get(range).unwrap_or_default().to_vec(),
                    now_unix_ms: self.now_unix_ms,
                }
            })
            .collect()
    }
}

/// Each counter's entries summed. i128: the entries of a counter may each
/// fit in an i64 while their sum does not.
fn sums(counters: &[pb::CounterEntries]) -> Vec<i128> {
    counters
        .iter()
        .map(|counter| {
            counter
                .entries
                .iter()
                .map(|entry| i128::from(entry.value))
                .sum()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(values: &[i64]) -> Vec<pb::CounterEntries> {
        values
            .iter()
            .map(|&value| pb::CounterEntries {
                entries: vec![
                    pb::StripeValue { stripe: 0, value },
                    pb::StripeValue { stripe: 1, value },
                ],
            })
            .collect()
    }

    #[test]
    fn a_shared_read_is_cut_back_into_each_callers_answer() {
        let response = pb::ReadResponse {
            counters: entries(&[1, 2, i64::MAX]),
            replicas: vec![pb::ReplicaPart {
                origin: "shard-2".into(),
                version: 7,
                counters: entries(&[10, 20, 30]),
                ..Default::default()
            }],
            directory_id: 5,
            retired: vec!["shard-9".into()],
            ..Default::default()
        };
        let read = NodeRead::from_wire(response, 3).unwrap();
        // Summed per counter, beyond i64 where the entries are.
        assert_eq!(read.own, vec![2, 4, 2 * i128::from(i64::MAX)]);
        let parts = read.split(&[2, 1]);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].own, vec![2, 4]);
        assert_eq!(parts[1].own, vec![2 * i128::from(i64::MAX)]);
        assert_eq!(parts[0].copies[0].parts, vec![20, 40]);
        assert_eq!(parts[1].copies[0].parts, vec![60]);
        for part in &parts {
            assert_eq!(part.copies[0].origin, "shard-2");
            assert_eq!(part.copies[0].version, 7);
            assert_eq!(part.directory_id, 5);
            assert_eq!(part.retired, vec!["shard-9".to_string()]);
        }
    }

    #[test]
    fn a_handed_over_node_answers_no_own_part() {
        let drained = pb::ReadResponse {
            drained_to: "shard-3".into(),
            replicas: vec![pb::ReplicaPart {
                counters: entries(&[1, 2, 3]),
                ..Default::default()
            }],
            ..Default::default()
        };
        let parts = NodeRead::from_wire(drained, 3).unwrap().split(&[1, 2]);
        assert!(parts.iter().all(|part| part.own.is_empty()));
        assert_eq!(parts[1].copies[0].parts, vec![4, 6]);
        assert_eq!(parts[1].drained_to.as_deref(), Some("shard-3"));
    }

    #[test]
    fn a_short_answer_is_refused_whole() {
        let short = pb::ReadResponse {
            counters: entries(&[1]),
            ..Default::default()
        };
        assert!(NodeRead::from_wire(short, 3).is_err());
        let short_copy = pb::ReadResponse {
            counters: entries(&[1, 2, 3]),
            replicas: vec![pb::ReplicaPart {
                counters: entries(&[1]),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(NodeRead::from_wire(short_copy, 3).is_err());
    }

    #[test]
    fn refused_increments_come_back_typed() {
        use pb::apply_result::Outcome as Wire;
        let wire = pb::ShardIncrement {
            counter: "c".into(),
            stripe: 3,
            delta: 5,
            idempotency_key: "k".into(),
            on_behalf_of: "shard-2".into(),
            takeover_max_copy_age_ms: 3_500,
            ring: 0xfeed,
        };
        let increment = StripeIncrement::try_from(wire.clone()).unwrap();
        assert_eq!(increment.on_behalf_of.as_deref(), Some("shard-2"));
        assert_eq!(pb::ShardIncrement::from(increment.clone()), wire);
        let cases = [
            (Wire::Applied(Default::default()), Outcome::Applied),
            (Wire::Duplicate(Default::default()), Outcome::Duplicate),
            (
                Wire::Overflow(Box::new(wire.clone())),
                Outcome::Overflow(increment.clone()),
            ),
            (
                Wire::Redirect(Box::new(wire.clone())),
                Outcome::Redirect(increment.clone()),
            ),
            (
                Wire::Conflict(Box::new(pb::apply_result::Conflict {
                    increment: Some(wire.clone()),
                    recorded_delta: 4,
                })),
                Outcome::KeyConflict {
                    increment: increment.clone(),
                    recorded_delta: 4,
                },
            ),
            (
                Wire::AwaitsRestore(Box::new(wire.clone())),
                Outcome::AwaitsRestore(increment.clone()),
            ),
            (
                Wire::RingRefused(Box::new(pb::RingRefused {
                    increment: Some(wire.clone()),
                    ring: 7,
                    sealed: true,
                })),
                Outcome::RingRefused {
                    increment,
                    ring: 7,
                    sealed: true,
                },
            ),
            (
                Wire::Unavailable("no copy".into()),
                Outcome::Unavailable("no copy".into()),
            ),
        ];
        for (wire, expected) in cases {
            let result = pb::ApplyResult {
                outcome: Some(wire),
            };
            assert_eq!(Outcome::try_from(result), Ok(expected));
        }
        assert!(Outcome::try_from(pb::ApplyResult { outcome: None }).is_err());
        let nameless = pb::ApplyResult {
            outcome: Some(Wire::Conflict(Box::new(pb::apply_result::Conflict {
                increment: None,
                recorded_delta: 1,
            }))),
        };
        assert!(Outcome::try_from(nameless).is_err());
    }
}
