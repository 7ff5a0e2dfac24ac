//! Seed 001's migration-signal lock. While a server holds the signal resource in PR it trusts
//! its own applied copy of file metadata (layouts, stubs, sizes) for reads: *relaxed* mode, no
//! round trip to the leader. A migrator takes the resource in EX before it moves any file; the
//! revoke reaches every server, which turns *strict* first (every read re-validates with the
//! leader: a Raft read index, so it sees a stub committed anywhere) and only then gives its PR
//! back. When the migrator releases, the servers' queued PR requests are granted and they turn
//! relaxed again. One resource for the whole cluster: migrations are rare and batch many files,
//! and a strict server only pays one read index per read meanwhile.

use std::sync::Arc;
use std::time::Duration;

use client::{Event, LockOptions, Mode, Session};
use tokio::sync::{broadcast, watch};
use tonic::Status;

use crate::shared::Shared;

/// The migration-signal resource.
pub const SIGNAL_RESOURCE: &str = "#tier/migration-signal";
/// The lease of the session a server holds the signal in.
const SIGNAL_LEASE_MS: u64 = 10_000;

/// Before a read uses this server's file metadata: nothing in relaxed mode; in strict mode, a
/// read index from the leader, so what it reads includes every stub committed before.
pub async fn validate(shared: &Shared) -> Result<(), Status> {
    if shared.meta_mode.relaxed() {
        return Ok(());
    }
    shared.meta_mode.count_round_trip();
    shared.locks.read_barrier().await.map_err(|e| e.status())
}

/// Holds the signal in PR whenever it can (relaxed), turning strict before each give-back.
/// Runs until `stop`.
pub async fn hold(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mode = &shared.meta_mode;
    loop {
        mode.set(false);
        if *stop.borrow() {
            return;
        }
        let addrs = [shared.locks.address().to_string()];
        let session = tokio::select! {
            s = Session::open_named(&addrs, SIGNAL_LEASE_MS, shared.locks.connector().clone(), "migration signal".into()) => s,
            _ = stop.changed() => return,
        };
        let Ok(session) = session else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut events = session.events();
        loop {
            let asked = tokio::select! {
                g = session.lock(SIGNAL_RESOURCE, 0..u64::MAX, Mode::PR, LockOptions::default()) => g,
                _ = stop.changed() => return,
            };
            let Ok(grant) = asked else { break };
            if session.keep_cached(grant.lock).await.is_err() {
                break;
            }
            mode.set(true);
            let ended = loop {
                tokio::select! {
                    e = events.recv() => match e {
                        Ok(Event::Revoke { lock }) if lock == grant.lock => break false,
                        Ok(Event::Expired) | Err(broadcast::error::RecvError::Closed) => break true,
                        Ok(Event::Lost { lock, .. }) if lock == grant.lock => break true,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    },
                    _ = stop.changed() => return,
                }
            };
            // Strict before the migrator can be granted EX.
            if !shared.config.env.break_signal_for_negative_control {
                mode.set(false);
            }
            if ended {
                break;
            }
            let _ = session.release_now(grant.lock).await;
        }
        session.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
