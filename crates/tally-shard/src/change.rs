//! Every change of a node's state other than a group commit of increments:
//! what a log frame of each kind records, how it is encoded, and how it is
//! applied to memory. The log thread applies a change once its frame is
//! durable, and recovery applies the same frames again with the same code,
//! so memory and the log cannot disagree about what a change means.
//!
//! ```text
//! Replica     = origin: bytes | version: varint | scanned_unix_ms: varint
//!               | directory_id: varint | full: u8 | entries [| records]
//! EraseCopies = count: varint | counter: bytes*
//! SetOwn      = 0 (restored) | 1 (adopted) origin: bytes version: varint
//!               | 2 (reconciled) stand_in: bytes takeover: varint
//!               | 3 (handed on: records of a membership change)
//!               | entries (absolute values) [| records]
//! StandIn     = origin: bytes | 0 (start) started_ms: varint | 1 (close)
//!               | 2 (end) copy_version: varint [| directory_id: varint]
//! KeyedRing   = stamp: varint | sealed: u8 | epoch: varint
//! Drain       = drain state: bytes (JSON)
//! DropCopy    = origin: bytes
//! Created     = directory_id: varint
//! Start       = incarnation: varint
//! entries     = count: varint | (counter: bytes | stripe: varint | value: zigzag)*
//! records     = count: varint | (key: bytes | delta: zigzag | applied_unix_ms: varint)*
//!               (idempotency records, the key as `store::encode_record_key_into`
//!               makes it; absent in frames written before records travelled,
//!               read as none)
//! ```
//!
//! Every value is absolute, so applying a frame twice (recovery replays
//! frames a checkpoint may already hold) changes nothing the second time.

use crate::codec::{self, Malformed, Reader};
use crate::log::FrameKind;
use crate::meta::{DrainState, KeyedRing, NodeMeta, StandIn};
use crate::replicas::{CopyRecord, CopyStamp, Replicas};
use crate::store::{Store, MAX_STRIPES};

/// `(counter, stripe, value)`.
pub type Entry = (String, u32, i64);

/// Why own entries are set outside the increment path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnChange {
    /// A node that started empty got its earlier entries back.
    Restored,
    /// This node took a drained node's entries from its copy of them.
    Adopted {
        /// The drained node.
        origin: String,
        /// Its final copy's version.
        version: u64,
    },
    /// This node took back what a stand-in applied for it while it was
    /// down: keys it had applied too are taken out of its entries (the
    /// stand-in's count them), the others recorded.
    Reconciled {
        /// The node that stood in.
        stand_in: String,
        /// The takeover's id.
        takeover: u64,
    },
    /// Idempotency records of keys this node owns in a new membership,
    /// handed on by the nodes that applied them (no entries).
    HandedOn,
}

/// A step of a takeover of `origin`'s keyed increments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandInStep {
    /// It begins (its id: when, by this node's retention clock).
    Start {
        /// Unix ms.
        started_ms: u64,
    },
    /// It takes no more increments.
    Close,
    /// It is over: the origin has reconciled, at `copy_version` (its
    /// replication version then): this node's copy of it is not dated by a
    /// round below that version.
    End {
        /// The origin's version after its reconciliation.
        copy_version: u64,
        /// The origin's data directory then (0: unknown, in frames written
        /// before it was kept).
        directory_id: u64,
    },
}

/// A change of a node's state, as one log frame records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A replica change set (or, `full`, a whole copy) of `origin`'s entries.
    Replica {
        /// The node the copy is of.
        origin: String,
        /// Where the copy stands once this is applied.
        stamp: CopyStamp,
        /// The entries are every entry: the copy drops the rest.
        full: bool,
        /// Absolute values; 0 removes an entry.
        entries: Vec<Entry>,
        /// The origin's idempotency records added (all of them, if `full`).
        records: Vec<CopyRecord>,
    },
    /// Counters removed from every replica copy (a delete).
    EraseCopies {
        /// The counters.
        counters: Vec<String>,
    },
    /// Own entries set to absolute values, with what made them.
    SetOwn {
        /// A restore or an adoption.
        why: OwnChange,
        /// The values.
        entries: Vec<Entry>,
        /// Idempotency records that come with them (a record this node
        /// already has for the same key wins).
        records: Vec<CopyRecord>,
    },
    /// A drain step of this node.
    Drain(DrainState),
    /// A drained node's copy is dropped and the node retired.
    DropCopy {
        /// The drained node.
        origin: String,
    },
    /// The data directory was created (the first frame of its log): it
    /// awaits a restore of the node's earlier entries, if any.
    Created {
        /// The new directory's random id.
        directory_id: u64,
    },
    /// The node started.
    Start {
        /// The number of this start.
        incarnation: u64,
    },
    /// A takeover of another node's keyed increments began, closed or ended.
    StandIn {
        /// The node stood in for.
        origin: String,
        /// Which step.
        step: StandInStep,
    },
    /// The membership this node takes keyed increments of, sealed (a
    /// change is under way) or open.
    KeyedRing(KeyedRing),
}

fn put_entries(buffer: &mut Vec<u8>, entries: &[Entry]) {
    codec::put_varint(buffer, entries.len() as u64);
    for (counter, stripe, value) in entries {
        codec::put_bytes(buffer, counter.as_bytes());
        codec::put_varint(buffer, u64::from(*stripe));
        codec::put_signed(buffer, *value);
    }
}

/// Writes nothing for no records: such a frame reads the same in the build
/// before records travelled.
fn put_records(buffer: &mut Vec<u8>, records: &[CopyRecord]) {
    if records.is_empty() {
        return;
    }
    codec::put_varint(buffer, records.len() as u64);
    for (key, delta, applied_unix_ms) in records {
        codec::put_bytes(buffer, key);
        codec::put_signed(buffer, *delta);
        codec::put_varint(buffer, *applied_unix_ms);
    }
}

/// The records that end a frame; none if it ends before them (a frame
/// written by a build whose frames had none).
fn records(reader: &mut Reader<'_>) -> Result<Vec<CopyRecord>, Malformed> {
    if reader.is_empty() {
        return Ok(Vec::new());
    }
    let count = reader.count("record count")?;
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let (key, delta, applied) = crate::store::read_record(reader)?;
        records.push((key.into(), delta, applied));
    }
    Ok(records)
}

fn counter_name<'a>(reader: &mut Reader<'a>) -> Result<&'a str, Malformed> {
    let counter = reader.str("counter name")?;
    if counter.is_empty() || counter.len() > 256 {
        return Err(Malformed {
            what: "counter name",
        });
    }
    Ok(counter)
}

fn node_id(reader: &mut Reader<'_>) -> Result<String, Malformed> {
    let id = reader.str("node id")?;
    tally_proto::domain::validate_node_id(id).map_err(|_| Malformed { what: "node id" })?;
    Ok(id.to_string())
}

fn entries(reader: &mut Reader<'_>) -> Result<Vec<Entry>, Malformed> {
    let count = reader.count("entry count")?;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let counter = counter_name(reader)?.to_string();
        let stripe: u32 = reader.small("stripe")?;
        if stripe >= MAX_STRIPES {
            return Err(Malformed { what: "stripe" });
        }
        entries.push((counter, stripe, reader.signed("value")?));
    }
    Ok(entries)
}

impl Change {
    /// The kind of frame that records it.
    pub fn kind(&self) -> FrameKind {
        match self {
            Change::Replica { .. } => FrameKind::Replica,
            Change::EraseCopies { .. } => FrameKind::EraseCopies,
            Change::SetOwn { .. } => FrameKind::SetOwn,
            Change::Drain(_) => FrameKind::Drain,
            Change::DropCopy { .. } => FrameKind::DropCopy,
            Change::Created { .. } => FrameKind::Created,
            Change::Start { .. } => FrameKind::Start,
            Change::StandIn { .. } => FrameKind::StandIn,
            Change::KeyedRing(_) => FrameKind::KeyedRing,
        }
    }

    /// Appends the frame body.
    pub fn encode(&self, buffer: &mut Vec<u8>) {
        match self {
            Change::Replica {
                origin,
                stamp,
                full,
                entries,
                records,
            } => {
                codec::put_bytes(buffer, origin.as_bytes());
                codec::put_varint(buffer, stamp.version);
                codec::put_varint(buffer, stamp.scanned_unix_ms);
                codec::put_varint(buffer, stamp.directory_id);
                buffer.push(u8::from(*full));
                put_entries(buffer, entries);
                put_records(buffer, records);
            }
            Change::EraseCopies { counters } => {
                codec::put_varint(buffer, counters.len() as u64);
                for counter in counters {
                    codec::put_bytes(buffer, counter.as_bytes());
                }
            }
            Change::SetOwn {
                why,
                entries,
                records,
            } => {
                match why {
                    OwnChange::Restored => buffer.push(0),
                    OwnChange::Adopted { origin, version } => {
                        buffer.push(1);
                        codec::put_bytes(buffer, origin.as_bytes());
                        codec::put_varint(buffer, *version);
                    }
                    OwnChange::Reconciled { stand_in, takeover } => {
                        buffer.push(2);
                        codec::put_bytes(buffer, stand_in.as_bytes());
                        codec::put_varint(buffer, *takeover);
                    }
                    OwnChange::HandedOn => buffer.push(3),
                }
                put_entries(buffer, entries);
                put_records(buffer, records);
            }
            Change::Drain(state) => {
                let json = serde_json::to_vec(state).expect("a drain state serializes");
                codec::put_bytes(buffer, &json);
            }
            Change::DropCopy { origin } => codec::put_bytes(buffer, origin.as_bytes()),
            Change::Created { directory_id } => codec::put_varint(buffer, *directory_id),
            Change::Start { incarnation } => codec::put_varint(buffer, *incarnation),
            Change::KeyedRing(ring) => {
                codec::put_varint(buffer, ring.stamp);
                buffer.push(u8::from(ring.sealed));
                codec::put_varint(buffer, ring.epoch);
            }
            Change::StandIn { origin, step } => {
                codec::put_bytes(buffer, origin.as_bytes());
                match step {
                    StandInStep::Start { started_ms } => {
                        buffer.push(0);
                        codec::put_varint(buffer, *started_ms);
                    }
                    StandInStep::Close => buffer.push(1),
                    StandInStep::End {
                        copy_version,
                        directory_id,
                    } => {
                        buffer.push(2);
                        codec::put_varint(buffer, *copy_version);
                        codec::put_varint(buffer, *directory_id);
                    }
                }
            }
        }
    }

    /// Decodes a frame body of `kind` (not [`FrameKind::Own`]).
    pub fn decode(kind: FrameKind, body: &[u8]) -> Result<Change, Malformed> {
        let mut reader = Reader::new(body);
        let change = match kind {
            FrameKind::Own => {
                return Err(Malformed {
                    what: "change kind",
                })
            }
            FrameKind::Replica => {
                let origin = node_id(&mut reader)?;
                let stamp = CopyStamp {
                    version: reader.varint("version")?,
                    scanned_unix_ms: reader.varint("scan time")?,
                    directory_id: reader.varint("directory id")?,
                };
                let full = match reader.byte("full")? {
                    0 => false,
                    1 => true,
                    _ => return Err(Malformed { what: "full" }),
                };
                Change::Replica {
                    origin,
                    stamp,
                    full,
                    entries: entries(&mut reader)?,
                    records: records(&mut reader)?,
                }
            }
            FrameKind::EraseCopies => {
                let count = reader.count("counter count")?;
                let counters = (0..count)
                    .map(|_| counter_name(&mut reader).map(str::to_string))
                    .collect::<Result<_, _>>()?;
                Change::EraseCopies { counters }
            }
            FrameKind::SetOwn => {
                let why = match reader.byte("why")? {
                    0 => OwnChange::Restored,
                    1 => OwnChange::Adopted {
                        origin: node_id(&mut reader)?,
                        version: reader.varint("version")?,
                    },
                    2 => OwnChange::Reconciled {
                        stand_in: node_id(&mut reader)?,
                        takeover: reader.varint("takeover")?,
                    },
                    3 => OwnChange::HandedOn,
                    _ => return Err(Malformed { what: "why" }),
                };
                Change::SetOwn {
                    why,
                    entries: entries(&mut reader)?,
                    records: records(&mut reader)?,
                }
            }
            FrameKind::Drain => {
                let json = reader.bytes("drain state")?;
                Change::Drain(serde_json::from_slice(json).map_err(|_| Malformed {
                    what: "drain state",
                })?)
            }
            FrameKind::DropCopy => Change::DropCopy {
                origin: node_id(&mut reader)?,
            },
            FrameKind::Created => Change::Created {
                directory_id: reader.varint("directory id")?,
            },
            FrameKind::Start => Change::Start {
                incarnation: reader.varint("incarnation")?,
            },
            FrameKind::KeyedRing => Change::KeyedRing(KeyedRing {
                stamp: reader.varint("keyed ring")?,
                sealed: match reader.byte("sealed")? {
                    0 => false,
                    1 => true,
                    _ => return Err(Malformed { what: "sealed" }),
                },
                epoch: reader.varint("keyed ring epoch")?,
            }),
            FrameKind::StandIn => Change::StandIn {
                origin: node_id(&mut reader)?,
                step: match reader.byte("stand-in step")? {
                    0 => StandInStep::Start {
                        started_ms: reader.varint("start")?,
                    },
                    1 => StandInStep::Close,
                    2 => StandInStep::End {
                        copy_version: reader.varint("copy version")?,
                        directory_id: if reader.is_empty() {
                            0
                        } else {
                            reader.varint("directory id")?
                        },
                    },
                    _ => {
                        return Err(Malformed {
                            what: "stand-in step",
                        })
                    }
                },
            },
        };
        reader.finish("frame")?;
        Ok(change)
    }

    /// Applies the change to memory. Called by the log thread once the
    /// change is in the log, and by recovery for every frame replayed.
    pub fn apply(&self, store: &Store, replicas: &Replicas, meta: &mut NodeMeta) {
        match self {
            Change::Replica {
                origin,
                stamp,
                full,
                entries,
                records,
            } => {
                let entries: Vec<(&str, u32, i64)> = entries
                    .iter()
                    .map(|(counter, stripe, value)| (counter.as_str(), *stripe, *value))
                    .collect();
                // Dated by this node's clock on arrival: retention here
                // never reads another node's clock.
                replicas.apply(
                    origin,
                    *stamp,
                    *full,
                    &entries,
                    records,
                    store.retention_now_ms(),
                );
            }
            Change::EraseCopies { counters } => {
                let counters: Vec<&str> = counters.iter().map(String::as_str).collect();
                replicas.erase(&counters);
            }
            Change::SetOwn {
                why,
                entries,
                records,
            } => {
                for (counter, stripe, value) in entries {
                    store.set_logged(counter, *stripe, *value);
                }
                for (key, delta, _) in records {
                    store.add_logged_record(key, *delta);
                }
                match why {
                    OwnChange::Restored => meta.awaiting_restore = false,
                    OwnChange::Adopted { origin, version } => {
                        replicas.remove(origin);
                        meta.retired.insert(origin.clone(), *version);
                        meta.standing_in_for.remove(origin);
                    }
                    OwnChange::Reconciled { stand_in, takeover } => {
                        let last = meta.reconciled.entry(stand_in.clone()).or_default();
                        *last = (*last).max(*takeover);
                    }
                    OwnChange::HandedOn => {}
                }
            }
            Change::Drain(state) => meta.drain = state.clone(),
            Change::DropCopy { origin } => {
                replicas.remove(origin);
                meta.retired.entry(origin.clone()).or_insert(0);
            }
            Change::Created { directory_id } => {
                meta.directory_id = *directory_id;
                meta.awaiting_restore = true;
            }
            Change::Start { incarnation } => meta.incarnation = *incarnation,
            Change::KeyedRing(ring) => meta.keyed_ring = *ring,
            Change::StandIn { origin, step } => match step {
                StandInStep::Start { started_ms } => {
                    meta.last_takeover = meta.last_takeover.max(*started_ms);
                    meta.standing_in_for
                        .entry(origin.clone())
                        .or_insert(StandIn {
                            started_ms: *started_ms,
                            closed: false,
                        });
                }
                StandInStep::Close => {
                    if let Some(stand_in) = meta.standing_in_for.get_mut(origin) {
                        stand_in.closed = true;
                    }
                }
                StandInStep::End {
                    copy_version,
                    directory_id,
                } => {
                    meta.standing_in_for.remove(origin);
                    meta.copies_dated_from.insert(origin.clone(), *copy_version);
                    meta.reconciled_directories
                        .insert(origin.clone(), *directory_id);
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::record_key;

    #[test]
    fn frames_written_before_records_travelled_read_as_none() {
        let change = Change::SetOwn {
            why: OwnChange::Restored,
            entries: vec![("a".into(), 0, 10)],
            records: vec![],
        };
        let mut body = Vec::new();
        change.encode(&mut body);
        // The old encoding, byte for byte: restored, one entry, no record
        // section (and so readable by the build before this one too).
        let mut old = vec![0, 1];
        codec::put_bytes(&mut old, b"a");
        old.extend([0, 20]);
        assert_eq!(body, old);
        assert_eq!(Change::decode(change.kind(), &old).unwrap(), change);
    }

    #[test]
    fn every_change_round_trips() {
        let changes = [
            Change::Replica {
                origin: "shard-2".into(),
                stamp: CopyStamp {
                    version: 9 << 32 | 4,
                    scanned_unix_ms: 1_700_000_000_000,
                    directory_id: u64::MAX,
                },
                full: true,
                entries: vec![("c".into(), 3, -5), ("d".into(), 0, i64::MIN)],
                records: vec![(record_key("c", "k1"), 7, 1_700_000_000_001)],
            },
            Change::EraseCopies {
                counters: vec!["a".into(), "b".into()],
            },
            Change::SetOwn {
                why: OwnChange::Adopted {
                    origin: "shard-3".into(),
                    version: 12,
                },
                entries: vec![("a".into(), 1, 1)],
                records: vec![(record_key("a", "k"), -1, 5)],
            },
            Change::SetOwn {
                why: OwnChange::Restored,
                entries: vec![],
                records: vec![],
            },
            Change::Drain(DrainState::Drained {
                adopter: "shard-2".into(),
                version: 3,
            }),
            Change::DropCopy {
                origin: "shard-4".into(),
            },
            Change::Created { directory_id: 77 },
            Change::Start {
                incarnation: 1_700_000_001,
            },
            Change::SetOwn {
                why: OwnChange::Reconciled {
                    stand_in: "shard-1".into(),
                    takeover: 1_700_000_000_123,
                },
                entries: vec![("a".into(), 2, 0)],
                records: vec![(record_key("a", "k"), 3, 7)],
            },
            Change::StandIn {
                origin: "shard-2".into(),
                step: StandInStep::Start {
                    started_ms: 1_700_000_000_123,
                },
            },
            Change::StandIn {
                origin: "shard-2".into(),
                step: StandInStep::Close,
            },
            Change::StandIn {
                origin: "shard-2".into(),
                step: StandInStep::End {
                    copy_version: 1 << 40 | 7,
                    directory_id: u64::MAX,
                },
            },
            Change::SetOwn {
                why: OwnChange::HandedOn,
                entries: vec![],
                records: vec![(record_key("b", "k"), 4, 9)],
            },
            Change::KeyedRing(KeyedRing {
                stamp: u64::MAX,
                sealed: true,
                epoch: u64::MAX,
            }),
            Change::KeyedRing(KeyedRing {
                stamp: 1,
                sealed: false,
                epoch: 2,
            }),
        ];
        for change in changes {
            let mut body = Vec::new();
            change.encode(&mut body);
            assert_eq!(Change::decode(change.kind(), &body).unwrap(), change);
            // Damaged bodies are errors, never panics.
            for cut in 0..body.len() {
                let _ = Change::decode(change.kind(), &body[..cut]);
            }
        }
    }

    #[test]
    fn an_end_written_before_directories_were_kept_reads_as_unknown() {
        let mut body = Vec::new();
        codec::put_bytes(&mut body, b"shard-2");
        body.push(2);
        codec::put_varint(&mut body, 7);
        assert_eq!(
            Change::decode(FrameKind::StandIn, &body).unwrap(),
            Change::StandIn {
                origin: "shard-2".into(),
                step: StandInStep::End {
                    copy_version: 7,
                    directory_id: 0,
                },
            }
        );
    }

    #[test]
    fn applying_twice_changes_nothing_more() {
        let store = Store::new();
        let replicas = Replicas::default();
        let mut meta = NodeMeta::default();
        let changes = [
            Change::Replica {
                origin: "shard-2".into(),
                stamp: CopyStamp {
                    version: 2,
                    ..CopyStamp::default()
                },
                full: false,
                entries: vec![("c".into(), 1, 4)],
                records: vec![(record_key("c", "k"), 4, 9)],
            },
            Change::SetOwn {
                why: OwnChange::Restored,
                entries: vec![("a".into(), 0, 10)],
                records: vec![(record_key("a", "k"), 10, 9)],
            },
        ];
        for _ in 0..2 {
            for change in &changes {
                change.apply(&store, &replicas, &mut meta);
            }
        }
        assert_eq!(store.read("a"), vec![(0, 10)]);
        assert_eq!(replicas.read(&["c".into()])[0].counters, vec![vec![(1, 4)]]);
    }
}
