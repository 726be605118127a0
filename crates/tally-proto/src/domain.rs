//! Validated domain types: what a request means once its input is known good.
//!
//! Limits are the public contract's (docs/API.md): a counter name is 1 to 256
//! bytes, an idempotency key at most 128 bytes, a batch at most 10,000 items.

use std::fmt;

use crate::pb;

/// Longest counter name, in bytes.
pub const MAX_COUNTER_NAME_BYTES: usize = 256;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;
/// Most items in one `IncrementBatch` or `GetBatch`.
pub const MAX_BATCH_ITEMS: usize = 10_000;

/// Input that breaks the contract: it becomes `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The counter name is empty.
    #[error("counter name is empty")]
    EmptyCounterName,
    /// The counter name is longer than [`MAX_COUNTER_NAME_BYTES`].
    #[error("counter name is {length} bytes, more than the limit of {MAX_COUNTER_NAME_BYTES}")]
    CounterNameTooLong {
        /// Length of the name in bytes.
        length: usize,
    },
    /// The idempotency key is longer than [`MAX_IDEMPOTENCY_KEY_BYTES`].
    #[error(
        "idempotency key is {length} bytes, more than the limit of {MAX_IDEMPOTENCY_KEY_BYTES}"
    )]
    IdempotencyKeyTooLong {
        /// Length of the key in bytes.
        length: usize,
    },
    /// The batch has more than [`MAX_BATCH_ITEMS`] items.
    #[error("batch has {length} items, more than the limit of {MAX_BATCH_ITEMS}")]
    BatchTooLarge {
        /// Number of items in the batch.
        length: usize,
    },
    /// The counter name starts with U+0000, which marks the names of
    /// windows (see [`crate::window`]).
    #[error("counter name starts with U+0000, which is reserved")]
    ReservedCounterName,
    /// The counter name is too long to carry a window's tag.
    #[error(
        "counter name is {length} bytes, more than the limit of {} for a counter with a window",
        crate::window::MAX_WINDOWED_NAME_BYTES
    )]
    WindowedNameTooLong {
        /// Length of the name in bytes.
        length: usize,
    },
    /// A field's value, or its combination with others, makes no sense.
    #[error("{field}: {problem}")]
    Field {
        /// The request field, as the proto names it.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// One item of a batch is invalid.
    #[error("item {index}: {error}")]
    InBatch {
        /// Position of the item in the batch, from 0.
        index: usize,
        /// What is wrong with it.
        error: Box<ProtocolError>,
    },
}

impl From<ProtocolError> for tonic::Status {
    fn from(error: ProtocolError) -> Self {
        tonic::Status::invalid_argument(error.to_string())
    }
}

/// A counter's name as shards store it: 1 to [`MAX_COUNTER_NAME_BYTES`]
/// bytes of UTF-8. Either a client's name, or a window of one (a name
/// starting with U+0000: see [`crate::window`]), which only a coordinator
/// makes; [`CounterName::public`] is the rule for clients' names.
///
/// # Examples
///
/// ```
/// use tally_proto::domain::{CounterName, ProtocolError};
///
/// let name = CounterName::public("page:views".to_string()).unwrap();
/// assert_eq!(name.as_str(), "page:views");
/// assert_eq!(CounterName::try_from(String::new()), Err(ProtocolError::EmptyCounterName));
/// assert_eq!(
///     CounterName::public("\0x".to_string()),
///     Err(ProtocolError::ReservedCounterName)
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterName(String);

impl CounterName {
    /// Checks a stored name without taking ownership: the rule `TryFrom`
    /// applies, for callers that only need to know (the shard, per
    /// increment). A name starting with U+0000 must be a window's.
    pub fn validate(name: &str) -> Result<(), ProtocolError> {
        if name.is_empty() {
            return Err(ProtocolError::EmptyCounterName);
        }
        if name.len() > MAX_COUNTER_NAME_BYTES {
            return Err(ProtocolError::CounterNameTooLong { length: name.len() });
        }
        if name.starts_with('\0') && crate::window::Window::of_stored(name).is_none() {
            return Err(ProtocolError::ReservedCounterName);
        }
        Ok(())
    }

    /// A client's name: 1 to [`MAX_COUNTER_NAME_BYTES`] bytes, not
    /// starting with U+0000 (which marks windows). The rule `TryFrom`
    /// applies.
    pub fn public(name: String) -> Result<Self, ProtocolError> {
        if name.starts_with('\0') {
            return Err(ProtocolError::ReservedCounterName);
        }
        CounterName::stored(name)
    }

    /// A stored name (a client's or a window's), from a shard or for one.
    pub fn stored(name: String) -> Result<Self, ProtocolError> {
        CounterName::validate(&name)?;
        Ok(CounterName(name))
    }

    /// The name of this counter's `window`: a counter of its own.
    pub fn in_window(&self, window: crate::window::Window) -> Result<Self, ProtocolError> {
        self.tagged(&window.tag())
    }

    /// The name of this counter in the window whose tag is `tag`.
    pub fn tagged(&self, tag: &crate::window::Tag) -> Result<Self, ProtocolError> {
        if self.0.len() > crate::window::MAX_WINDOWED_NAME_BYTES {
            return Err(ProtocolError::WindowedNameTooLong {
                length: self.0.len(),
            });
        }
        Ok(CounterName(tag.name(&self.0)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl TryFrom<String> for CounterName {
    type Error = ProtocolError;

    /// A client's name ([`CounterName::public`]).
    fn try_from(name: String) -> Result<Self, Self::Error> {
        CounterName::public(name)
    }
}

impl fmt::Display for CounterName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// A client's idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes. The
/// empty string on the wire means "no key".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Reads the optional key of a wire request: empty means none.
    pub fn from_wire(key: String) -> Result<Option<Self>, ProtocolError> {
        if key.is_empty() {
            return Ok(None);
        }
        Self::validate(&key)?;
        Ok(Some(IdempotencyKey(key)))
    }

    /// Checks a key's length without taking ownership: for shards, which
    /// check again what a coordinator sent.
    pub fn validate(key: &str) -> Result<(), ProtocolError> {
        if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(ProtocolError::IdempotencyKeyTooLong { length: key.len() });
        }
        Ok(())
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// One validated increment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    /// The counter to change.
    pub counter: CounterName,
    /// Amount to add; negative decrements, 0 changes nothing.
    pub delta: i64,
    /// Makes a retried increment apply once.
    pub idempotency_key: Option<IdempotencyKey>,
    /// The counter's current fixed window of this many seconds, if any
    /// (the coordinator turns `counter` into the window's name).
    pub window_seconds: Option<u32>,
    /// How the caller wants the total after the increment, if at all.
    pub read_back: Option<ReadBack>,
}

/// What an increment asks for besides being applied: the total after it,
/// and perhaps a limit on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadBack {
    /// Apply only if the total after would be at most this.
    pub limit: Option<i64>,
    /// A total without some shard's part will do (`complete = false`).
    pub allow_partial: bool,
}

impl Increment {
    /// An increment of `delta` to `counter`, with nothing else asked.
    pub fn plain(
        counter: CounterName,
        delta: i64,
        idempotency_key: Option<IdempotencyKey>,
    ) -> Self {
        Increment {
            counter,
            delta,
            idempotency_key,
            window_seconds: None,
            read_back: None,
        }
    }

    /// Checks that the increment may go in an `IncrementBatch`, which
    /// answers no total and no applied amount.
    pub fn check_batchable(&self) -> Result<(), ProtocolError> {
        match self.read_back {
            None => Ok(()),
            Some(ReadBack { limit: Some(_), .. }) => Err(ProtocolError::Field {
                field: "limit",
                problem: "not in IncrementBatch, which answers no applied amount; use Increment"
                    .to_string(),
            }),
            Some(_) => Err(ProtocolError::Field {
                field: "return_total",
                problem: "not in IncrementBatch; use Increment, or GetBatch after the batch"
                    .to_string(),
            }),
        }
    }
}

impl TryFrom<pb::IncrementRequest> for Increment {
    type Error = ProtocolError;

    /// A client's increment: the public rules for every field.
    fn try_from(request: pb::IncrementRequest) -> Result<Self, Self::Error> {
        let counter = CounterName::public(request.counter)?;
        let idempotency_key = IdempotencyKey::from_wire(request.idempotency_key)?;
        // The name's length with a window is checked where the window is
        // known (`CounterName::tagged`).
        let window_seconds = crate::window::seconds_from_wire(request.window_seconds)?;
        if request.limit.is_some() {
            if request.delta < 0 {
                return Err(ProtocolError::Field {
                    field: "limit",
                    problem: format!(
                        "delta is {}; a limited increment must not be negative (a decrement \
                         needs no limit)",
                        request.delta
                    ),
                });
            }
            if idempotency_key.is_some() {
                return Err(ProtocolError::Field {
                    field: "limit",
                    problem: "not with an idempotency_key: a retry could be refused for the \
                              increment its own first attempt applied"
                        .to_string(),
                });
            }
        }
        let read_back = if request.return_total || request.limit.is_some() {
            Some(ReadBack {
                limit: request.limit,
                allow_partial: request.allow_partial,
            })
        } else if request.allow_partial {
            return Err(ProtocolError::Field {
                field: "allow_partial",
                problem: "only with return_total or limit: an increment reads nothing otherwise"
                    .to_string(),
            });
        } else {
            None
        };
        Ok(Increment {
            counter,
            delta: request.delta,
            idempotency_key,
            window_seconds,
            read_back,
        })
    }
}

/// Validates every item of a batch before any is used: one bad item rejects
/// the whole batch, naming its position.
pub fn validate_batch<Wire, Domain>(items: Vec<Wire>) -> Result<Vec<Domain>, ProtocolError>
where
    Domain: TryFrom<Wire, Error = ProtocolError>,
{
    if items.len() > MAX_BATCH_ITEMS {
        return Err(ProtocolError::BatchTooLarge {
            length: items.len(),
        });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            Domain::try_from(item).map_err(|error| ProtocolError::InBatch {
                index,
                error: Box::new(error),
            })
        })
        .collect()
}

/// Checks a node id: 1 to 64 bytes of ASCII letters, digits, `-`, `_`, `.`;
/// ids appear in storage keys, logs and error messages, so they stay plain.
pub fn validate_node_id(node_id: &str) -> Result<(), String> {
    if node_id.is_empty() {
        return Err("node id must not be empty".to_string());
    }
    if node_id.len() > 64 {
        return Err(format!("node id {node_id:?} is longer than 64 bytes"));
    }
    if let Some(bad) = node_id
        .chars()
        .find(|character| !(character.is_ascii_alphanumeric() || "-_.".contains(*character)))
    {
        return Err(format!(
            "node id {node_id:?} has {bad:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// Drain states, in order: each comes after the one before, and a node's
/// state only moves forward.
impl pb::ReplicateRequest {
    /// A push of `changes` (the origin's answer to `Changes` since `base`)
    /// to `replica`'s copy of `origin`, for a round that began
    /// `round_elapsed_ms` before this request.
    pub fn of_changes(
        replica: &str,
        origin: &str,
        base: u64,
        changes: pb::ChangesResponse,
        round_elapsed_ms: u64,
    ) -> Self {
        pb::ReplicateRequest {
            node_id: replica.to_string(),
            origin: origin.to_string(),
            base,
            version: changes.version,
            full: changes.full,
            entries: changes.entries,
            records: changes.records,
            scanned_unix_ms: changes.scanned_unix_ms,
            directory_id: changes.directory_id,
            round_elapsed_ms,
            keyed_ring: changes.keyed_ring,
            keyed_ring_epoch: changes.keyed_ring_epoch,
            keyed_ring_sealed: changes.keyed_ring_sealed,
        }
    }
}

impl pb::DrainState {
    /// How the public `NodeStatus.drain` spells it: `""`, `"draining"`,
    /// `"handed-over"` or `"drained"`.
    pub fn public_name(self) -> &'static str {
        match self {
            pb::DrainState::Serving => "",
            pb::DrainState::Draining => "draining",
            pb::DrainState::HandedOver => "handed-over",
            pb::DrainState::Drained => "drained",
        }
    }

    /// Whether the node's entries have left it (handed over or adopted):
    /// its adopter answers for them.
    pub fn handed_over(self) -> bool {
        self >= pb::DrainState::HandedOver
    }
}

impl pb::Durability {
    /// How the public `NodeStatus.durability` spells it: `"sync"`,
    /// `"async"`, or `""` if unknown.
    pub fn public_name(self) -> &'static str {
        match self {
            pb::Durability::Unspecified => "",
            pb::Durability::Sync => "sync",
            pb::Durability::Async => "async",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn increment(counter: &str, key: &str) -> pb::IncrementRequest {
        pb::IncrementRequest {
            counter: counter.to_string(),
            delta: 1,
            idempotency_key: key.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn counter_name_limits() {
        assert!(CounterName::try_from("a".repeat(MAX_COUNTER_NAME_BYTES)).is_ok());
        assert_eq!(
            CounterName::try_from("a".repeat(MAX_COUNTER_NAME_BYTES + 1)),
            Err(ProtocolError::CounterNameTooLong { length: 257 })
        );
        // The limit is in bytes, not characters.
        assert!(CounterName::try_from("é".repeat(129)).is_err());
    }

    #[test]
    fn idempotency_key_limits() {
        assert_eq!(IdempotencyKey::from_wire(String::new()), Ok(None));
        assert!(IdempotencyKey::from_wire("k".repeat(MAX_IDEMPOTENCY_KEY_BYTES)).is_ok());
        assert_eq!(
            IdempotencyKey::from_wire("k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1)),
            Err(ProtocolError::IdempotencyKeyTooLong { length: 129 })
        );
    }

    #[test]
    fn batch_names_the_bad_item() {
        let items = vec![increment("a", ""), increment("", ""), increment("c", "")];
        let error = validate_batch::<_, Increment>(items).unwrap_err();
        assert_eq!(error.to_string(), "item 1: counter name is empty");
    }

    #[test]
    fn batch_size_limit() {
        let items = vec![increment("a", ""); MAX_BATCH_ITEMS + 1];
        assert_eq!(
            validate_batch::<_, Increment>(items),
            Err(ProtocolError::BatchTooLarge { length: 10_001 })
        );
        let items = vec![increment("a", ""); MAX_BATCH_ITEMS];
        assert_eq!(
            validate_batch::<_, Increment>(items).unwrap().len(),
            MAX_BATCH_ITEMS
        );
    }

    #[test]
    fn protocol_error_is_invalid_argument() {
        let status = tonic::Status::from(ProtocolError::EmptyCounterName);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}

#[cfg(test)]
#[path = "domain_fuzz_tests.rs"]
mod fuzz_tests;
