//! A stripelock server: the replicated lock service (`lockservice`) and the striped data path
//! (`datapath`) wired together and served over gRPC on one address. The data path sees the
//! lock service only through `datapath::Locks`, implemented here (`locks.rs`).

mod locks;
mod web;

use std::sync::Arc;

pub use datapath::{
    DEFAULT_UNIT, FILE_BYTES_MAX_DEFAULT, MESSAGE_BYTES_MAX, ORPHAN_GRACE_MS_DEFAULT, RESYNC_BYTES_PER_S_DEFAULT,
    SIGNAL_RESOURCE, STORAGE_LEASE_MS_DEFAULT, StorageEvent, WRITE_BYTES_MAX, human_bytes,
};
pub use locks::NodeLocks;
pub use lockservice::{
    ApplyEvent, CLIENT_LOCK_BITS, LEASE_MS_MAX, LEASE_MS_MIN, SECRET_FILE, client_lock_id, seed_thread_rng,
};

pub use datapath::{ChunkStoreKind, Config as DataConfig, Env as DataEnv, Limits as DataLimits, UnknownChunkStore};
pub use lockservice::quota::Quota;
pub use lockservice::{Config as LockConfig, Env as LockEnv};
pub use tier::Place as TierPlace;

/// How a server is set up: its lock service and its data path.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub locks: lockservice::Config,
    pub data: datapath::Config,
    /// Where the metrics and the status page are served over HTTP (issue 15); none if `None`.
    pub http: Option<std::net::SocketAddr>,
    /// Mutual TLS on the gRPC port (issue 15): this server's identity and its cluster's CA,
    /// which every client and peer must present a certificate of; `None` serves plain HTTP/2.
    pub tls: Option<wire::Tls>,
    /// With `tls`, who may use the HTTP port: certified clients only, or any client over TLS.
    pub http_clients: wire::HttpClients,
}

/// Runs a server on its TCP listen address until `stop` turns true.
pub async fn run(config: ServerConfig, stop: tokio::sync::watch::Receiver<bool>) -> std::io::Result<()> {
    use futures::StreamExt;
    let listener = tokio::net::TcpListener::bind(config.locks.listen).await?;
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
/// the lock and data services, the leader's duties.
pub async fn serve<S, IO>(
    config: ServerConfig,
    incoming: S,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()>
where
    S: futures::Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
{
    let bootstrap = config.locks.bootstrap;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.server()).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("TLS from {}: {e}", tls.dir.display()))
        })?;
    }
    // Bound before anything starts, so a port in use is said at once.
    let http = match config.http {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("the HTTP address {addr} (metrics, status page): {e}"))
        })?),
        None => None,
    };
    let http_tls = match (&config.tls, &http) {
        (Some(tls), Some(_)) => Some(
            tls.http_acceptor(config.http_clients)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?,
        ),
        _ => None,
    };
    let node = lockservice::Node::start(config.locks).await?;
    let locks = lockservice::LockService::new(node.clone());
    let data = datapath::DataPath::open(Arc::new(NodeLocks(node.clone())), config.data)?;
    data.start_duties(&stop);
    let locks = locks.with_status(data.stats());
    if let Some(listener) = http {
        let source = std::sync::Arc::new(web::WebSource { node: node.clone(), locks: locks.clone() });
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = ::web::serve(listener, http_tls, source, stop).await {
                tracing::error!("the HTTP server stopped: {e}");
            }
        });
    }
    let locks = locks.server();
    let raft_service = node.raft_service();
    let (files, storage) = (data.files_server(), data.storage_server());
    let mut shutdown = stop.clone();
    let serve = tokio::spawn(async move {
        builder
            .tcp_nodelay(true)
            .add_service(raft_service)
            .add_service(locks)
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
    // A storage error stops openraft's core for good (a log write on a full disk, say); a
    // server left answering without it would look alive and never take part again. It exits
    // instead, so that its supervisor starts it again once the cause is gone.
    let core = node.clone();
    let core_failed = async move {
        loop {
            use openraft::async_runtime::WatchReceiver;
            let failed = core.raft.metrics().borrow_watched().running_state.as_ref().err().map(|f| f.to_string());
            if let Some(why) = failed {
                return why;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let failed = tokio::select! {
        _ = stop.wait_for(|s| *s) => None,
        why = core_failed => Some(why),
    };
    let _ = node.raft.shutdown().await;
    if let Some(why) = failed {
        tracing::error!("the Raft core stopped: {why}");
        return Err(std::io::Error::other(format!(
            "the Raft core stopped ({why}); this server exits so that it can be started again (by `stripelock up` \
             or its supervisor) once the cause, such as a full disk, is fixed"
        )));
    }
    // Open session streams never end on their own: give them a moment, then stop serving.
    // Their clients reconnect to another server and resume.
    match tokio::time::timeout(std::time::Duration::from_secs(1), serve).await {
        Ok(Ok(Ok(()))) | Err(_) => Ok(()),
        Ok(Ok(Err(e))) => Err(std::io::Error::other(e)),
        Ok(Err(e)) => Err(std::io::Error::other(e)),
    }
}
