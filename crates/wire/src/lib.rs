//! The stripelock wire protocol (`proto/stripelock.proto`, package `stripelock.v1`): prost
//! messages and tonic clients and servers, generated at build time without protoc.

#![allow(missing_debug_implementations, clippy::all)]

pub mod v1 {
    tonic::include_proto!("stripelock.v1");
}
