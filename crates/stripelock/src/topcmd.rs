//! `stripelock top`: the status page in a terminal, for hosts without a browser. Each server's
//! health, the leader, the busiest resources and the wait-for edges, redrawn every interval
//! (plain ANSI redraw); `--once` prints one screen, `--json` the page's data once.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use web::view::ServerView;

use crate::cluster::{cluster_addrs, status_from, table_any, transport_text};

/// Every server the cluster's members name (as the first that answers lists them), each asked
/// for its status; then the lock table.
async fn gather(addrs: &[String]) -> (Vec<ServerView>, Option<wire::v1::TableReply>) {
    let mut members: Vec<(u64, String)> = Vec::new();
    for a in addrs {
        if let Ok(s) = status_from(a).await {
            members = s.servers.iter().map(|m| (m.id, m.address.clone())).collect();
            break;
        }
    }
    if members.is_empty() {
        members = addrs.iter().enumerate().map(|(i, a)| (i as u64 + 1, a.clone())).collect();
    }
    let asks = members.iter().map(|(id, addr)| async move {
        let (status, error) = match status_from(addr).await {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(transport_text(e.as_ref()))),
        };
        ServerView { id: *id, address: addr.clone(), status, error }
    });
    let servers = futures::future::join_all(asks).await;
    let table = table_any(addrs, "").await.ok();
    (servers, table)
}

pub fn top(interval: Duration, once: bool, rows: usize, cluster: Option<&str>, json: bool) -> Result<ExitCode> {
    let addrs = cluster_addrs(cluster)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut stop = crate::cluster::stop_signal().await;
        let redraw = !once && !json && std::io::stdout().is_terminal();
        loop {
            let (servers, table) = gather(&addrs).await;
            if json {
                println!("{}", web::view::cluster(&servers, table.as_ref(), rows));
                return Ok(ExitCode::SUCCESS);
            }
            let mut out = std::io::stdout().lock();
            if redraw {
                // Home and clear: one screen, redrawn.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            for line in web::view::text(&servers, table.as_ref(), rows) {
                writeln!(out, "{line}")?;
            }
            if once {
                return Ok(ExitCode::SUCCESS);
            }
            writeln!(out, "\n(every {interval:?}; Ctrl-C to stop)")?;
            out.flush()?;
            drop(out);
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return Ok(ExitCode::SUCCESS),
            }
        }
    })
}
