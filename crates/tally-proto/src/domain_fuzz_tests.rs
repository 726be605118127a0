//! Bounded-time fuzz tests of the validation at the protocol's edge: counter
//! names, idempotency keys, increments, batches and node ids, from any
//! input. Each is accepted exactly when the rule in docs/API.md (and
//! `validate_node_id`'s doc) holds, and refused with the error that names
//! what is wrong: never a panic.
//!
//! The rules, as documented:
//! - a counter name is 1 to 256 bytes of UTF-8 (bytes, not characters),
//!   and a client's does not start with U+0000 (which marks the stored
//!   names of windows: `crate::window`);
//! - an idempotency key is 0 to 128 bytes of UTF-8, the empty string
//!   meaning "no key";
//! - a batch has at most 10,000 items, and its first invalid item (from
//!   0) rejects it whole;
//! - a node id is 1 to 64 bytes of ASCII letters, digits, `-`, `_`, `.`.
//!
//! Strings reach these checks already decoded: the gRPC layer refuses a
//! string field that is not UTF-8 before any of this runs, so arbitrary
//! bytes are tried here as the UTF-8 text they decode to (lossily).
//!
//! Each property runs a fixed number of cases (`ProptestConfig::cases`),
//! chosen so that the module takes well under a second in a debug build:
//! CI runs it with every `cargo test`.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use super::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Text of every kind a request may carry: any characters (control and
/// multi-byte ones too), bytes decoded lossily, and lengths in bytes
/// around every limit, in one- and multi-byte characters.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        vec(any::<char>(), 0..80).prop_map(String::from_iter),
        vec(any::<u8>(), 0..300).prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
        (0..=300usize).prop_map(|length| "a".repeat(length)),
        // Around 64, 128 and 256 bytes in characters of 2, 3 and 4 bytes,
        // with a 1-byte character to land on odd lengths.
        (
            prop_oneof![Just("é"), Just("€"), Just("𝄞")],
            0..=140usize,
            any::<bool>()
        )
            .prop_map(|(character, count, odd)| {
                let mut text = character.repeat(count);
                if odd {
                    text.push('x');
                }
                text
            }),
        "[A-Za-z0-9._-]{0,70}",
        "[A-Za-z0-9._ :/é-]{0,70}",
    ]
}

fn request(counter: String, delta: i64, key: String) -> pb::IncrementRequest {
    pb::IncrementRequest {
        counter,
        delta,
        idempotency_key: key,
        ..Default::default()
    }
}

/// The documented rule for a client's counter name, on its own.
fn counter_rule(name: &str) -> Result<(), ProtocolError> {
    match name.len() {
        0 => Err(ProtocolError::EmptyCounterName),
        _ if name.starts_with('\0') => Err(ProtocolError::ReservedCounterName),
        1..=256 => Ok(()),
        length => Err(ProtocolError::CounterNameTooLong { length }),
    }
}

/// The rule for a stored name: a client's, or a window's.
fn stored_rule(name: &str) -> Result<(), ProtocolError> {
    match name.len() {
        0 => Err(ProtocolError::EmptyCounterName),
        257.. => Err(ProtocolError::CounterNameTooLong { length: name.len() }),
        _ if name.starts_with('\0') && crate::window::Window::of_stored(name).is_none() => {
            Err(ProtocolError::ReservedCounterName)
        }
        _ => Ok(()),
    }
}

/// The documented idempotency-key rule: `None` for no key.
fn key_rule(key: &str) -> Result<Option<&str>, ProtocolError> {
    match key.len() {
        0 => Ok(None),
        1..=128 => Ok(Some(key)),
        length => Err(ProtocolError::IdempotencyKeyTooLong { length }),
    }
}

fn node_id_rule(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
}

proptest! {
    // Checks of short strings: microseconds a case.
    #![proptest_config(config(1024))]

    /// A client's counter name is accepted exactly when it is 1 to 256
    /// bytes and does not start with U+0000, kept as given; `validate`
    /// (stored names) also takes a window's name, and no other.
    #[test]
    fn counter_names_follow_the_rule(
        name in prop_oneof![
            4 => text(),
            1 => (text(), 1..100_000u64, 1..4000u32).prop_map(|(name, start, seconds)| {
                let window = crate::window::Window {
                    start_unix_s: start * u64::from(seconds),
                    seconds,
                };
                window.stored_name(&name)
            }),
        ],
    ) {
        let expected = counter_rule(&name);
        prop_assert_eq!(CounterName::validate(&name), stored_rule(&name));
        match CounterName::try_from(name.clone()) {
            Ok(counter) => {
                prop_assert_eq!(expected, Ok(()));
                prop_assert_eq!(counter.as_str(), name.as_str());
                prop_assert_eq!(counter.to_string(), name.clone());
                prop_assert_eq!(counter.into_string(), name);
            }
            Err(error) => {
                prop_assert_eq!(Err(error.clone()), expected);
                // The message says what is wrong, and how long the name is.
                let message = error.to_string();
                prop_assert!(message.starts_with("counter name "), "{}", message);
                if !name.is_empty() && !name.starts_with('\0') {
                    prop_assert!(message.contains(&name.len().to_string()), "{}", message);
                }
            }
        }
    }

    /// An idempotency key is none when empty, itself when 1 to 128 bytes,
    /// and refused naming its length beyond; `validate` agrees.
    #[test]
    fn idempotency_keys_follow_the_rule(key in text()) {
        let expected = key_rule(&key);
        prop_assert_eq!(IdempotencyKey::validate(&key).is_ok(), expected.is_ok());
        let found = IdempotencyKey::from_wire(key.clone());
        prop_assert_eq!(
            found.as_ref().map(|key| key.as_ref().map(IdempotencyKey::as_str)),
            expected.as_ref().map(|key| *key)
        );
        if let Err(error) = found {
            prop_assert!(error.to_string().contains(&key.len().to_string()));
        }
    }

    /// An increment is valid exactly when its name and key are, the name
    /// checked first; its delta is kept whatever it is.
    #[test]
    fn increments_follow_the_rules(counter in text(), delta in any::<i64>(), key in text()) {
        let found = Increment::try_from(request(counter.clone(), delta, key.clone()));
        let expected = counter_rule(&counter).and_then(|()| key_rule(&key));
        match (found, expected) {
            (Ok(increment), Ok(expected_key)) => {
                prop_assert_eq!(increment.counter.as_str(), counter.as_str());
                prop_assert_eq!(increment.delta, delta);
                prop_assert_eq!(
                    increment.idempotency_key.as_ref().map(IdempotencyKey::as_str),
                    expected_key
                );
            }
            (Err(error), Err(expected)) => prop_assert_eq!(error, expected),
            (found, expected) => prop_assert!(false, "{found:?}, expected {expected:?}"),
        }
    }

    /// A node id is accepted exactly when it is 1 to 64 bytes of letters,
    /// digits, `-`, `_` and `.`; a refusal quotes it.
    #[test]
    fn node_ids_follow_the_rule(id in text()) {
        match validate_node_id(&id) {
            Ok(()) => prop_assert!(node_id_rule(&id), "{:?} accepted", id),
            Err(message) => {
                prop_assert!(!node_id_rule(&id), "{:?} refused: {}", id, message);
                if !id.is_empty() {
                    prop_assert!(message.contains(&format!("{id:?}")), "{}", message);
                }
            }
        }
    }
}

proptest! {
    // Up to 20 items of two texts each a case: generating them costs about
    // 5 ms in a debug build.
    #![proptest_config(config(128))]

    /// A batch is valid exactly when every item is; otherwise its first
    /// invalid item is named, by position from 0, with that item's error.
    #[test]
    fn batches_name_their_first_bad_item(
        items in vec((text(), any::<i64>(), text()), 0..20),
    ) {
        let requests: Vec<pb::IncrementRequest> = items
            .iter()
            .map(|(counter, delta, key)| request(counter.clone(), *delta, key.clone()))
            .collect();
        let first_bad = items.iter().enumerate().find_map(|(index, (counter, _, key))| {
            counter_rule(counter)
                .and_then(|()| key_rule(key).map(drop))
                .err()
                .map(|error| (index, error))
        });
        match (validate_batch::<_, Increment>(requests), first_bad) {
            (Ok(increments), None) => {
                prop_assert_eq!(increments.len(), items.len());
                for (increment, (counter, delta, _)) in increments.iter().zip(&items) {
                    prop_assert_eq!(increment.counter.as_str(), counter.as_str());
                    prop_assert_eq!(increment.delta, *delta);
                }
            }
            (Err(error), Some((index, expected))) => {
                prop_assert_eq!(
                    error,
                    ProtocolError::InBatch { index, error: Box::new(expected) }
                );
            }
            (found, expected) => prop_assert!(false, "{found:?}, expected {expected:?}"),
        }
    }
}

proptest! {
    // Each case builds a batch of about 10,000 items: a few milliseconds.
    #![proptest_config(config(16))]

    /// A batch of more than 10,000 items is refused before any item is
    /// looked at (even an invalid one); one of at most 10,000 is checked.
    #[test]
    fn batch_size_limit_is_exact(length in 9_998..=10_002usize, bad_item in any::<bool>()) {
        let mut requests = vec![request("c".into(), 1, String::new()); length];
        if bad_item {
            requests[length / 2].counter.clear();
        }
        let found = validate_batch::<_, Increment>(requests);
        if length > MAX_BATCH_ITEMS {
            prop_assert_eq!(found, Err(ProtocolError::BatchTooLarge { length }));
        } else if bad_item {
            prop_assert_eq!(
                found,
                Err(ProtocolError::InBatch {
                    index: length / 2,
                    error: Box::new(ProtocolError::EmptyCounterName),
                })
            );
        } else {
            prop_assert_eq!(found.map(|increments| increments.len()), Ok(length));
        }
    }
}
