//! The secondary tier of seed 001: which files are cold enough to leave the striped tier (a pure
//! policy over the namespace's facts), and the immutable objects they go to (an object store: a
//! local directory by default, S3 with the `s3` feature), each checked by its blake3 hash.

pub mod policy;
pub mod rows;
pub mod store;

pub use policy::{FileFacts, Policy, cold};
pub use store::{Place, S3_BUILT, Tier, TierError, Written};
