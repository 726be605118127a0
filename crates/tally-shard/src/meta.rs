//! What a node knows about itself besides its counters: its identity, its
//! starts, a drain of it, the drained nodes it retired, whether it awaits a
//! restore. Changed only through the log ([`crate::change`]) and saved with
//! every checkpoint.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a drain of this node stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DrainState {
    /// Not being drained.
    #[default]
    Serving,
    /// Refuses writes of its own entries; they are being handed over.
    Draining,
    /// Its entries are in `adopter`'s copy; it answers for none.
    HandedOver {
        /// The node taking them.
        adopter: String,
        /// The version of the final copy.
        version: u64,
    },
    /// `adopter` added them to its own: the node can leave the membership.
    Drained {
        /// The node that took them.
        adopter: String,
        /// The version of the final copy.
        version: u64,
    },
}

impl DrainState {
    /// The state without its data, as the internal protocol and status
    /// reports carry it; states come in this order.
    pub fn stage(&self) -> tally_proto::pb::DrainState {
        use tally_proto::pb::DrainState as Stage;
        match self {
            DrainState::Serving => Stage::Serving,
            DrainState::Draining => Stage::Draining,
            DrainState::HandedOver { .. } => Stage::HandedOver,
            DrainState::Drained { .. } => Stage::Drained,
        }
    }

    /// What asking for `asked` does to a node at `self`: the next state in
    /// order moves it on; a repeat or an earlier state changes nothing (a
    /// drain resumes after a crash of anything); skipping a state, or a
    /// hand-over to another adopter or at another version than recorded,
    /// is refused with the reason.
    pub fn step_to(&self, asked: &DrainState) -> Result<DrainStep, String> {
        if let (Some((adopter, version)), Some((wanted, asked_version))) =
            (self.handed_to(), asked.handed_to())
        {
            if adopter != wanted || version != asked_version {
                return Err(format!(
                    "handed over to {adopter} at version {version}, not {wanted} at \
                     {asked_version}"
                ));
            }
        }
        let (current, asked_stage) = (self.stage() as i32, asked.stage() as i32);
        if asked_stage > current + 1 {
            return Err(format!(
                "{:?}: drain phases go in order",
                self.stage().public_name()
            ));
        }
        Ok(if asked_stage == current + 1 {
            DrainStep::Advance
        } else {
            DrainStep::Stay
        })
    }

    /// The adopter and the final copy's version, once handed over.
    pub fn handed_to(&self) -> Option<(&str, u64)> {
        match self {
            DrainState::HandedOver { adopter, version }
            | DrainState::Drained { adopter, version } => Some((adopter, *version)),
            _ => None,
        }
    }

    /// The adopter, once the entries were handed over.
    pub fn adopter(&self) -> Option<&str> {
        self.handed_to().map(|(adopter, _)| adopter)
    }
}

/// What a drain request does to a node's drain state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainStep {
    /// To the asked state: write it.
    Advance,
    /// Already there or further: nothing to write.
    Stay,
}

/// A node's state besides its counters and copies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMeta {
    /// The node this directory belongs to.
    pub node_id: String,
    /// This data directory's random id, made at its first start: copies of
    /// this node's entries carry it, so a copy from a lost directory is told
    /// from one of its replacement whatever the versions and clocks say.
    pub directory_id: u64,
    /// The number of this start: greater than every earlier start of this
    /// directory and, being at least the wall clock in seconds, than the
    /// starts of a directory this node lost. The high bits of its
    /// replication versions.
    pub incarnation: u64,
    /// The directory was created empty: its own entries (if the node
    /// existed before) are in its replicas' copies until a restore.
    pub awaiting_restore: bool,
    /// Where a drain of this node stands.
    pub drain: DrainState,
    /// Drained nodes whose copies this node no longer takes, with the
    /// version it adopted (0: only its copy was dropped).
    pub retired: BTreeMap<String, u64>,
    /// Nodes this node stands in for: it takes their keyed increments while
    /// they are down, and its frozen copy of each counts as its part.
    #[serde(default)]
    pub standing_in_for: BTreeMap<String, StandIn>,
    /// Per stand-in, the last of its takeovers of this node reconciled
    /// here (its id): a reconciliation of it or of an earlier one, asked
    /// again, changes nothing.
    #[serde(default)]
    pub reconciled: BTreeMap<String, u64>,
    /// The id of the last takeover this node began: each next is greater.
    #[serde(default)]
    pub last_takeover: u64,
    /// Per origin whose takeover ended here, its version after its
    /// reconciliation: a replication round below it (scanned before, pushed
    /// late) does not date this node's copy of it.
    #[serde(default)]
    pub copies_dated_from: BTreeMap<String, u64>,
    /// Per origin in `copies_dated_from`, its data directory at that
    /// reconciliation (0: unknown). Reads report both: an answer of the
    /// origin from that directory below that version predates the
    /// reconciliation.
    #[serde(default)]
    pub reconciled_directories: BTreeMap<String, u64>,
    /// The membership this node takes keyed increments of.
    #[serde(default)]
    pub keyed_ring: KeyedRing,
}

/// The membership a node takes keyed increments of, as its keyed placement
/// stamp (`tally_ring::Ring::keyed_stamp`): a keyed increment sent by a
/// coordinator of another membership could reach a node that does not hold
/// its key's record, and is given back instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyedRing {
    /// The membership's stamp; 0: none yet (a new node, a new directory,
    /// or one written before memberships were recorded).
    pub stamp: u64,
    /// A change to `stamp` is under way: this node takes no keyed
    /// increment until it is opened to it.
    pub sealed: bool,
    /// The number of the change that set it: a seal below it is refused,
    /// an open only of it is taken (`service::ring`).
    #[serde(default)]
    pub epoch: u64,
}

impl KeyedRing {
    /// Whether a keyed increment sent for membership `stamp` is taken.
    pub fn takes(self, stamp: u64) -> bool {
        !self.sealed && self.stamp != 0 && self.stamp == stamp
    }
}

/// A takeover of another node's keyed increments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandIn {
    /// When it began, by this node's retention clock (Unix ms): its id,
    /// and where the records it applied for the node begin.
    pub started_ms: u64,
    /// It takes no more increments: a reconciliation has begun.
    pub closed: bool,
}

impl NodeMeta {
    /// The incarnation for the next start: after every earlier one, and at
    /// least the wall clock in seconds (a new directory takes the next
    /// second: every start of a directory this node lost was numbered at
    /// most the second it happened in).
    pub fn next_incarnation(&self) -> u64 {
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        if self.incarnation == 0 {
            now_secs + 1
        } else {
            (self.incarnation + 1).max(now_secs)
        }
    }
}

/// A random id for a new data directory (never 0).
pub fn new_directory_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_states_move_forward_one_at_a_time_and_repeat_freely() {
        let handed = |adopter: &str, version| DrainState::HandedOver {
            adopter: adopter.into(),
            version,
        };
        let drained = |adopter: &str, version| DrainState::Drained {
            adopter: adopter.into(),
            version,
        };
        use DrainState::{Draining, Serving};
        use DrainStep::{Advance, Stay};
        // (case, current, asked, what happens: a step or refused)
        let cases = [
            ("stop writes", Serving, Draining, Some(Advance)),
            ("stop writes again", Draining, Draining, Some(Stay)),
            ("hand over", Draining, handed("b", 7), Some(Advance)),
            (
                "hand over again",
                handed("b", 7),
                handed("b", 7),
                Some(Stay),
            ),
            ("adopted", handed("b", 7), drained("b", 7), Some(Advance)),
            (
                "adopted again",
                drained("b", 7),
                drained("b", 7),
                Some(Stay),
            ),
            (
                "an earlier step after the hand-over",
                handed("b", 7),
                Draining,
                Some(Stay),
            ),
            (
                "an earlier step once drained",
                drained("b", 7),
                Serving,
                Some(Stay),
            ),
            (
                "hand over without stopping writes",
                Serving,
                handed("b", 7),
                None,
            ),
            (
                "adopted without a hand-over",
                Draining,
                drained("b", 7),
                None,
            ),
            ("another adopter", handed("b", 7), handed("c", 7), None),
            ("another version", handed("b", 7), handed("b", 8), None),
            ("adopted by another", handed("b", 7), drained("c", 7), None),
            (
                "handed over again elsewhere once drained",
                drained("b", 7),
                handed("c", 1),
                None,
            ),
        ];
        for (case, current, asked, expected) in cases {
            assert_eq!(current.step_to(&asked).ok(), expected, "{case}");
        }
    }

    #[test]
    fn meta_round_trips_as_json_with_full_u64s() {
        let meta = NodeMeta {
            node_id: "shard-1".into(),
            directory_id: u64::MAX - 3,
            incarnation: 1_700_000_000,
            awaiting_restore: true,
            drain: DrainState::HandedOver {
                adopter: "shard-2".into(),
                version: u64::MAX,
            },
            retired: [("shard-9".to_string(), 7)].into(),
            standing_in_for: [(
                "shard-3".to_string(),
                StandIn {
                    started_ms: u64::MAX - 1,
                    closed: true,
                },
            )]
            .into(),
            reconciled: [("shard-2".to_string(), u64::MAX)].into(),
            last_takeover: u64::MAX - 1,
            copies_dated_from: [("shard-3".to_string(), 1 << 40)].into(),
            reconciled_directories: [("shard-3".to_string(), u64::MAX)].into(),
            keyed_ring: KeyedRing {
                stamp: u64::MAX,
                sealed: true,
                epoch: 3,
            },
        };
        let text = serde_json::to_string(&meta).unwrap();
        // A meta of the release before takeovers reads with none.
        let before = text
            .split(",\"standing_in_for\"")
            .next()
            .unwrap()
            .to_string()
            + "}";
        assert_eq!(
            serde_json::from_str::<NodeMeta>(&before)
                .unwrap()
                .standing_in_for,
            BTreeMap::new()
        );
        assert_eq!(serde_json::from_str::<NodeMeta>(&text).unwrap(), meta);
    }

    #[test]
    fn incarnations_grow() {
        let meta = NodeMeta::default();
        let first = meta.next_incarnation();
        assert!(first > 1_700_000_000);
        let later = NodeMeta {
            incarnation: first + 100,
            ..meta
        };
        assert_eq!(later.next_incarnation(), first + 101);
    }
}
