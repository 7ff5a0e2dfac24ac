//! Raft messages between servers over gRPC: each openraft request and response travels as a
//! versioned binary record (`codec`) in the `data` bytes of the `Raft` service's messages. A
//! full snapshot's bytes follow its vote and meta as they are.

use std::future::Future;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::{OptionalSend, RaftNetworkV2};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;
use wire::v1::RaftPayload;
use wire::v1::raft_client::RaftClient;

use crate::codec::{self, FormatError, Record};
use crate::types::{C, NodeAddr, NodeId, SnapshotData};

/// Names of the messages, for errors.
pub const APPEND_ENTRIES: &str = "append-entries";
pub const VOTE: &str = "vote";
pub const PRE_VOTE: &str = "pre-vote";
pub const FULL_SNAPSHOT: &str = "full-snapshot";
pub const PROPOSE: &str = "forwarded proposal";
pub const RENEW: &str = "lease renewals";
pub const REJOIN: &str = "rejoin";
pub const READ_INDEX: &str = "read index";

pub fn encode<T: Serialize>(name: &'static str, v: &T) -> Result<RaftPayload, FormatError> {
    Ok(RaftPayload { data: codec::encode(Record::Message(name), v)? })
}

pub fn decode<T: DeserializeOwned>(name: &'static str, p: &RaftPayload) -> Result<T, FormatError> {
    codec::decode(Record::Message(name), &p.data)
}

/// A full snapshot: its vote and meta, then the snapshot's bytes as they are.
pub fn encode_snapshot(
    vote: &VoteOf<C>,
    meta: &SnapshotMetaOf<C>,
    snapshot: &[u8],
) -> Result<RaftPayload, FormatError> {
    let data = codec::Format::CURRENT.encode_with_tail(Record::Message(FULL_SNAPSHOT), &(vote, meta), snapshot)?;
    Ok(RaftPayload { data })
}

pub fn decode_snapshot(p: &RaftPayload) -> Result<(VoteOf<C>, SnapshotMetaOf<C>, SnapshotData), FormatError> {
    let ((vote, meta), snapshot) = codec::Format::CURRENT.decode_with_tail(Record::Message(FULL_SNAPSHOT), &p.data)?;
    Ok((vote, meta, snapshot.to_vec()))
}

/// One Raft RPC of the generated client, as a function of the client and the payload.
type Rpc = fn(
    RaftClient<Channel>,
    RaftPayload,
) -> std::pin::Pin<Box<dyn Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>> + Send>>;

/// Makes one lazily connected channel per peer.
#[derive(Debug, Clone, Default)]
pub struct Network {
    pub connector: wire::Connector,
}

#[derive(Debug)]
pub struct Peer {
    target: NodeId,
    client: Option<RaftClient<Channel>>,
}

impl RaftNetworkFactory<C> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> Peer {
        let client = self.connector.channel(&node.addr).ok().map(RaftClient::new);
        Peer { target, client }
    }
}

impl Peer {
    fn unreachable(&self, why: impl std::fmt::Display) -> Unreachable<C> {
        Unreachable::<C>::from_string(format!("server {}: {why}", self.target))
    }

    async fn call<Resp: DeserializeOwned>(
        &mut self,
        name: &'static str,
        payload: Result<RaftPayload, FormatError>,
        option: &RPCOption,
        which: Rpc,
    ) -> Result<Resp, RPCError<C>> {
        let client = self.client.clone().ok_or_else(|| RPCError::Unreachable(self.unreachable("bad address")))?;
        let payload = payload.map_err(|e| RPCError::Network(NetworkError::<C>::new(&e)))?;
        let reply = tokio::time::timeout(option.soft_ttl(), which(client, payload))
            .await
            .map_err(|_| RPCError::Unreachable(self.unreachable("timed out")))?
            .map_err(|status| RPCError::Unreachable(self.unreachable(status.message())))?;
        decode(name, reply.get_ref()).map_err(|e| RPCError::Network(NetworkError::<C>::new(&e)))
    }
}

impl RaftNetworkV2<C> for Peer {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let payload = encode(APPEND_ENTRIES, &rpc);
        self.call(APPEND_ENTRIES, payload, &option, |mut c, p| Box::pin(async move { c.append_entries(p).await })).await
    }

    async fn vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        let payload = encode(VOTE, &rpc);
        self.call(VOTE, payload, &option, |mut c, p| Box::pin(async move { c.vote(p).await })).await
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        let payload = encode(PRE_VOTE, &rpc);
        self.call(PRE_VOTE, payload, &option, |mut c, p| Box::pin(async move { c.pre_vote(p).await })).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotData>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let payload = encode_snapshot(&vote, &snapshot.meta, &snapshot.snapshot);
        self.call(FULL_SNAPSHOT, payload, &option, |mut c, p| Box::pin(async move { c.full_snapshot(p).await }))
            .await
            .map_err(StreamingError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::meta;

    /// A full snapshot's bytes travel after its vote and meta as they are.
    #[test]
    fn a_snapshot_message_carries_the_snapshot_bytes_as_they_are() {
        let vote = VoteOf::<C>::new_committed(4, 2);
        let snapshot: Vec<u8> = (0..=255).collect();
        let payload = encode_snapshot(&vote, &meta(), &snapshot).unwrap();
        let head = codec::encode(Record::Message(FULL_SNAPSHOT), &(vote, meta())).unwrap();
        assert_eq!(payload.data.len(), head.len() + snapshot.len());
        assert!(payload.data.ends_with(&snapshot));
        assert_eq!(decode_snapshot(&payload).unwrap(), (vote, meta(), snapshot));
    }
}
