//! Bounded-time fuzz tests of every decoder that reads the shard's on-disk
//! or untrusted bytes: the codec's [`Reader`], log segments and the
//! recovery scan (`crate::log`), frame bodies (`crate::change`, own-entries
//! frames in `crate::store`), checkpoint buckets and metadata
//! (`crate::checkpoint`, `crate::meta`), the data directory's marker and
//! witness files (`crate::storage`), and format 2 directories
//! (`crate::legacy`).
//!
//! The properties:
//! - any bytes decode to a value or a typed error: never a panic, and never
//!   an allocation out of proportion to the input (a length or a count of
//!   2^60 is an error, not an allocation attempt);
//! - what the writers encode decodes back to the same value;
//! - a log damaged anywhere (bytes flipped, cut short, garbage appended)
//!   is either recovered to a prefix of what was written, exactly where the
//!   module docs say the torn tail is cut, or refused as damaged: never
//!   read as frames that were not written.
//!
//! Each property runs a fixed number of cases (`ProptestConfig::cases`),
//! chosen so that the whole module takes a few seconds in a debug build on
//! two cores: CI runs it with every `cargo test`. Run only these with
//! `cargo test -p tally-shard --lib fuzz`; `PROPTEST_CASES` does not
//! change the counts, which are set per test.
//!
//! Declared from the end of `codec.rs` so that it sees the crate's private
//! modules without a line in `lib.rs`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

use super::{put_bytes, put_signed, put_varint, Malformed, Reader};
use crate::change::{Change, OwnChange, StandInStep};
use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::log::{self, FrameKind, LogEnd, LogError, LogWriter};
use crate::meta::{DrainState, KeyedRing, NodeMeta, StandIn};
use crate::replicas::{CopyRecord, CopyStamp, Replicas};
use crate::storage::{self, StorageError};
use crate::store::{
    decode_record_key, record_key, OwnChanges, Store, StripeIncrement, MAX_STRIPES, SEGMENT_COUNT,
};

// ---------------------------------------------------------------------------
// Allocation bound
// ---------------------------------------------------------------------------

/// Passes every allocation to the system allocator, noting the largest
/// single request of each thread: a decoder that trusts a damaged length
/// or count asks for one block far larger than its input, which a test can
/// then see (before it aborts the process by asking for terabytes).
struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_allocation(size: usize) {
    // `try_with`: allocations also happen while a thread is torn down.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the bookkeeping neither allocates nor unwinds.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Runs `decode` and returns what it returned and the largest single
/// allocation it asked for.
fn largest_allocation<T>(decode: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    let value = decode();
    (value, LARGEST.with(Cell::get))
}

/// Most a decoder may ask for in one block for `input` bytes: every count
/// it preallocates is bounded by the bytes left (each item takes at least
/// one), and an item in memory is at most 64 bytes; the constant covers
/// error messages.
fn allocation_bound(input: usize) -> usize {
    64 * input + 4096
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=max)
}

fn node_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

/// Counter names as the store takes them: 1 to 256 bytes of UTF-8, short
/// ones most often (so that increments meet), multi-byte characters, and
/// names at the limit.
fn counter() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-c]{1,2}",
        2 => "\\PC{1,64}",
        1 => "[a-z]{250,256}",
    ]
}

fn idempotency_key() -> impl Strategy<Value = String> {
    "\\PC{0,32}"
}

fn stripe() -> impl Strategy<Value = u32> {
    prop_oneof![0..4u32, 0..MAX_STRIPES, Just(MAX_STRIPES - 1)]
}

fn value() -> impl Strategy<Value = i64> {
    prop_oneof![-5..5i64, any::<i64>()]
}

fn copy_record() -> impl Strategy<Value = CopyRecord> {
    (counter(), idempotency_key(), any::<i64>(), any::<u64>())
        .prop_map(|(counter, key, delta, applied)| (record_key(&counter, &key), delta, applied))
}

fn entry() -> impl Strategy<Value = (String, u32, i64)> {
    (counter(), stripe(), value())
}

fn stamp() -> impl Strategy<Value = CopyStamp> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(version, scanned_unix_ms, directory_id)| CopyStamp {
            version,
            scanned_unix_ms,
            directory_id,
        },
    )
}

fn drain_state() -> impl Strategy<Value = DrainState> {
    prop_oneof![
        Just(DrainState::Serving),
        Just(DrainState::Draining),
        (node_id(), any::<u64>())
            .prop_map(|(adopter, version)| DrainState::HandedOver { adopter, version }),
        (node_id(), any::<u64>())
            .prop_map(|(adopter, version)| DrainState::Drained { adopter, version }),
    ]
}

fn keyed_ring() -> impl Strategy<Value = KeyedRing> {
    (any::<u64>(), any::<bool>(), any::<u64>()).prop_map(|(stamp, sealed, epoch)| KeyedRing {
        stamp,
        sealed,
        epoch,
    })
}

/// Every kind of change, with values across their whole ranges.
fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (
            node_id(),
            stamp(),
            any::<bool>(),
            vec(entry(), 0..6),
            vec(copy_record(), 0..4)
        )
            .prop_map(|(origin, stamp, full, entries, records)| Change::Replica {
                origin,
                stamp,
                full,
                entries,
                records,
            }),
        vec(counter(), 0..6).prop_map(|counters| Change::EraseCopies { counters }),
        (
            prop_oneof![
                Just(OwnChange::Restored),
                (node_id(), any::<u64>())
                    .prop_map(|(origin, version)| OwnChange::Adopted { origin, version }),
                (node_id(), any::<u64>())
                    .prop_map(|(stand_in, takeover)| OwnChange::Reconciled { stand_in, takeover }),
                Just(OwnChange::HandedOn),
            ],
            vec(entry(), 0..6),
            vec(copy_record(), 0..4),
        )
            .prop_map(|(why, entries, records)| Change::SetOwn {
                why,
                entries,
                records,
            }),
        drain_state().prop_map(Change::Drain),
        node_id().prop_map(|origin| Change::DropCopy { origin }),
        any::<u64>().prop_map(|directory_id| Change::Created { directory_id }),
        any::<u64>().prop_map(|incarnation| Change::Start { incarnation }),
        (
            node_id(),
            prop_oneof![
                any::<u64>().prop_map(|started_ms| StandInStep::Start { started_ms }),
                Just(StandInStep::Close),
                (any::<u64>(), any::<u64>()).prop_map(|(copy_version, directory_id)| {
                    StandInStep::End {
                        copy_version,
                        directory_id,
                    }
                }),
            ]
        )
            .prop_map(|(origin, step)| Change::StandIn { origin, step }),
        keyed_ring().prop_map(Change::KeyedRing),
    ]
}

fn frame_kind() -> impl Strategy<Value = FrameKind> {
    (1..=10u8).prop_map(|byte| FrameKind::from_byte(byte).expect("kinds 1 to 10 exist"))
}

/// Small damage to an encoding: bytes changed, cut, inserted.
#[derive(Debug, Clone)]
enum Edit {
    Flip { at: usize, mask: u8 },
    Cut { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Edit::Flip { at, mask }),
        any::<usize>().prop_map(|at| Edit::Cut { at }),
        (any::<usize>(), bytes(12)).prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
    ]
}

fn apply_edits(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for edit in edits {
        match edit {
            Edit::Flip { at, mask } => {
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] ^= mask;
                }
            }
            Edit::Cut { at } => bytes.truncate(at % (bytes.len() + 1)),
            Edit::Insert {
                at,
                bytes: inserted,
            } => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, inserted.iter().copied());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The codec's reader
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Read {
    Varint,
    Signed,
    Byte,
    Bytes,
    Str,
    Count,
    Stripe,
}

fn read_op() -> impl Strategy<Value = Read> {
    prop_oneof![
        Just(Read::Varint),
        Just(Read::Signed),
        Just(Read::Byte),
        Just(Read::Bytes),
        Just(Read::Str),
        Just(Read::Count),
        Just(Read::Stripe),
    ]
}

proptest! {
    // Pure computation: microseconds a case.
    #![proptest_config(config(1024))]

    /// Any read of any bytes takes only bytes that are there, in order: a
    /// length-prefixed string is exactly the bytes after its prefix, and a
    /// count never exceeds the bytes left.
    #[test]
    fn reader_takes_only_what_is_there(
        input in bytes(64),
        reads in vec(read_op(), 1..16),
    ) {
        let mut reader = Reader::new(&input);
        for read in reads {
            let before = reader.bytes;
            let result = match read {
                Read::Varint => reader.varint("varint").map(drop),
                Read::Signed => reader.signed("signed").map(drop),
                Read::Byte => reader.byte("byte").map(drop),
                Read::Stripe => reader.small::<u16>("stripe").map(drop),
                Read::Count => reader.count("count").map(|count| {
                    let left = reader.bytes.len();
                    assert!(count <= left, "count {count} > {left} left");
                }),
                Read::Bytes | Read::Str => {
                    let mut prefix = Reader::new(before);
                    let result = if matches!(read, Read::Bytes) {
                        reader.bytes("bytes")
                    } else {
                        reader.str("str").map(str::as_bytes)
                    };
                    result.map(|taken| {
                        let length = prefix.varint("prefix").unwrap();
                        assert_eq!(taken.len() as u64, length);
                        // The string is the bytes right after its prefix, and
                        // the reader continues after it.
                        assert_eq!(taken, &prefix.bytes[..taken.len()]);
                        assert_eq!(reader.bytes, &prefix.bytes[taken.len()..]);
                    })
                }
            };
            match result {
                // Something was read: the rest is a shorter suffix.
                Ok(()) => {
                    prop_assert!(reader.bytes.len() < before.len());
                    prop_assert_eq!(reader.bytes, &before[before.len() - reader.bytes.len()..]);
                }
                Err(Malformed { what }) => prop_assert!(!what.is_empty()),
            }
        }
    }

    /// A length or count larger than what follows (2^60 among them) is an
    /// error, and nothing is allocated for it.
    #[test]
    fn huge_lengths_and_counts_are_errors(
        length in prop_oneof![Just(1u64 << 60), Just(u64::MAX), 65..=u64::MAX],
        rest in bytes(64),
    ) {
        let mut input = Vec::new();
        put_varint(&mut input, length);
        input.extend_from_slice(&rest);
        let ((bytes, text, count), largest) = largest_allocation(|| {
            (
                Reader::new(&input).bytes("bytes"),
                Reader::new(&input).str("str"),
                Reader::new(&input).count("count"),
            )
        });
        prop_assert_eq!(bytes, Err(Malformed { what: "bytes" }));
        prop_assert_eq!(text, Err(Malformed { what: "str" }));
        prop_assert_eq!(count, Err(Malformed { what: "count" }));
        prop_assert!(largest <= allocation_bound(input.len()), "asked for {largest} bytes");
    }
}

// ---------------------------------------------------------------------------
// Frame bodies
// ---------------------------------------------------------------------------

/// Decodes a body of `kind` as recovery does (the own-entries layout for
/// `Own`, a `Change` for the rest), checking the allocation bound; `Ok`
/// carries the change, if any, re-encoded.
fn decode_body(kind: FrameKind, body: &[u8]) -> Result<Option<Change>, TestCaseError> {
    let (decoded, largest) = largest_allocation(|| match kind {
        FrameKind::Own => OwnChanges::decode(body).map(|_| None),
        kind => Change::decode(kind, body).map(Some),
    });
    prop_assert!(
        largest <= allocation_bound(body.len()),
        "decoding {} bytes of a {kind:?} frame asked for {largest} bytes",
        body.len()
    );
    Ok(decoded.unwrap_or(None))
}

proptest! {
    // Decoding in memory: microseconds a case.
    #![proptest_config(config(1024))]

    /// Any body of any kind decodes or is malformed; a body that decodes
    /// re-encodes to one that decodes the same (a frame replayed again
    /// means the same thing).
    #[test]
    fn frame_bodies_decode_or_are_malformed(kind in frame_kind(), body in bytes(96)) {
        if let Some(change) = decode_body(kind, &body)? {
            prop_assert_eq!(change.kind(), kind);
            let mut again = Vec::new();
            change.encode(&mut again);
            prop_assert_eq!(Change::decode(kind, &again), Ok(change));
        }
    }

    /// Every change decodes back to itself; damaged copies of its body
    /// decode or are malformed, within the allocation bound.
    #[test]
    fn changes_round_trip(change in change(), edits in vec(edit(), 1..4)) {
        let mut body = Vec::new();
        change.encode(&mut body);
        prop_assert_eq!(Change::decode(change.kind(), &body), Ok(change.clone()));
        let kind = change.kind();
        for cut in [0, body.len() / 2, body.len().saturating_sub(1)] {
            decode_body(kind, &body[..cut])?;
        }
        apply_edits(&mut body, &edits);
        decode_body(kind, &body)?;
    }

    /// A record key decodes to the counter and key it was made of; any
    /// bytes decode to a split of themselves or to nothing.
    #[test]
    fn record_keys_round_trip(counter in counter(), key in idempotency_key(), raw in bytes(40)) {
        let encoded = record_key(&counter, &key);
        prop_assert_eq!(decode_record_key(&encoded), Some((counter.as_str(), key.as_str())));
        if let Some((counter, key)) = decode_record_key(&raw) {
            prop_assert_eq!(raw.len(), 2 + counter.len() + key.len());
        }
    }
}

/// A body that is well formed up to a count or length, which is `huge`.
fn bodies_with_a_huge_count(huge: u64) -> Vec<(FrameKind, Vec<u8>)> {
    let mut bodies = Vec::new();
    let mut push = |kind, build: &dyn Fn(&mut Vec<u8>)| {
        let mut body = Vec::new();
        build(&mut body);
        bodies.push((kind, body));
    };
    let replica_head = |body: &mut Vec<u8>| {
        put_bytes(body, b"shard-2");
        put_varint(body, 1);
        put_varint(body, 2);
        put_varint(body, 3);
        body.push(1);
    };
    // Entries of a replica frame; then its records.
    push(FrameKind::Replica, &|body| {
        replica_head(body);
        put_varint(body, huge);
    });
    push(FrameKind::Replica, &|body| {
        replica_head(body);
        put_varint(body, 0);
        put_varint(body, huge);
    });
    // The origin's length.
    push(FrameKind::Replica, &|body| put_varint(body, huge));
    push(FrameKind::EraseCopies, &|body| put_varint(body, huge));
    push(FrameKind::SetOwn, &|body| {
        body.push(0);
        put_varint(body, huge);
    });
    push(FrameKind::SetOwn, &|body| {
        body.push(3);
        put_varint(body, 0);
        put_varint(body, huge);
    });
    push(FrameKind::Drain, &|body| put_varint(body, huge));
    push(FrameKind::DropCopy, &|body| put_varint(body, huge));
    push(FrameKind::StandIn, &|body| put_varint(body, huge));
    // An own-entries frame: counters, a counter's name, its stripes, the
    // records, a record's key.
    push(FrameKind::Own, &|body| put_varint(body, huge));
    push(FrameKind::Own, &|body| {
        put_varint(body, 1);
        put_varint(body, huge);
    });
    push(FrameKind::Own, &|body| {
        put_varint(body, 1);
        put_bytes(body, b"c");
        put_varint(body, huge);
    });
    push(FrameKind::Own, &|body| {
        put_varint(body, 0);
        put_varint(body, huge);
    });
    push(FrameKind::Own, &|body| {
        put_varint(body, 0);
        put_varint(body, 1);
        put_varint(body, huge);
    });
    bodies
}

proptest! {
    // Fourteen small decodes a case.
    #![proptest_config(config(256))]

    /// Every count and length of every frame body, damaged to more than
    /// the body holds (2^60 among them), is malformed and allocates
    /// nothing for it, whatever follows.
    #[test]
    fn huge_counts_in_frame_bodies_are_malformed(
        huge in prop_oneof![Just(1u64 << 60), Just(u64::MAX), 16..=u64::MAX],
        tail in bytes(8),
    ) {
        for (kind, mut body) in bodies_with_a_huge_count(huge) {
            body.extend_from_slice(&tail);
            let (decoded, largest) = largest_allocation(|| match kind {
                FrameKind::Own => OwnChanges::decode(&body).map(drop),
                kind => Change::decode(kind, &body).map(drop),
            });
            prop_assert!(decoded.is_err(), "{kind:?} {body:?} decoded");
            prop_assert!(
                largest <= allocation_bound(body.len()),
                "{kind:?}: asked for {largest} bytes"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Own-entries frames, through a store
// ---------------------------------------------------------------------------

/// Increments of a few counters: `(counter, stripe, delta, key)`.
type Increments = Vec<(String, u32, i64, Option<String>)>;

fn increments() -> impl Strategy<Value = Increments> {
    vec(counter(), 1..6).prop_flat_map(|counters| {
        vec(
            (
                proptest::sample::select(counters),
                stripe(),
                value(),
                proptest::option::weighted(0.3, "[a-c]{1,2}"),
            ),
            1..40,
        )
    })
}

fn apply(store: &Store, increments: &Increments) {
    for (counter, stripe, delta, key) in increments {
        store.apply(
            &[StripeIncrement {
                counter,
                stripe: *stripe,
                delta: *delta,
                idempotency_key: key.as_deref(),
            }],
            1_700_000_000_000,
        );
    }
}

/// Every counter's non-zero entries, and every record, sorted.
fn contents(store: &Store, increments: &Increments) -> (Vec<(String, u32, i64)>, Vec<CopyRecord>) {
    let mut entries: Vec<_> = increments
        .iter()
        .map(|(counter, ..)| counter)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .flat_map(|counter| {
            store
                .read(counter)
                .into_iter()
                .map(|(stripe, value)| (counter.clone(), stripe, value))
        })
        .collect();
    entries.sort();
    let mut records = store.records_where(|_, _| true);
    records.sort();
    (entries, records)
}

proptest! {
    // Two stores of up to 40 increments a case: well under a millisecond.
    #![proptest_config(config(256))]

    /// A flush's own-entries frame, replayed into an empty store, gives
    /// back the store's entries and records.
    #[test]
    fn own_frames_round_trip(increments in increments()) {
        let store = Store::new();
        apply(&store, &increments);
        let mut changes = OwnChanges::default();
        store.begin_flush(&mut changes, 0..0, &mut Vec::new());
        let mut body = Vec::new();
        changes.encode_into(&mut body);
        let (counters, records) = OwnChanges::decode(&body).unwrap();
        let replayed = Store::new();
        for logged in counters {
            for (stripe, value) in logged.stripes {
                replayed.replay(logged.counter, u32::from(stripe), value);
            }
        }
        for logged in records {
            replayed.replay_record(logged.key, logged.record);
        }
        prop_assert_eq!(contents(&replayed, &increments), contents(&store, &increments));
    }
}

// ---------------------------------------------------------------------------
// Log segments and the recovery scan
// ---------------------------------------------------------------------------

const SEGMENT_HEADER: usize = 32;
const FRAME_OVERHEAD: usize = 8 + 9;

fn segment_file(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

/// A segment header as the module docs of `crate::log` lay it out,
/// written here independently of the log's own code.
fn segment_header(first_seq: u64, chain: u32) -> Vec<u8> {
    let mut header = b"TALLYLOG".to_vec();
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&first_seq.to_le_bytes());
    header.extend_from_slice(&chain.to_le_bytes());
    let crc = crc32fast::hash(&header);
    header.extend_from_slice(&crc.to_le_bytes());
    header
}

/// A frame as the module docs lay it out: its bytes and its crc (the
/// chain of the next frame).
fn frame_bytes(chain: u32, seq: u64, kind: u8, body: &[u8]) -> (Vec<u8>, u32) {
    let mut payload = seq.to_le_bytes().to_vec();
    payload.push(kind);
    payload.extend_from_slice(body);
    let mut hasher = crc32fast::Hasher::new_with_initial(chain);
    hasher.update(&payload);
    let crc = hasher.finalize();
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&crc.to_le_bytes());
    frame.extend_from_slice(&payload);
    (frame, crc)
}

/// `(seq, kind, body)` of every frame a scan replays.
type Replayed = Vec<(u64, FrameKind, Vec<u8>)>;

fn scan(dir: &Path, position: u64, witnessed: u64) -> Result<(Replayed, LogEnd), LogError> {
    let mut replayed = Vec::new();
    let end = log::scan(dir, position, witnessed, |frame| {
        replayed.push((frame.seq, frame.kind, frame.body.to_vec()));
        Ok(())
    })?;
    Ok((replayed, end))
}

/// The frames written, numbered from 1.
fn numbered(frames: &[(FrameKind, Vec<u8>)]) -> Replayed {
    frames
        .iter()
        .enumerate()
        .map(|(index, (kind, body))| (index as u64 + 1, *kind, body.clone()))
        .collect()
}

/// One segment's specification: a name, a real header or any bytes,
/// frames with good or bad crcs and sequence numbers, and any tail. `None`
/// continues the segment before (its next frame, its chain), so that
/// runs of segments that read on are common, not only ones refused at
/// once.
#[derive(Debug, Clone)]
struct SegmentSpec {
    name: Option<u64>,
    /// `(first_seq, chain)`, or any bytes.
    header: Result<(Option<u64>, Option<u32>), Vec<u8>>,
    frames: Vec<FrameSpec>,
    tail: Vec<u8>,
}

#[derive(Debug, Clone)]
struct FrameSpec {
    /// `None`: the next number.
    seq: Option<u64>,
    kind: u8,
    body: Vec<u8>,
    good_crc: bool,
}

fn sequence_number() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(2),
        0..8u64,
        Just(u64::MAX - 1),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn segment_spec() -> impl Strategy<Value = SegmentSpec> {
    // Each damage is rare enough that runs of good frames are common.
    let frame = (
        proptest::option::weighted(0.03, sequence_number()),
        prop_oneof![20 => 1..=10u8, 1 => any::<u8>()],
        bytes(24),
        proptest::bool::weighted(0.97),
    )
        .prop_map(|(seq, kind, body, good_crc)| FrameSpec {
            seq,
            kind,
            body,
            good_crc,
        });
    let header = (
        proptest::option::weighted(0.05, sequence_number()),
        proptest::option::weighted(0.05, any::<u32>()),
    );
    (
        proptest::option::weighted(0.2, sequence_number()),
        prop_oneof![12 => header.prop_map(Ok), 1 => bytes(40).prop_map(Err)],
        vec(frame, 0..5),
        prop_oneof![6 => Just(Vec::new()), 1 => bytes(20)],
    )
        .prop_map(|(name, header, frames, tail)| SegmentSpec {
            name,
            header,
            frames,
            tail,
        })
}

/// Writes the segments; a name already taken is skipped.
fn write_segments(dir: &Path, specs: &[SegmentSpec]) {
    // The next frame and the chain, as the segment before leaves them.
    let (mut next, mut chain) = (1u64, 0u32);
    for spec in specs {
        let name = spec.name.unwrap_or(next);
        let mut bytes = Vec::new();
        match &spec.header {
            Ok((first_seq, header_chain)) => {
                next = first_seq.unwrap_or(name);
                chain = header_chain.unwrap_or(chain);
                bytes.extend(segment_header(next, chain));
            }
            Err(raw) => bytes.extend_from_slice(raw),
        }
        for frame in &spec.frames {
            let seq = frame.seq.unwrap_or(next);
            let (mut encoded, crc) = frame_bytes(chain, seq, frame.kind, &frame.body);
            if !frame.good_crc {
                encoded[4] ^= 1;
            }
            bytes.extend(encoded);
            next = seq.wrapping_add(1);
            chain = crc;
        }
        bytes.extend_from_slice(&spec.tail);
        let path = dir.join(segment_file(name));
        if !path.exists() {
            std::fs::write(path, bytes).unwrap();
        }
    }
}

fn position() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0),
        1 => 0..6u64,
        1 => Just(log::UNKNOWN_POSITION),
        1 => Just(u64::MAX - 1),
    ]
}

proptest! {
    // A few small files a case, without fsync: well under a millisecond.
    #![proptest_config(config(256))]

    /// Segment files of any names and contents, real headers and frames
    /// among them, are read or refused as damaged, never a panic or an
    /// I/O error; what is read is numbered without a gap, after the
    /// checkpoint's position, and reaches the witness.
    #[test]
    fn any_segments_are_read_or_refused(
        specs in vec(segment_spec(), 1..4),
        position in position(),
        witnessed in prop_oneof![3 => Just(0), 1 => 0..6u64, 1 => Just(u64::MAX)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_segments(dir.path(), &specs);
        let bytes: u64 = log::list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|(_, path)| std::fs::metadata(path).unwrap().len())
            .sum();
        // A frame's length field says up to 4 GiB: the scan must not
        // believe it before it has the bytes.
        let (scanned, largest) = largest_allocation(|| scan(dir.path(), position, witnessed));
        prop_assert!(largest <= allocation_bound(bytes as usize), "asked for {largest} bytes");
        match scanned {
            Ok((replayed, end)) => {
                prop_assert!(end.last_seq >= witnessed);
                if position != log::UNKNOWN_POSITION {
                    prop_assert!(end.last_seq >= position);
                }
                for pair in replayed.windows(2) {
                    prop_assert_eq!(pair[1].0, pair[0].0 + 1);
                }
                if let Some((first, ..)) = replayed.first() {
                    prop_assert!(*first > position);
                }
                if let Some((last, ..)) = replayed.last() {
                    prop_assert_eq!(*last, end.last_seq);
                }
            }
            Err(LogError::Damaged(message)) => prop_assert!(!message.is_empty()),
            Err(LogError::Io(error)) => prop_assert!(false, "I/O error: {error}"),
        }
    }

    /// A log written by hand as the module docs describe it reads back as
    /// written: the documented format is the one read.
    #[test]
    fn the_documented_format_is_read(
        frames in vec((frame_kind(), bytes(24)), 1..12),
        chain in any::<u32>(),
        per_segment in 1..5usize,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut chain = chain;
        for (index, group) in frames.chunks(per_segment).enumerate() {
            let first_seq = (index * per_segment) as u64 + 1;
            let mut bytes = segment_header(first_seq, chain);
            for (offset, (kind, body)) in group.iter().enumerate() {
                let (frame, crc) = frame_bytes(chain, first_seq + offset as u64, *kind as u8, body);
                bytes.extend(frame);
                chain = crc;
            }
            std::fs::write(dir.path().join(segment_file(first_seq)), bytes).unwrap();
        }
        let (replayed, end) = scan(dir.path(), 0, frames.len() as u64).unwrap();
        prop_assert_eq!(replayed, numbered(&frames));
        prop_assert_eq!(end.chain, chain);
        prop_assert_eq!(end.torn_bytes, 0);
    }
}

/// Where a frame was written: its segment (index in the log) and the
/// offset just after it.
#[derive(Debug, Clone, Copy)]
struct Place {
    segment: usize,
    end: u64,
}

/// Writes `frames` with the log's own writer, `group` frames a commit,
/// into a new log in `dir`; returns where each frame went.
fn write_log(
    dir: &Path,
    frames: &[(FrameKind, Vec<u8>)],
    group: usize,
    segment_bytes: u64,
) -> Vec<Place> {
    log::create(dir).unwrap();
    let (_, end) = scan(dir, 0, 0).unwrap();
    let mut writer = LogWriter::open(dir, &end, segment_bytes).unwrap();
    let mut places = Vec::new();
    for chunk in frames.chunks(group) {
        for (kind, body) in chunk {
            writer.append(*kind, |buffer| buffer.extend_from_slice(body));
        }
        writer.commit().unwrap();
        // A group goes whole into the last segment, ending at its end.
        let segments = log::list_segments(dir).unwrap();
        let mut end = std::fs::metadata(&segments.last().unwrap().1)
            .unwrap()
            .len();
        let mut group_places = Vec::new();
        for (_, body) in chunk.iter().rev() {
            group_places.push(Place {
                segment: segments.len() - 1,
                end,
            });
            end -= (FRAME_OVERHEAD + body.len()) as u64;
        }
        places.extend(group_places.into_iter().rev());
    }
    places
}

fn copy_log(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Damage to one segment file (which segment and where: modulo what there
/// is).
#[derive(Debug, Clone)]
enum Damage {
    Flip { segment: usize, at: usize, mask: u8 },
    Truncate { segment: usize, at: usize },
    Append { segment: usize, garbage: Vec<u8> },
}

fn damage() -> impl Strategy<Value = Damage> {
    let segment = prop_oneof![Just(usize::MAX), any::<usize>()];
    prop_oneof![
        (segment.clone(), any::<usize>(), 1..=255u8).prop_map(|(segment, at, mask)| Damage::Flip {
            segment,
            at,
            mask
        }),
        (segment.clone(), any::<usize>())
            .prop_map(|(segment, at)| Damage::Truncate { segment, at }),
        (segment, vec(any::<u8>(), 1..40))
            .prop_map(|(segment, garbage)| Damage::Append { segment, garbage }),
    ]
}

/// Applies `damage`; returns the segment it hit and the resolved offset
/// (for a flip or a cut).
fn apply_damage(dir: &Path, damage: &Damage) -> (usize, usize) {
    let segments = log::list_segments(dir).unwrap();
    let pick = |segment: usize| segment % segments.len();
    let (segment, at) = match damage {
        Damage::Flip { segment, at, mask } => {
            let segment = pick(*segment);
            let path = &segments[segment].1;
            let mut bytes = std::fs::read(path).unwrap();
            if bytes.is_empty() {
                return (segment, 0);
            }
            let at = at % bytes.len();
            bytes[at] ^= mask;
            std::fs::write(path, bytes).unwrap();
            (segment, at)
        }
        Damage::Truncate { segment, at } => {
            let segment = pick(*segment);
            let path = &segments[segment].1;
            let mut bytes = std::fs::read(path).unwrap();
            let at = at % (bytes.len() + 1);
            bytes.truncate(at);
            std::fs::write(path, bytes).unwrap();
            (segment, at)
        }
        Damage::Append { segment, garbage } => {
            let segment = pick(*segment);
            let path = &segments[segment].1;
            let mut bytes = std::fs::read(path).unwrap();
            bytes.extend_from_slice(garbage);
            std::fs::write(path, bytes).unwrap();
            (segment, usize::MAX)
        }
    };
    (segment, at)
}

/// What a scan must find after one damage, by the rules of the module
/// docs of `crate::log`: `Some(k)`, the first `k` frames (a torn tail cut
/// at the first bad frame of the last segment), or `None`, refused.
fn expected_after(
    damage: &Damage,
    hit: (usize, usize),
    places: &[Place],
    segments: usize,
) -> Option<usize> {
    let (segment, at) = hit;
    let last = segments - 1;
    let before_last = places.iter().filter(|place| place.segment < last).count();
    // Frames of the last segment wholly before byte `at`.
    let whole_before = |at: usize| {
        before_last
            + places
                .iter()
                .filter(|place| place.segment == last && place.end <= at as u64)
                .count()
    };
    let segment_length = |index: usize| {
        places
            .iter()
            .filter(|place| place.segment == index)
            .map(|place| place.end)
            .max()
            .unwrap_or(SEGMENT_HEADER as u64) as usize
    };
    match damage {
        Damage::Truncate { .. } if at == segment_length(segment) => Some(places.len()),
        Damage::Append { .. } if segment == last => Some(places.len()),
        // A bad frame, or a segment that does not continue, before the
        // last segment.
        _ if segment != last => None,
        // The last segment's header: a segment torn at creation, unless it
        // is the only one.
        _ if at < SEGMENT_HEADER => (segments > 1).then_some(before_last),
        _ => Some(whole_before(at)),
    }
}

fn logged_frames() -> impl Strategy<Value = Vec<(FrameKind, Vec<u8>)>> {
    vec((frame_kind(), bytes(40)), 1..16)
}

proptest! {
    // Each case writes a log with the log's writer (files created and
    // fsynced, a few milliseconds), then scans twelve damaged copies of it:
    // few cases, many damages each.
    #![proptest_config(config(16))]

    /// What the writer writes, across segments, a scan reads back, from
    /// any checkpoint position. Then, on copies: one flip, cut or append
    /// anywhere is recovered to exactly the frames before the first bad
    /// one of the last segment, or refused if it is before the last
    /// segment; the witness refuses a log that lost a durable frame; and a
    /// recovered log goes on from where it was cut.
    #[test]
    fn one_damage_is_cut_or_refused_as_documented(
        frames in logged_frames(),
        group in 1..6usize,
        segment_bytes in 40..200u64,
        position_percent in 0..=100usize,
        damages in vec(damage(), 12),
    ) {
        let root = tempfile::tempdir().unwrap();
        let written = root.path().join("written");
        let places = write_log(&written, &frames, group, segment_bytes);
        let count = frames.len() as u64;
        let segments = log::list_segments(&written).unwrap().len();

        let (replayed, end) = scan(&written, 0, count).unwrap();
        prop_assert_eq!(&replayed, &numbered(&frames));
        prop_assert_eq!((end.last_seq, end.frames, end.torn_bytes), (count, count, 0));
        let position = (frames.len() * position_percent / 100) as u64;
        let (replayed, _) = scan(&written, position, count).unwrap();
        prop_assert_eq!(replayed, numbered(&frames).split_off(position as usize));

        for (index, damage) in damages.iter().enumerate() {
            let dir = root.path().join(format!("damaged-{index}"));
            copy_log(&written, &dir);
            let hit = apply_damage(&dir, damage);
            let expected = expected_after(damage, hit, &places, segments);
            let found = scan(&dir, 0, 0);
            match (expected, found) {
                (Some(kept), Ok((replayed, end))) => {
                    prop_assert_eq!(&replayed, &numbered(&frames[..kept]), "{:?}", damage);
                    prop_assert_eq!(end.last_seq, kept as u64);
                    // The witness of the last frame accepts only a whole log.
                    let witnessed = scan(&dir, 0, count);
                    if kept == frames.len() {
                        prop_assert!(witnessed.is_ok());
                    } else {
                        let message = witnessed.unwrap_err().to_string();
                        let lost = message.contains("acknowledged writes are missing");
                        prop_assert!(lost, "{}", message);
                    }
                    // The log goes on after the cut.
                    let mut writer = LogWriter::open(&dir, &end, segment_bytes).unwrap();
                    writer.append(FrameKind::Own, |buffer| buffer.extend_from_slice(b"after"));
                    writer.commit().unwrap();
                    let (replayed, end) = scan(&dir, 0, kept as u64 + 1).unwrap();
                    let mut expected = numbered(&frames[..kept]);
                    expected.push((kept as u64 + 1, FrameKind::Own, b"after".to_vec()));
                    prop_assert_eq!(replayed, expected);
                    prop_assert_eq!(end.torn_bytes, 0);
                }
                (None, Err(LogError::Damaged(_))) => {}
                (expected, found) => prop_assert!(
                    false,
                    "{damage:?} hit {hit:?} of {segments} segments: expected {expected:?}, \
                     found {:?}",
                    found.map(|(replayed, end)| (replayed.len(), end))
                ),
            }
        }
    }

    /// Several damages at once: whatever a scan reads from any position
    /// is a run of the frames written, from the first after the position;
    /// anything else is refused as damaged.
    #[test]
    fn damaged_logs_yield_a_prefix_or_are_refused(
        frames in logged_frames(),
        group in 1..6usize,
        segment_bytes in 40..200u64,
        damages in vec(vec(damage(), 1..5), 12),
        position_percent in 0..=100usize,
    ) {
        let root = tempfile::tempdir().unwrap();
        let written = root.path().join("written");
        write_log(&written, &frames, group, segment_bytes);
        let position = (frames.len() * position_percent / 100) as u64;
        for (index, damages) in damages.iter().enumerate() {
            let dir = root.path().join(format!("damaged-{index}"));
            copy_log(&written, &dir);
            for damage in damages {
                apply_damage(&dir, damage);
            }
            match scan(&dir, position, 0) {
                Ok((replayed, end)) => {
                    let kept = end.last_seq as usize;
                    prop_assert!(kept <= frames.len());
                    let expected = numbered(&frames[..kept]).split_off(position as usize);
                    prop_assert_eq!(replayed, expected);
                }
                Err(LogError::Damaged(_)) => {}
                Err(LogError::Io(error)) => prop_assert!(false, "I/O error: {error}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Checkpoint buckets and metadata (sled)
// ---------------------------------------------------------------------------

fn node_meta() -> impl Strategy<Value = NodeMeta> {
    let ids = || btree_map(node_id(), any::<u64>(), 0..3);
    (
        (node_id(), any::<u64>(), any::<u64>(), any::<bool>()),
        (drain_state(), ids(), ids(), ids(), ids()),
        (
            btree_map(
                node_id(),
                (any::<u64>(), any::<bool>())
                    .prop_map(|(started_ms, closed)| StandIn { started_ms, closed }),
                0..3,
            ),
            any::<u64>(),
            keyed_ring(),
        ),
    )
        .prop_map(
            |(
                (node_id, directory_id, incarnation, awaiting_restore),
                (drain, retired, reconciled, copies_dated_from, reconciled_directories),
                (standing_in_for, last_takeover, keyed_ring),
            )| NodeMeta {
                node_id,
                directory_id,
                incarnation,
                awaiting_restore,
                drain,
                retired,
                standing_in_for,
                reconciled,
                last_takeover,
                copies_dated_from,
                reconciled_directories,
                keyed_ring,
            },
        )
}

/// A replica copy: its stamp, entries and records.
type CopyContents = (CopyStamp, Vec<(String, u32, i64)>, Vec<CopyRecord>);

/// Replica copies by origin.
type Copies = BTreeMap<String, CopyContents>;

fn copies() -> impl Strategy<Value = Copies> {
    btree_map(
        node_id(),
        (stamp(), vec(entry(), 0..8), vec(copy_record(), 0..4)),
        0..3,
    )
}

/// A copy as loaded: entries and records sorted.
fn copy_contents(replicas: &Replicas, origin: &str) -> Option<CopyContents> {
    replicas
        .copy_of(origin)
        .map(|(stamp, mut entries, mut records)| {
            entries.sort();
            records.sort();
            (stamp, entries, records)
        })
}

proptest! {
    // Metadata alone through JSON: microseconds a case.
    #![proptest_config(config(512))]

    /// The checkpoint's metadata reads back as written, every u64 whole.
    #[test]
    fn checkpoint_metadata_round_trips(
        node in node_meta(),
        format_version in any::<u64>(),
        position in any::<u64>(),
        copies in btree_map(node_id(), stamp(), 0..3),
    ) {
        let meta = CheckpointMeta { format_version, position, node, copies };
        let json = serde_json::to_vec(&meta).unwrap();
        prop_assert_eq!(serde_json::from_slice::<CheckpointMeta>(&json).unwrap(), meta);
    }
}

/// A copy of the sled database just closed at `path`, to open again.
/// sled releases its file lock only once its I/O threads drop their last
/// handles (reclaimed by epoch, some time after the database is dropped:
/// its own tests block on the lock for that reason), so opening the same
/// files at once can fail with `WouldBlock`. Everything was flushed when
/// it closed; `storage::verify` reads a checkpoint through a copy too.
fn reopenable(path: &Path) -> std::path::PathBuf {
    let copy = path.with_extension("copy");
    storage::copy_sled_files(path, &copy).unwrap();
    copy
}

proptest! {
    // sled opens a database twice a case (about 20 ms a case in a debug
    // build): few cases, each holding many entries.
    #![proptest_config(config(16))]

    /// Own entries, records and replica copies written to a checkpoint
    /// load back as they were, with its metadata; copies of retired nodes
    /// are skipped.
    #[test]
    fn checkpoints_round_trip(
        increments in increments(),
        copies in copies(),
        node in node_meta(),
        retire_first in any::<bool>(),
        position in any::<u64>(),
    ) {
        let store = Store::new();
        apply(&store, &increments);
        let replicas = Replicas::default();
        for (origin, (stamp, entries, records)) in &copies {
            let entries: Vec<(&str, u32, i64)> = entries
                .iter()
                .map(|(counter, stripe, value)| (counter.as_str(), *stripe, *value))
                .collect();
            replicas.apply(origin, *stamp, true, &entries, records, 1);
        }
        let mut node = node;
        let retired = copies.keys().next().filter(|_| retire_first).cloned();
        if let Some(origin) = &retired {
            node.retired.insert(origin.clone(), 1);
        }
        let meta = CheckpointMeta {
            format_version: storage::FORMAT_VERSION,
            position,
            node,
            copies: replicas.stamps().into_iter().collect(),
        };

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        {
            let checkpoint = Checkpoint::open(&path).unwrap();
            let mut buckets = Vec::new();
            store.mark_all_for_checkpoint();
            store.begin_flush(&mut OwnChanges::default(), 0..SEGMENT_COUNT, &mut buckets);
            checkpoint.write_buckets(None, &buckets).unwrap();
            replicas.mark_all_for_checkpoint();
            for origin in replicas.origins() {
                let mut buckets = Vec::new();
                replicas.capture(&origin, 0..SEGMENT_COUNT, &mut buckets);
                checkpoint.write_buckets(Some(&origin), &buckets).unwrap();
            }
            checkpoint.finish(&meta).unwrap();
        }
        let (loaded_store, loaded_replicas) = (Store::new(), Replicas::default());
        let loaded = Checkpoint::open(&reopenable(&path))
            .unwrap()
            .load(&loaded_store, &loaded_replicas)
            .unwrap();
        prop_assert_eq!(loaded.meta, Some(meta));
        prop_assert_eq!(contents(&loaded_store, &increments), contents(&store, &increments));
        for origin in copies.keys() {
            if Some(origin) == retired.as_ref() {
                prop_assert!(!loaded_replicas.has_copy(origin));
            } else {
                prop_assert_eq!(
                    copy_contents(&loaded_replicas, origin),
                    copy_contents(&replicas, origin)
                );
            }
        }
    }

    /// A checkpoint tree of any keys and values (real bucket keys, damaged
    /// bucket contents and metadata among them) loads or is refused with a
    /// message naming what was wrong: never a panic.
    #[test]
    fn any_checkpoint_contents_load_or_are_refused(
        pairs in vec(checkpoint_pair(), 1..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        {
            let db = sled::Config::new().path(&path).open().unwrap();
            let tree = db.open_tree("checkpoint").unwrap();
            for (key, value) in &pairs {
                tree.insert(key.as_slice(), value.as_slice()).unwrap();
            }
            db.flush().unwrap();
        }
        let result = Checkpoint::open(&reopenable(&path))
            .unwrap()
            .load(&Store::new(), &Replicas::default());
        if let Err(message) = result {
            prop_assert!(message.contains("checkpoint"), "{}", message);
        }
    }
}

/// A key and value of a checkpoint tree: the metadata (good or damaged),
/// own and copy buckets (keys of the right shape or not, contents good or
/// damaged), or anything.
fn checkpoint_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let good_bucket = || {
        (vec(entry(), 0..4), vec(copy_record(), 0..3)).prop_map(|(entries, records)| {
            let mut contents = Vec::new();
            put_varint(&mut contents, entries.len() as u64);
            for (counter, stripe, value) in entries {
                put_bytes(&mut contents, counter.as_bytes());
                put_varint(&mut contents, 1);
                put_varint(&mut contents, u64::from(stripe));
                put_signed(&mut contents, value);
            }
            put_varint(&mut contents, records.len() as u64);
            for (key, delta, applied) in records {
                put_bytes(&mut contents, &key);
                put_signed(&mut contents, delta);
                put_varint(&mut contents, applied);
            }
            contents
        })
    };
    let contents = prop_oneof![
        4 => good_bucket(),
        2 => (good_bucket(), vec(edit(), 1..3)).prop_map(|(mut contents, edits)| {
            apply_edits(&mut contents, &edits);
            contents
        }),
        1 => bytes(40),
    ];
    let meta =
        (node_meta(), any::<u64>(), vec(edit(), 0..3)).prop_map(|(node, position, edits)| {
            let meta = CheckpointMeta {
                format_version: storage::FORMAT_VERSION,
                position,
                node,
                copies: BTreeMap::new(),
            };
            let mut json = serde_json::to_vec(&meta).unwrap();
            apply_edits(&mut json, &edits);
            json
        });
    prop_oneof![
        1 => meta.prop_map(|json| (b"M".to_vec(), json)),
        3 => (any::<u16>(), contents.clone()).prop_map(|(bucket, contents)| {
            let mut key = vec![b'B'];
            key.extend_from_slice(&bucket.to_be_bytes());
            (key, contents)
        }),
        3 => (
            "\\PC{1,10}",
            any::<u16>(),
            // The origin's length byte, sometimes off by one.
            prop_oneof![4 => Just(0i8), 1 => -1..=1i8],
            contents,
        )
            .prop_map(|(origin, bucket, skew, contents)| {
                let mut key = vec![b'C', (origin.len() as u8).wrapping_add_signed(skew)];
                key.extend_from_slice(origin.as_bytes());
                key.extend_from_slice(&bucket.to_be_bytes());
                (key, contents)
            }),
        1 => (bytes(8), bytes(20)),
    ]
}

// ---------------------------------------------------------------------------
// The data directory's marker and witness files
// ---------------------------------------------------------------------------

fn error_names(error: &StorageError, dir: &Path) -> Result<(), TestCaseError> {
    let message = error.to_string();
    prop_assert!(
        message.contains(&dir.display().to_string()),
        "{message} does not name {}",
        dir.display()
    );
    prop_assert!(!message.contains('\n'), "{message}");
    Ok(())
}

/// A marker file's text, and whether a build of this format reads it
/// (`None`: not known, for damaged texts). Readable: format 3, or format 2
/// once set up.
fn marker_text() -> impl Strategy<Value = (String, Option<bool>)> {
    let fields =
        || {
            (
                prop_oneof![Just(3u64), Just(2), any::<u64>()],
                node_id(),
                prop_oneof![Just("ready"), Just("setting_up")],
            )
                .prop_map(|(version, node, state)| {
                    let readable = version == 3 || (version == 2 && state == "ready");
                    (
                format!("format_version = {version}\nnode_id = \"{node}\"\nstate = \"{state}\"\n"),
                Some(readable),
            )
                })
        };
    prop_oneof![
        2 => fields(),
        2 => (fields(), vec(edit(), 1..3)).prop_map(|((text, _), edits)| {
            let mut bytes = text.into_bytes();
            apply_edits(&mut bytes, &edits);
            (String::from_utf8_lossy(&bytes).into_owned(), None)
        }),
        1 => "\\PC{0,60}".prop_map(|text| (text, None)),
    ]
}

proptest! {
    // A small file and a directory listing a case: well under a
    // millisecond.
    #![proptest_config(config(256))]

    /// A marker file of any text is refused with one line naming the
    /// directory (a marker alone is never a usable directory): as damaged
    /// if no build of this format reads it, and for what is missing next
    /// if one does.
    #[test]
    fn any_marker_is_read_or_refused((text, readable) in marker_text()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("TALLY"), &text).unwrap();
        let error = storage::verify(dir.path()).expect_err("a directory with a marker alone");
        error_names(&error, dir.path())?;
        if let Some(readable) = readable {
            prop_assert_eq!(!matches!(error, StorageError::Damaged { .. }), readable, "{}", error);
        }
    }
}

/// The witness text the storage module documents:
/// `logged N checkpoint HASH position P`, each a number, and a newline.
fn witness_parts(text: &str) -> Option<(u64, u64, u64)> {
    let words: Vec<&str> = text.strip_suffix('\n')?.split(' ').collect();
    let ["logged", logged, "checkpoint", hash, "position", position] = words[..] else {
        return None;
    };
    Some((
        logged.parse().ok()?,
        u64::from_str_radix(hash, 16).ok()?,
        position.parse().ok()?,
    ))
}

/// A witness file's bytes: a good witness (of a frame the log may or may
/// not hold), one damaged, or any bytes, UTF-8 or not.
fn witness_bytes() -> impl Strategy<Value = Vec<u8>> {
    let good = (0..6u64, prop_oneof![Just(0u64), any::<u64>()], any::<u64>()).prop_map(
        |(logged, hash, position)| {
            format!("logged {logged:020} checkpoint {hash:016x} position {position:020}\n")
                .into_bytes()
        },
    );
    prop_oneof![
        2 => good.clone(),
        3 => (good, vec(edit(), 1..3)).prop_map(|(mut bytes, edits)| {
            apply_edits(&mut bytes, &edits);
            bytes
        }),
        1 => "\\PC{0,80}".prop_map(String::into_bytes),
        1 => bytes(80),
    ]
}

/// A witness file of any bytes, in a real data directory (set up once: a
/// node's first start), is read or refused naming the directory: a start
/// goes on exactly when they are a witness of a frame the log holds.
#[test]
fn any_witness_is_read_or_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let recovered = storage::Storage::open(&dir, "shard-1", Default::default(), 1 << 20).unwrap();
    let last_seq = recovered.log.last_seq();
    drop(recovered);
    // Reading a file a case: well under a millisecond.
    let mut runner = TestRunner::new(config(256));
    runner
        .run(&witness_bytes(), |bytes| {
            std::fs::write(dir.join("LOGGED"), &bytes).unwrap();
            let result = storage::verify(&dir);
            let expected = std::str::from_utf8(&bytes)
                .ok()
                .and_then(witness_parts)
                .filter(|(logged, ..)| *logged <= last_seq);
            match (&result, expected) {
                (Ok(report), Some((logged, ..))) => prop_assert_eq!(report.witnessed, logged),
                (Err(error), None) => error_names(error, &dir)?,
                _ => prop_assert!(false, "{bytes:?}: {result:?}"),
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------
// Format 2 directories
// ---------------------------------------------------------------------------

const OLD_NODE: &str = "shard-1";

fn word(value: u64) -> Vec<u8> {
    value.to_be_bytes().to_vec()
}

/// What a well-formed format 2 `data` tree holds, as the module docs of
/// `crate::legacy` lay it out.
#[derive(Debug, Clone)]
enum OldPair {
    /// `(origin, counter, stripe, value)`.
    Entry(String, String, u32, i64),
    /// `(counter, idempotency key, delta, applied)`.
    Record(String, String, i64, u64),
    Restored(u64),
    Drain(DrainState),
    /// A retired node: `gone/` and a number, never an origin of entries.
    Adopted(u8, u64),
    /// A copy's stamp: 1 to 3 of its words.
    Stamp(String, Vec<u64>),
}

impl OldPair {
    fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        match self {
            OldPair::Entry(origin, counter, stripe, value) => {
                let mut key = vec![origin.len() as u8];
                key.extend_from_slice(origin.as_bytes());
                key.extend_from_slice(&(counter.len() as u16).to_be_bytes());
                key.extend_from_slice(counter.as_bytes());
                key.extend_from_slice(&stripe.to_be_bytes());
                (key, word(*value as u64))
            }
            OldPair::Record(counter, idempotency_key, delta, applied) => {
                let mut key = vec![0, b'K'];
                key.extend_from_slice(&(counter.len() as u16).to_be_bytes());
                key.extend_from_slice(counter.as_bytes());
                key.extend_from_slice(idempotency_key.as_bytes());
                let mut value = word(*delta as u64);
                value.extend(word(*applied));
                (key, value)
            }
            OldPair::Restored(restored) => (vec![0, b'R'], word(*restored)),
            OldPair::Drain(state) => {
                let value = match state {
                    DrainState::Serving => vec![0],
                    DrainState::Draining => vec![1],
                    DrainState::HandedOver { adopter, version }
                    | DrainState::Drained { adopter, version } => {
                        let kind = if matches!(state, DrainState::HandedOver { .. }) {
                            2
                        } else {
                            3
                        };
                        let mut value = vec![kind];
                        value.extend(word(*version));
                        value.extend_from_slice(adopter.as_bytes());
                        value
                    }
                };
                (vec![0, b'D'], value)
            }
            OldPair::Adopted(origin, version) => {
                let mut key = vec![0, b'A'];
                key.extend(format!("gone/{origin}").into_bytes());
                (key, word(*version))
            }
            OldPair::Stamp(origin, words) => {
                let mut key = vec![0, b'V'];
                key.extend_from_slice(origin.as_bytes());
                (key, words.iter().flat_map(|value| word(*value)).collect())
            }
        }
    }
}

fn old_pair() -> impl Strategy<Value = OldPair> {
    let origin = || {
        prop_oneof![
            4 => Just(OLD_NODE.to_string()),
            2 => node_id(),
            1 => "\\PC{1,8}",
        ]
    };
    prop_oneof![
        6 => (origin(), counter(), stripe(), value())
            .prop_map(|(origin, counter, stripe, value)| {
                OldPair::Entry(origin, counter, stripe, value)
            }),
        2 => (counter(), idempotency_key(), any::<i64>(), any::<u64>())
            .prop_map(|(counter, key, delta, applied)| {
                OldPair::Record(counter, key, delta, applied)
            }),
        1 => (0..3u64).prop_map(OldPair::Restored),
        1 => drain_state().prop_map(OldPair::Drain),
        1 => (any::<u8>(), any::<u64>())
            .prop_map(|(origin, version)| OldPair::Adopted(origin, version)),
        1 => (origin(), vec(any::<u64>(), 1..=3))
            .prop_map(|(origin, words)| OldPair::Stamp(origin, words)),
    ]
}

/// A key and value no format 2 build wrote: a field of a well-formed pair
/// damaged (a counter name empty or too long, a stripe out of range, a
/// value of the wrong length), or any bytes. Some are well formed by
/// chance.
fn damaged_old_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let origin = || prop_oneof![Just(OLD_NODE.to_string()), Just("shard-2".to_string())];
    prop_oneof![
        // A name the current format cannot hold, at a stripe it can.
        3 => (origin(), prop_oneof![Just(String::new()), "[a-z]{257,300}"], stripe())
            .prop_map(|(origin, counter, stripe)| {
                OldPair::Entry(origin, counter, stripe, 1).encode()
            }),
        // A stripe it cannot hold: mostly one that still fits memory's
        // u16 (a larger one the store would drop without a word).
        3 => (
            origin(),
            counter(),
            prop_oneof![
                Just(MAX_STRIPES),
                MAX_STRIPES..=u32::from(u16::MAX),
                any::<u32>(),
            ],
        )
            .prop_map(|(origin, counter, stripe)| {
                OldPair::Entry(origin, counter, stripe, 1).encode()
            }),
        2 => (old_pair(), vec(edit(), 1..3)).prop_map(|(pair, edits)| {
            let (mut key, mut value) = pair.encode();
            apply_edits(&mut key, &edits[..1]);
            apply_edits(&mut value, &edits[1..]);
            (key, value)
        }),
        1 => (bytes(12), bytes(12)),
    ]
}

/// Writes a format 2 directory: its sled database (`meta` and `data`
/// trees), the `FLUSHED` witness and the marker.
fn write_old_directory(
    dir: &Path,
    pairs: &BTreeMap<Vec<u8>, Vec<u8>>,
    sequence: u64,
    flushed: u64,
) {
    std::fs::create_dir_all(dir).unwrap();
    {
        let db = sled::Config::new().path(dir).open().unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format_version", &2u64.to_be_bytes()).unwrap();
        meta.insert("node_id", OLD_NODE.as_bytes()).unwrap();
        meta.insert("directory_id", &7u64.to_be_bytes()).unwrap();
        let data = db.open_tree("data").unwrap();
        for (key, value) in pairs {
            data.insert(key.as_slice(), value.as_slice()).unwrap();
        }
        data.insert([0, b'S'], &sequence.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    std::fs::write(dir.join("FLUSHED"), format!("flushed {flushed} clean 1\n")).unwrap();
    std::fs::write(
        dir.join("TALLY"),
        format!("format_version = 2\nnode_id = \"{OLD_NODE}\"\nstate = \"ready\"\n"),
    )
    .unwrap();
}

fn old_report_counts(report: &storage::DirectoryReport) -> (u64, u64, u64) {
    (report.entries, report.foreign_entries, report.records)
}

proptest! {
    // sled opens the old database and its copies four or five times a
    // case (about 20 ms a case in a debug build): few cases, each with
    // many keys.
    #![proptest_config(config(24))]

    /// A well-formed format 2 directory reads with every entry and record,
    /// and migrates to a directory the current format reads holding the
    /// same; one with a damaged key, value or `FLUSHED` witness (or fewer
    /// flushes than its witness names) is refused naming the directory,
    /// or, if it reads, migrates as well: never a panic, and never a
    /// migration to a directory no start can read.
    #[test]
    fn old_directories_migrate_or_are_refused(
        pairs in vec(old_pair(), 0..24),
        damaged in proptest::option::weighted(0.7, damaged_old_pair()),
        sequence in 0..4u64,
        flushed in 0..4u64,
        witness_edits in proptest::option::weighted(0.15, vec(edit(), 1..3)),
    ) {
        let mut tree: BTreeMap<Vec<u8>, Vec<u8>> = pairs.iter().map(OldPair::encode).collect();
        let well_formed = damaged.is_none() && witness_edits.is_none();
        tree.extend(damaged);
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        write_old_directory(&dir, &tree, sequence, flushed);
        if let Some(edits) = witness_edits {
            let mut witness = std::fs::read(dir.join("FLUSHED")).unwrap();
            apply_edits(&mut witness, &edits);
            std::fs::write(dir.join("FLUSHED"), witness).unwrap();
        }
        let old = storage::verify(&dir);
        if well_formed {
            // What each key holds, by the keys that remain (a later pair of
            // the same key replaced an earlier one).
            let (mut entries, mut foreign, mut records) = (0, 0, 0);
            for pair in &pairs {
                let (key, value) = pair.encode();
                if tree.get(&key) != Some(&value) {
                    continue;
                }
                tree.remove(&key);
                match pair {
                    OldPair::Entry(_, _, _, 0) => {}
                    OldPair::Entry(origin, ..) if origin == OLD_NODE => entries += 1,
                    OldPair::Entry(..) => foreign += 1,
                    OldPair::Record(..) => records += 1,
                    _ => {}
                }
            }
            match &old {
                Ok(report) if flushed <= sequence => {
                    prop_assert_eq!(old_report_counts(report), (entries, foreign, records));
                }
                Err(StorageError::Refused { problem, .. }) if flushed > sequence => {
                    let lost = problem.contains("acknowledged writes are missing");
                    prop_assert!(lost, "{}", problem);
                }
                _ => prop_assert!(false, "flushed {flushed} of {sequence}: {old:?}"),
            }
        }
        let migrated = crate::legacy::migrate(&dir, OLD_NODE);
        match (&old, &migrated) {
            (Ok(old), Ok(())) => {
                let new = storage::verify(&dir);
                prop_assert!(new.is_ok(), "migrated, then refused: {:?}", new);
                prop_assert_eq!(old_report_counts(&new.unwrap()), old_report_counts(old));
            }
            (Err(error), Err(_)) => error_names(error, &dir)?,
            _ => prop_assert!(false, "verify: {old:?}, migrate: {migrated:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// What these tests found, kept as plain tests
// ---------------------------------------------------------------------------

/// A segment whose header (checksum and all) says it starts at frame 0
/// made the scan compute frame `0 - 1` (a panic in a debug build, frame
/// `u64::MAX` in a release build); a frame numbered `u64::MAX` would make
/// the next one overflow.
#[test]
fn frames_numbered_zero_or_u64_max_are_damage() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(segment_file(0)), segment_header(0, 0)).unwrap();
    let error = scan(dir.path(), 0, 0).unwrap_err();
    assert!(error.to_string().contains("starts at frame 0"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let first = u64::MAX - 1;
    let mut bytes = segment_header(first, 0);
    let (frame, crc) = frame_bytes(0, first, FrameKind::Start as u8, &[1]);
    bytes.extend(frame);
    bytes.extend(frame_bytes(crc, u64::MAX, FrameKind::Start as u8, &[2]).0);
    std::fs::write(dir.path().join(segment_file(first)), bytes).unwrap();
    let (_, end) = scan(dir.path(), log::UNKNOWN_POSITION, 0).unwrap();
    assert_eq!((end.frames, end.last_seq), (1, first));
    assert!(end.torn_bytes > 0);
}

/// A format 2 entry whose counter name is empty or longer than 256 bytes
/// reached memory's table (a panic in a debug build, a corrupt table in a
/// release build); one with a stripe of 4096 or more migrated to a
/// checkpoint that no start could read.
#[test]
fn old_entries_the_current_format_cannot_hold_are_refused() {
    let entries = [
        OldPair::Entry(OLD_NODE.into(), String::new(), 0, 1),
        OldPair::Entry("shard-2".into(), "x".repeat(257), 0, 1),
        OldPair::Entry(OLD_NODE.into(), "c".into(), MAX_STRIPES, 1),
    ];
    for entry in entries {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        write_old_directory(&dir, &[entry.encode()].into(), 0, 0);
        let error = storage::verify(&dir).unwrap_err();
        assert!(error.to_string().contains("undecodable key"), "{error}");
        assert!(crate::legacy::migrate(&dir, OLD_NODE).is_err());
    }
}

/// toml's message for an unreadable marker spans lines; a refusal is one.
#[test]
fn an_unreadable_marker_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("TALLY"), "format_version = 3\nnode_id = \n").unwrap();
    let error = storage::verify(dir.path()).unwrap_err();
    assert!(matches!(error, StorageError::Damaged { .. }), "{error}");
    assert!(!error.to_string().contains('\n'), "{error}");
}
