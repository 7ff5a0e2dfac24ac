//! The HTTP pages' source (`web::Source`): this server's lock service asked in process, the
//! other servers over gRPC with a deadline.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use lockservice::{LockService, Node};
use tonic::Request;
use web::view::ServerView;
use wire::v1 as pb;
use wire::v1::locks_server::Locks;

/// How long the page waits for another server's status.
const PEER_DEADLINE: Duration = Duration::from_millis(800);

#[derive(Debug)]
pub struct WebSource {
    pub node: Node,
    pub locks: LockService,
}

impl WebSource {
    async fn own_status(&self) -> pb::StatusReply {
        match self.locks.status(Request::new(pb::StatusRequest {})).await {
            Ok(r) => r.into_inner(),
            Err(_) => {
                pb::StatusReply { server_id: self.node.id, address: self.node.addr.clone(), ..Default::default() }
            }
        }
    }

    async fn peer_status(&self, addr: &str) -> Result<pb::StatusReply, String> {
        let channel = self.node.config.env.connector.channel(addr).map_err(|e| e.to_string())?;
        let mut client = pb::locks_client::LocksClient::new(channel);
        match tokio::time::timeout(PEER_DEADLINE, client.status(pb::StatusRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(s.message().to_string()),
            Err(_) => Err(format!("no answer within {PEER_DEADLINE:?}")),
        }
    }
}

impl web::Source for WebSource {
    fn status(&self) -> BoxFuture<'_, pb::StatusReply> {
        self.own_status().boxed()
    }

    fn cluster(&self) -> BoxFuture<'_, Vec<ServerView>> {
        async move {
            let own = self.own_status().await;
            let members = own.servers.clone();
            let asks = members.iter().map(|m| {
                let own = &own;
                async move {
                    let answer =
                        if m.id == own.server_id { Ok(own.clone()) } else { self.peer_status(&m.address).await };
                    let (status, error) = match answer {
                        Ok(s) => (Some(s), None),
                        Err(e) => (None, Some(e)),
                    };
                    ServerView { id: m.id, address: m.address.clone(), status, error }
                }
            });
            futures::future::join_all(asks).await
        }
        .boxed()
    }

    fn table(&self, prefix: String) -> BoxFuture<'_, pb::TableReply> {
        async move {
            self.locks
                .table(Request::new(pb::TableRequest { prefix }))
                .await
                .map(|r| r.into_inner())
                .unwrap_or_default()
        }
        .boxed()
    }

    fn follower_lag(&self) -> Vec<(u64, u64)> {
        use openraft::async_runtime::WatchReceiver;
        let m = self.node.raft.metrics().borrow_watched().clone();
        let last = m.last_log_index.unwrap_or(0);
        m.replication.map_or(Vec::new(), |r| {
            r.iter()
                .filter(|(id, _)| **id != self.node.id)
                .map(|(id, matched)| (*id, last.saturating_sub(matched.as_ref().map_or(0, |l| l.index))))
                .collect()
        })
    }
}
