//! The codec of every generated Tally server: prost encoding, and a request
//! that does not decode answered `INVALID_ARGUMENT`.
//!
//! tonic-prost's codec answers a message that fails to decode (a string
//! field that is not UTF-8, a truncated field, a wrong wire type) with
//! `INTERNAL`, the code gRPC reserves for a broken server. On a server the
//! message is the caller's request, so the fault is the caller's: the
//! public contract says `INVALID_ARGUMENT` (docs/API.md), and so does every
//! other check of a request. The generated servers use [`RequestCodec`]
//! (crates/tally-proto/build.rs); the generated clients keep tonic-prost's,
//! because there a message that does not decode is the server's answer,
//! and `INTERNAL` is right.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

/// A server's codec: encodes answers `T` as tonic-prost does, decodes
/// requests `U` with [`RequestDecoder`].
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        RequestCodec {
            _messages: PhantomData,
        }
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder {
            _message: PhantomData,
        }
    }
}

/// Decodes a request `U`; one that does not decode is `INVALID_ARGUMENT`,
/// with prost's account of what failed (the message, the field and why:
/// `failed to decode Protobuf message: IncrementRequest.counter: invalid
/// string value: data is not UTF-8 encoded`).
#[derive(Debug, Clone)]
pub struct RequestDecoder<U> {
    _message: PhantomData<U>,
}

impl<U: prost::Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_request(buf).map(Some)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Decodes one request message from `bytes` (without the gRPC length
/// prefix): what [`RequestDecoder`] does.
pub fn decode_request<U: prost::Message + Default>(
    bytes: impl prost::bytes::Buf,
) -> Result<U, Status> {
    U::decode(bytes)
        .map_err(|error| Status::invalid_argument(format!("the request does not decode: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    fn decode<U: prost::Message + Default>(bytes: &[u8]) -> Result<Option<U>, Status> {
        decode_request(bytes).map(Some)
    }

    #[test]
    fn a_request_that_does_not_decode_is_invalid_argument_naming_the_field() {
        // IncrementRequest { counter: 0xff 0xfe, delta: 1, ..Default::default()  }: field 1 is a
        // string, and those bytes are not UTF-8.
        let status = decode::<pb::IncrementRequest>(&[0x0a, 2, 0xff, 0xfe, 0x10, 2]).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("IncrementRequest.counter"),
            "{}",
            status.message()
        );
        // A field cut short.
        let status = decode::<pb::IncrementRequest>(&[0x0a, 9, b'a']).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }

    #[test]
    fn a_request_that_decodes_is_the_message() {
        let request = pb::IncrementRequest {
            counter: "clicks".into(),
            delta: -3,
            idempotency_key: "k".into(),
            ..Default::default()
        };
        let decoded = decode::<pb::IncrementRequest>(&prost::Message::encode_to_vec(&request))
            .unwrap()
            .unwrap();
        assert_eq!(decoded, request);
    }
}
