//! What keymeter's hand-written gRPC services share: a codec that hands message bytes
//! through undecoded, so the Check and the access log read protobuf in place
//! (`protowire`) instead of through prost.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// What the services' `call` returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The answer of a hand-written service (one method each) to any other method.
pub fn unimplemented() -> BoxFuture<Result<http::Response<Body>, Infallible>> {
    Box::pin(async { Ok(Status::unimplemented("").into_http()) })
}

/// Passes message bytes through unchanged.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
