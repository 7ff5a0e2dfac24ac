//! Takes a lock, prints its fencing token, holds it for a few seconds while answering revokes,
//! and releases it. Run a cluster first (`cargo run --release -- up`), then:
//!
//! ```sh
//! cargo run -p client --example hold -- 127.0.0.1:PORT[,...] /jobs/nightly
//! ```

use std::time::Duration;

use client::{Event, LockOptions, Mode, Session};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let servers: Vec<String> =
        args.next().ok_or("usage: hold HOST:PORT[,...] RESOURCE")?.split(',').map(String::from).collect();
    let resource = args.next().unwrap_or_else(|| "/jobs/nightly".into());

    let session = Session::open(&servers, 10_000).await?;
    let mut events = session.events();
    let grant = session
        .lock(
            &resource,
            0..u64::MAX,
            Mode::EX,
            LockOptions { nowait: false, timeout: Some(Duration::from_secs(30)), ..Default::default() },
        )
        .await?;
    println!("session {} holds EX on {resource}: token {}", session.id(), grant.token);
    println!("signed token for storage: {}", grant.signed_token);

    // Cache the lock: another client's conflicting request now revokes it instead of waiting.
    session.cache(grant.lock).await?;
    let revoked = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Revoke { lock }) = events.recv().await
                && lock == grant.lock
            {
                return;
            }
        }
    })
    .await;
    if revoked.is_ok() {
        println!("someone else wants {resource}: releasing early");
    }
    session.unlock(grant.lock).await?;
    session.close().await;
    Ok(())
}
