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

/// Serves the pages on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
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
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
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
