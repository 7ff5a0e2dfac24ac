//! A stripelock server: the lock engine as the replicated state machine of an openraft group
//! whose log, vote and snapshots live in redb, served to clients over gRPC.
//!
//! Invariants: every change to lock state is a log entry, stamped with the proposing leader's
//! time, so every replica applies the same inputs and computes the same outputs; a server never
//! reads its own clock while applying. A server answers its own clients from its own
//! application of the log, so a grant is never shown before it is committed.

mod admission;
pub mod codec;
mod delegation;
mod errors;
pub mod fencing;
mod files;
pub mod gateway;
mod gateway_rt;
mod invalidate;
mod lockcache;
mod machine;
mod network;
mod node;
mod rt;
mod service;
mod storage;
mod store;
mod types;
mod write;

pub use errors::{NamespaceError, engine_code, row_code};
pub use fencing::{STORAGE_LEASE_MS_DEFAULT, StorageEvent};
pub use files::{DEFAULT_UNIT, FILE_BYTES_MAX_DEFAULT, human_bytes};
pub use machine::{Applied, ApplyEvent, Machine, State};
pub use node::{DataStats, Env, Node, ProposeError, SECRET_FILE, ServerConfig, wall_ms};
pub use rt::seed_thread_rng;
pub use service::{LEASE_MS_MAX, LEASE_MS_MIN, LockService};
pub use storage::MESSAGE_BYTES_MAX;
pub use storage::ORPHAN_GRACE_MS_DEFAULT;
pub use store::Store;
pub use types::{CLIENT_LOCK_BITS, Command, FileMeta, NodeAddr, Op, Origin, Reply, client_lock_id, engine_lock_id};
pub use write::{WRITE_BYTES_MAX, stripe_resource};

/// Runs a server on its TCP listen address until `stop` turns true.
pub async fn run(config: ServerConfig, stop: tokio::sync::watch::Receiver<bool>) -> std::io::Result<()> {
    use futures::StreamExt;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    // Small answers must leave at once: Nagle's algorithm would hold one back behind an unacked
    // segment for a delayed ACK (40 ms). tonic's own `tcp_nodelay` covers only its listener.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok::<_, std::io::Error>(conn)
    });
    serve(config, incoming, stop).await
}

/// Runs a server on the connections `incoming` yields until `stop` turns true: the Raft node,
/// both gRPC services, the leader's duties.
pub async fn serve<S, IO>(
    config: ServerConfig,
    incoming: S,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()>
where
    S: futures::Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
{
    let bootstrap = config.bootstrap;
    let node = Node::start(config).await?;
    let service = LockService::new(node.clone()).server();
    let files = files::FilesService::new(node.clone());
    files.start_invalidations();
    let storage = storage::StorageService::new(node.clone(), files.clone())?;
    // Not even spawned when off: the simulation's seeds replay only with the same tasks.
    if node.config.orphan_grace_ms > 0 {
        tokio::spawn(storage.clone().collect_orphans(stop.clone()));
    }
    tokio::spawn(storage.clone().renew_storage_lease(stop.clone()));
    tokio::spawn(storage.clone().fence_duties(stop.clone()));
    let storage = storage.server();
    let files = files.server();
    let raft_service = node.raft_service();
    let mut shutdown = stop.clone();
    let serve = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(raft_service)
            .add_service(service)
            .add_service(files)
            .add_service(storage)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await
    });
    tokio::spawn(node.clone().leader_duties(stop.clone()));
    if bootstrap {
        node.bootstrap().await?;
    }
    let _ = stop.wait_for(|s| *s).await;
    let _ = node.raft.shutdown().await;
    // Open session streams never end on their own: give them a moment, then stop serving.
    // Their clients reconnect to another server and resume.
    match tokio::time::timeout(std::time::Duration::from_secs(1), serve).await {
        Ok(Ok(Ok(()))) | Err(_) => Ok(()),
        Ok(Ok(Err(e))) => Err(std::io::Error::other(e)),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
    }
}
