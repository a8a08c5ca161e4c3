//! The protobuf codec of the InternVL service.
//!
//! prost answers a request it cannot decode (invalid UTF-8 in a string, a
//! truncated field) with INTERNAL, as grpc's status-code table suggests. For a
//! public service that reads as a server fault: meshes count it as an error of
//! ours and clients may retry it. The bytes are the caller's, so this codec
//! answers INVALID_ARGUMENT and keeps prost's message, which names the field.
//! The generated client shares the codec, so a response it cannot decode also
//! reads INVALID_ARGUMENT there.
//!
//! Before prost decodes a request, its repeated elements (messages, content
//! parts, Embed inputs, stop sequences, video frames) are counted on the
//! wire ([`Shape`]): an empty content part is 2 bytes on the wire and some
//! 80 in memory, so a request within `max_message_bytes` could cost forty
//! times its size before any limit was looked at. Past
//! [`MAX_WIRE_ELEMENTS`] the request is refused undecoded, naming the field;
//! the configured limits (`max_content_parts`, …) apply after decoding.

use prost::bytes::Buf;
use prost::encoding::{decode_key, decode_varint, WireType};
use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] whose decoding failures are INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct WireCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for WireCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + WireShape + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = WireDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder(self.0.decoder())
    }
}

/// [`ProstDecoder`] whose failures are INVALID_ARGUMENT.
#[derive(Debug)]
pub struct WireDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default + WireShape> Decoder for WireDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if let Some(shape) = U::SHAPE {
            // tonic hands the whole message over in one piece.
            let mut left = MAX_WIRE_ELEMENTS;
            if let Err(field) = count(buf.chunk(), shape, &mut left) {
                return Err(Status::invalid_argument(format!(
                    "{field}: more than {MAX_WIRE_ELEMENTS} repeated elements (messages, \
                     content parts, inputs, stop sequences, frames) in one request"
                )));
            }
        }
        self.0
            .decode(buf)
            .map_err(|status| Status::invalid_argument(status.message().to_owned()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Most repeated elements one request may carry on the wire, all its fields
/// together: well above every configured limit's default, and small enough
/// that decoding them costs at most a few MiB.
pub const MAX_WIRE_ELEMENTS: usize = 8192;

/// The repeated fields of a message that are counted before it is decoded,
/// and the shape of the messages they hold: `(field number, name, shape)`.
#[derive(Debug)]
pub struct Shape(&'static [(u32, &'static str, Option<&'static Shape>)]);

const VIDEO: Shape = Shape(&[(1, "frames", None)]);
const CONTENT: Shape = Shape(&[(3, "video", Some(&VIDEO))]);
const MESSAGE: Shape = Shape(&[(2, "content", Some(&CONTENT))]);
const EMBED_INPUT: Shape = Shape(&[(1, "content", Some(&CONTENT))]);

/// Which messages are counted before decoding: the requests that carry
/// repeated fields. Every other message decodes as it is.
pub trait WireShape {
    /// Its shape; `None` = not counted.
    const SHAPE: Option<&'static Shape> = None;
}

impl WireShape for crate::proto::GenerateRequest {
    const SHAPE: Option<&'static Shape> = Some(&Shape(&[
        (1, "messages", Some(&MESSAGE)),
        (4, "stop", None),
    ]));
}
impl WireShape for crate::proto::CountTokensRequest {
    const SHAPE: Option<&'static Shape> = Some(&Shape(&[(1, "messages", Some(&MESSAGE))]));
}
impl WireShape for crate::proto::EmbedRequest {
    const SHAPE: Option<&'static Shape> = Some(&Shape(&[(1, "inputs", Some(&EMBED_INPUT))]));
}
impl WireShape for crate::proto::TokenizeRequest {}
impl WireShape for crate::proto::GetModelInfoRequest {}
impl WireShape for crate::proto::GenerateResponse {}
impl WireShape for crate::proto::EmbedResponse {}
impl WireShape for crate::proto::CountTokensResponse {}
impl WireShape for crate::proto::TokenizeResponse {}
impl WireShape for crate::proto::ModelInfo {}

/// Counts the elements of `shape`'s fields in `buf`, recursively, against
/// `left`; `Err` names the field whose element was one too many. Bytes that
/// are not well-formed protobuf end the count: prost refuses them next, with
/// its own message.
fn count(mut buf: &[u8], shape: &Shape, left: &mut usize) -> Result<(), &'static str> {
    while buf.has_remaining() {
        let Ok((field, wire)) = decode_key(&mut buf) else {
            return Ok(());
        };
        let skip = match wire {
            WireType::Varint => match decode_varint(&mut buf) {
                Ok(_) => 0,
                Err(_) => return Ok(()),
            },
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => {
                let Ok(len) = decode_varint(&mut buf) else {
                    return Ok(());
                };
                let Some(inner) = usize::try_from(len).ok().and_then(|n| buf.get(..n)) else {
                    return Ok(());
                };
                if let Some(&(_, name, sub)) = shape.0.iter().find(|(f, _, _)| *f == field) {
                    *left = left.checked_sub(1).ok_or(name)?;
                    if let Some(sub) = sub {
                        count(inner, sub, left)?;
                    }
                }
                inner.len()
            }
            WireType::StartGroup | WireType::EndGroup => return Ok(()),
        };
        if skip > buf.len() {
            return Ok(());
        }
        buf.advance(skip);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    fn empty_parts(n: usize) -> Vec<u8> {
        proto::GenerateRequest {
            messages: vec![proto::Message {
                role: "user".into(),
                content: vec![proto::Content::default(); n],
            }],
            stop: vec!["x".into()],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn repeated_elements_are_counted_before_decoding() {
        let shape = <proto::GenerateRequest as WireShape>::SHAPE.unwrap();
        // 1 message, n parts, 1 stop sequence.
        let mut left = MAX_WIRE_ELEMENTS;
        assert_eq!(count(&empty_parts(100), shape, &mut left), Ok(()));
        assert_eq!(left, MAX_WIRE_ELEMENTS - 102);
        let mut left = MAX_WIRE_ELEMENTS;
        assert_eq!(
            count(&empty_parts(MAX_WIRE_ELEMENTS), shape, &mut left),
            Err("content")
        );
        // Frames inside a video inside a part count too.
        let frames = proto::EmbedRequest {
            inputs: vec![proto::EmbedInput {
                content: vec![proto::Content {
                    part: Some(proto::content::Part::Video(proto::Video {
                        frames: vec![vec![1]; 10],
                        ..Default::default()
                    })),
                }],
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let mut left = 11;
        let embed = <proto::EmbedRequest as WireShape>::SHAPE.unwrap();
        assert_eq!(count(&frames, embed, &mut left), Err("frames"));
    }

    #[test]
    fn malformed_bytes_are_left_to_prost() {
        let shape = <proto::GenerateRequest as WireShape>::SHAPE.unwrap();
        for bytes in [&[0x0a, 0xff][..], &[0xff; 12], &[0x0b]] {
            assert_eq!(count(bytes, shape, &mut 10), Ok(()));
        }
    }
}
