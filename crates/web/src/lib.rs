//! Each server's HTTP face (issue 15): `/metrics` in the Prometheus text format, a status page
//! at `/` that refreshes itself, and the JSON it reads: `/api/cluster` (servers, leader,
//! health, busiest resources, the wait-for graph drawn as SVG) and `/api/resource?name=R`
//! (holders and waiters of one resource). What it shows comes from a [`Source`] (the server,
//! in process); the views are pure (`view.rs`, `svg.rs`), and `stripelock top` prints the same.

pub mod prom;
pub mod svg;
pub mod view;

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use futures::future::BoxFuture;
use tokio::sync::watch;
use wire::v1 as pb;

/// Resources the page lists as busiest.
pub const BUSIEST: usize = 10;

/// What the pages are made from: the server they run in.
pub trait Source: Send + Sync + 'static {
    /// This server's status.
    fn status(&self) -> BoxFuture<'_, pb::StatusReply>;
    /// Every server of the cluster, with its status if it answered (each asked with a deadline).
    fn cluster(&self) -> BoxFuture<'_, Vec<view::ServerView>>;
    /// The lock table under `prefix` and the wait-for edges, from this server's applied state.
    fn table(&self, prefix: String) -> BoxFuture<'_, pb::TableReply>;
    /// On the leader: how many log entries each follower is behind (id, entries).
    fn follower_lag(&self) -> Vec<(u64, u64)>;
}

type Shared = Arc<dyn Source>;

/// The page: HTML, its style and its script in one document (no outside files).
const PAGE: &str = include_str!("page.html");

/// Serves the pages on `listener` until `stop` turns true: over TLS with `tls`, plain without.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    source: Shared,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    prom::install();
    let app = axum::Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/metrics", get(metrics))
        .route("/api/cluster", get(cluster))
        .route("/api/resource", get(resource))
        .route("/api/waitfor.svg", get(wait_for))
        .with_state(source);
    let until_stop = {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    };
    match tls {
        None => axum::serve(listener, app).with_graceful_shutdown(until_stop).await,
        Some(acceptor) => {
            let local = listener.local_addr()?;
            let (tx, rx) = tokio::sync::mpsc::channel(HANDSHAKES_WAITING);
            tokio::spawn(async move {
                tokio::select! {
                    () = handshakes(listener, acceptor, tx) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
            axum::serve(TlsListener { rx, local }, app).with_graceful_shutdown(until_stop).await
        }
    }
}

/// Finished handshakes the server has not taken yet, at most.
const HANDSHAKES_WAITING: usize = 64;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

type TlsConn = (tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::net::SocketAddr);

/// Accepts TCP connections and runs each one's handshake in a task of its own (a slow or
/// silent client holds up nobody), handing on those that finish. A client refused (no
/// certificate, another CA's, out of date) is dropped with the reason logged.
async fn handshakes(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    tx: tokio::sync::mpsc::Sender<TlsConn>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!("the HTTP port cannot accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::info!("HTTP client {peer} refused: {e}"),
                Err(_) => tracing::info!("HTTP client {peer} did not finish its TLS handshake in time"),
            }
        });
    }
}

/// The connections [`handshakes`] finished, as axum takes them.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<TlsConn>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accepting task stopped (the server is stopping): wait for the shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

fn json(v: serde_json::Value) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string())
}

async fn metrics(State(source): State<Shared>) -> impl IntoResponse {
    let status = source.status().await;
    let text = prom::render(&status, &source.follower_lag());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

async fn cluster(State(source): State<Shared>) -> impl IntoResponse {
    let (servers, table) = futures::join!(source.cluster(), source.table(String::new()));
    json(view::cluster(&servers, Some(&table), BUSIEST))
}

async fn resource(
    State(source): State<Shared>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> impl IntoResponse {
    let name = q.get("name").cloned().unwrap_or_default();
    let table = source.table(name.clone()).await;
    json(view::resource(&table, &name))
}

async fn wait_for(State(source): State<Shared>) -> impl IntoResponse {
    let table = source.table(String::new()).await;
    let edges: Vec<(String, String)> = table.edges.into_iter().map(|e| (e.waiter, e.holder)).collect();
    ([(header::CONTENT_TYPE, "image/svg+xml")], svg::wait_for(&edges))
}
