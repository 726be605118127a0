//! The byte encoding shared by the log's frames ([`crate::log`]) and the
//! checkpoint's buckets ([`crate::checkpoint`]): protobuf varints (prost's
//! encoder), zigzag for signed values, length-prefixed byte strings, and a
//! reader that turns any malformed input into an error, never a panic.

use prost::bytes::Buf;

/// Appends `value` as a varint.
pub fn put_varint(buffer: &mut Vec<u8>, value: u64) {
    prost::encoding::encode_varint(value, buffer);
}

/// Appends a signed value as a zigzag varint (small magnitudes stay short).
pub fn put_signed(buffer: &mut Vec<u8>, value: i64) {
    put_varint(buffer, ((value << 1) ^ (value >> 63)) as u64);
}

/// Appends a length-prefixed byte string.
pub fn put_bytes(buffer: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(buffer, bytes.len() as u64);
    buffer.extend_from_slice(bytes);
}

/// Input that does not decode: what was expected where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}")]
pub struct Malformed {
    /// What was being read.
    pub what: &'static str,
}

/// Reads what the `put_*` functions wrote.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// A varint.
    pub fn varint(&mut self, what: &'static str) -> Result<u64, Malformed> {
        prost::encoding::decode_varint(&mut self.bytes).map_err(|_| Malformed { what })
    }

    /// A varint that must fit `T` (a count, a stripe).
    pub fn small<T: TryFrom<u64>>(&mut self, what: &'static str) -> Result<T, Malformed> {
        T::try_from(self.varint(what)?).map_err(|_| Malformed { what })
    }

    /// A zigzag varint.
    pub fn signed(&mut self, what: &'static str) -> Result<i64, Malformed> {
        let raw = self.varint(what)?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    /// One byte.
    pub fn byte(&mut self, what: &'static str) -> Result<u8, Malformed> {
        if self.bytes.is_empty() {
            return Err(Malformed { what });
        }
        Ok(self.bytes.get_u8())
    }

    /// A length-prefixed byte string.
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let length = self.small::<usize>(what)?;
        let (bytes, rest) = self
            .bytes
            .split_at_checked(length)
            .ok_or(Malformed { what })?;
        self.bytes = rest;
        Ok(bytes)
    }

    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self, what: &'static str) -> Result<&'a str, Malformed> {
        std::str::from_utf8(self.bytes(what)?).map_err(|_| Malformed { what })
    }

    /// A count of items that follow, each at least one byte long: a count
    /// larger than what is left is malformed, so a damaged count cannot ask
    /// for a huge allocation.
    pub fn count(&mut self, what: &'static str) -> Result<usize, Malformed> {
        let count = self.small::<usize>(what)?;
        if count > self.bytes.len() {
            return Err(Malformed { what });
        }
        Ok(count)
    }

    /// Fails unless everything was read.
    pub fn finish(self, what: &'static str) -> Result<(), Malformed> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(Malformed { what })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn values_round_trip(unsigned: u64, signed: i64, bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buffer = Vec::new();
            put_varint(&mut buffer, unsigned);
            put_signed(&mut buffer, signed);
            put_bytes(&mut buffer, &bytes);
            let mut reader = Reader::new(&buffer);
            prop_assert_eq!(reader.varint("u").unwrap(), unsigned);
            prop_assert_eq!(reader.signed("s").unwrap(), signed);
            prop_assert_eq!(reader.bytes("b").unwrap(), bytes.as_slice());
            prop_assert!(reader.finish("end").is_ok());
        }

        #[test]
        fn garbage_is_an_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut reader = Reader::new(&bytes);
            let _ = reader.count("n");
            let _ = reader.str("s");
            let _ = reader.signed("v");
            let _ = reader.byte("b");
        }
    }

    #[test]
    fn small_values_are_short() {
        let mut buffer = Vec::new();
        put_signed(&mut buffer, -1);
        put_signed(&mut buffer, 63);
        assert_eq!(buffer.len(), 2);
    }
}

#[cfg(test)]
#[path = "fuzz_tests.rs"]
mod fuzz_tests;
