//! Raft messages between servers over gRPC: each openraft request and response travels as
//! serde-encoded bytes in the `Raft` service of the wire protocol.

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

use crate::types::{C, NodeAddr, NodeId, SnapshotData};

pub fn encode<T: Serialize>(v: &T) -> Result<RaftPayload, serde_json::Error> {
    Ok(RaftPayload { data: serde_json::to_vec(v)? })
}

pub fn decode<T: DeserializeOwned>(p: &RaftPayload) -> Result<T, serde_json::Error> {
    serde_json::from_slice(&p.data)
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

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        which: Rpc,
    ) -> Result<Resp, RPCError<C>> {
        let client = self.client.clone().ok_or_else(|| RPCError::Unreachable(self.unreachable("bad address")))?;
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::<C>::new(&e)))?;
        let reply = tokio::time::timeout(option.soft_ttl(), which(client, payload))
            .await
            .map_err(|_| RPCError::Unreachable(self.unreachable("timed out")))?
            .map_err(|status| RPCError::Unreachable(self.unreachable(status.message())))?;
        decode(reply.get_ref()).map_err(|e| RPCError::Network(NetworkError::<C>::new(&e)))
    }
}

impl RaftNetworkV2<C> for Peer {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        self.call(&rpc, &option, |mut c, p| Box::pin(async move { c.append_entries(p).await })).await
    }

    async fn vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call(&rpc, &option, |mut c, p| Box::pin(async move { c.vote(p).await })).await
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call(&rpc, &option, |mut c, p| Box::pin(async move { c.pre_vote(p).await })).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotData>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let req: (VoteOf<C>, SnapshotMetaOf<C>, SnapshotData) = (vote, snapshot.meta, snapshot.snapshot);
        self.call(&req, &option, |mut c, p| Box::pin(async move { c.full_snapshot(p).await }))
            .await
            .map_err(StreamingError::from)
    }
}
