//! What the status page and `stripelock top` show, made from status and lock-table replies
//! alone (pure: no I/O, no clock), as JSON the page renders and text `top` prints.

use serde_json::{Value, json};
use wire::v1 as pb;

/// One server of the cluster as another sees it: its address, and its status if it answered.
#[derive(Debug, Clone)]
pub struct ServerView {
    pub id: u64,
    pub address: String,
    pub status: Option<pb::StatusReply>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// A lock mode's name.
pub fn mode_name(m: i32) -> &'static str {
    ["NL", "CR", "CW", "PR", "PW", "EX"].get(m as usize).copied().unwrap_or("?")
}

fn range_text(r: &Option<pb::Range>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r.start == 0 && r.end == u64::MAX => "all".into(),
        Some(r) if r.end == u64::MAX => format!("{}..", r.start),
        Some(r) => format!("{}..{}", r.start, r.end),
    }
}

/// The leader as the servers that answered say, and its commit index.
fn leader_of(servers: &[ServerView]) -> (u64, u64) {
    let leader = servers.iter().filter_map(|s| s.status.as_ref()).map(|s| s.leader_id).max().unwrap_or(0);
    let commit =
        servers.iter().filter_map(|s| s.status.as_ref()).find(|s| s.server_id == leader).map_or(0, |s| s.commit_index);
    (leader, commit)
}

/// Each server's health: `down` (no answer), `rejoining`, `behind` (applied more than 1000
/// entries behind the leader's commit), or `ok`.
pub fn health(s: &ServerView, leader_commit: u64) -> &'static str {
    match &s.status {
        None => "down",
        Some(st) if st.rejoining => "rejoining",
        Some(st) if leader_commit.saturating_sub(st.applied_index) > 1000 => "behind",
        Some(_) => "ok",
    }
}

/// Resources by contention (waiters, then granted locks), busiest first, at most `n`.
pub fn busiest(table: &pb::TableReply, n: usize) -> Vec<Value> {
    let mut rows: Vec<(&pb::ResourceRow, u64, u64)> = table
        .resources
        .iter()
        .map(|r| {
            let granted = r.locks.iter().filter(|l| l.granted).count() + r.posix.iter().filter(|p| p.granted).count();
            let waiting = r.locks.iter().filter(|l| l.waiting).count() + r.posix.iter().filter(|p| !p.granted).count();
            (r, granted as u64, waiting as u64)
        })
        .collect();
    // Contention first: those with waiters, then the most locks.
    rows.sort_by(|a, b| (b.2, b.1).cmp(&(a.2, a.1)).then_with(|| a.0.name.cmp(&b.0.name)));
    rows.into_iter()
        .take(n)
        .map(|(r, granted, waiting)| json!({ "name": r.name, "granted": granted, "waiting": waiting }))
        .collect()
}

/// The cluster page's data: servers with their health, the leader, the busiest resources and
/// the wait-for graph (edges, and drawn as SVG).
pub fn cluster(servers: &[ServerView], table: Option<&pb::TableReply>, busiest_n: usize) -> Value {
    let (leader, commit) = leader_of(servers);
    let servers: Vec<Value> = servers
        .iter()
        .map(|s| {
            let mut v = json!({
                "id": s.id, "address": s.address, "health": health(s, commit), "leader": s.id == leader,
                "error": s.error,
            });
            if let Some(st) = &s.status {
                v["term"] = st.term.into();
                v["applied_index"] = st.applied_index.into();
                v["sessions"] = st.sessions.into();
                v["locks_granted"] = st.locks_granted.into();
                v["requests_waiting"] = st.requests_waiting.into();
                v["writes_in_flight"] = st.writes_in_flight.into();
                v["stripe_writes"] = st.stripe_writes.into();
                v["mounts"] = st.mounts.len().into();
                v["metadata"] = if st.metadata_relaxed { "relaxed" } else { "strict" }.into();
                v["pid"] = st.pid.into();
            }
            v
        })
        .collect();
    let edges: Vec<(String, String)> =
        table.map_or(Vec::new(), |t| t.edges.iter().map(|e| (e.waiter.clone(), e.holder.clone())).collect());
    json!({
        "leader": leader,
        "commit_index": commit,
        "servers": servers,
        "busiest": table.map_or(Vec::new(), |t| busiest(t, busiest_n)),
        "edges": edges.iter().map(|(w, h)| json!({"waiter": w, "holder": h})).collect::<Vec<_>>(),
        "wait_for_svg": crate::svg::wait_for(&edges),
    })
}

/// Holders and waiters of resource `name` (exactly that name) in `table`.
pub fn resource(table: &pb::TableReply, name: &str) -> Value {
    let mut holders = Vec::new();
    let mut waiters = Vec::new();
    for r in table.resources.iter().filter(|r| r.name == name) {
        for l in &r.locks {
            let who = json!({"session": l.session, "lock": l.lock, "client": l.client, "gateway_of": l.gateway_of});
            if l.granted {
                let mut h = who.clone();
                h["mode"] = mode_name(l.mode).into();
                h["range"] = range_text(&l.range).into();
                h["token"] = l.token.into();
                h["cached"] = l.cached.into();
                holders.push(h);
            }
            if l.waiting {
                let mut w = who;
                w["mode"] = mode_name(l.wait_mode).into();
                w["range"] = range_text(&l.wait_range).into();
                w["blockers"] = l.blockers.clone().into();
                waiters.push(w);
            }
        }
        for p in &r.posix {
            let kind = if p.kind == pb::PosixKind::PosixWrite as i32 { "fcntl write" } else { "fcntl read" };
            let v = json!({"session": p.session, "owner": p.owner, "mode": kind, "range": range_text(&p.range)});
            if p.granted { holders.push(v) } else { waiters.push(v) }
        }
    }
    json!({ "name": name, "holders": holders, "waiters": waiters })
}

/// `stripelock top`'s screen: the same as the page, as text lines.
pub fn text(servers: &[ServerView], table: Option<&pb::TableReply>, rows: usize) -> Vec<String> {
    let (leader, commit) = leader_of(servers);
    let mut out = vec![format!("stripelock: {} servers, leader {leader}, commit index {commit}", servers.len())];
    out.push(format!(
        "{:>4} {:<22} {:<9} {:>6} {:>9} {:>8} {:>8} {:>7} {:>7}",
        "id", "address", "health", "term", "applied", "sessions", "granted", "waiting", "writes"
    ));
    for s in servers {
        let mark = if s.id == leader { "*" } else { " " };
        match &s.status {
            Some(st) => out.push(format!(
                "{:>3}{mark} {:<22} {:<9} {:>6} {:>9} {:>8} {:>8} {:>7} {:>7}",
                s.id,
                s.address,
                health(s, commit),
                st.term,
                st.applied_index,
                st.sessions,
                st.locks_granted,
                st.requests_waiting,
                st.writes_in_flight
            )),
            None => out.push(format!(
                "{:>3}{mark} {:<22} {:<9} {}",
                s.id,
                s.address,
                "down",
                s.error.as_deref().unwrap_or("")
            )),
        }
    }
    if let Some(t) = table {
        out.push(String::new());
        out.push(format!("{:<48} {:>8} {:>8}", "busiest resources", "granted", "waiting"));
        for b in busiest(t, rows) {
            out.push(format!(
                "{:<48} {:>8} {:>8}",
                b["name"].as_str().unwrap_or(""),
                b["granted"].as_u64().unwrap_or(0),
                b["waiting"].as_u64().unwrap_or(0)
            ));
        }
        if !t.edges.is_empty() {
            out.push(String::new());
            out.push("waits for:".into());
            for e in t.edges.iter().take(rows) {
                out.push(format!("  {} → {}", e.waiter, e.holder));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(session: u64, granted: bool, waiting: bool) -> pb::LockRow {
        pb::LockRow {
            lock: session * 10,
            session,
            granted,
            waiting,
            mode: 5,
            wait_mode: 3,
            range: granted.then_some(pb::Range { start: 0, end: u64::MAX }),
            wait_range: waiting.then_some(pb::Range { start: 4, end: 8 }),
            blockers: if waiting { vec![10] } else { Vec::new() },
            ..Default::default()
        }
    }

    fn table() -> pb::TableReply {
        pb::TableReply {
            resources: vec![
                pb::ResourceRow { name: "/quiet".into(), locks: vec![lock(3, true, false)], ..Default::default() },
                pb::ResourceRow {
                    name: "/hot".into(),
                    locks: vec![lock(1, true, false), lock(2, false, true)],
                    ..Default::default()
                },
            ],
            edges: vec![pb::WaitEdge { waiter: "session 2".into(), holder: "session 1".into() }],
        }
    }

    #[test]
    fn the_busiest_resource_comes_first_and_holders_and_waiters_are_told_apart() {
        let b = busiest(&table(), 10);
        assert_eq!(b[0]["name"], "/hot");
        assert_eq!((b[0]["granted"].as_u64(), b[0]["waiting"].as_u64()), (Some(1), Some(1)));
        assert_eq!(busiest(&table(), 1).len(), 1);
        let r = resource(&table(), "/hot");
        assert_eq!(r["holders"][0]["session"], 1);
        assert_eq!(r["holders"][0]["mode"], "EX");
        assert_eq!(r["holders"][0]["range"], "all");
        assert_eq!(r["waiters"][0]["session"], 2);
        assert_eq!(r["waiters"][0]["mode"], "PR");
        assert_eq!(r["waiters"][0]["range"], "4..8");
        assert_eq!(resource(&table(), "/none")["holders"].as_array().map(Vec::len), Some(0));
    }

    #[test]
    fn health_and_the_leader_come_from_the_servers_that_answered() {
        let st = |id, applied, leader| pb::StatusReply {
            server_id: id,
            leader_id: leader,
            commit_index: 5000,
            applied_index: applied,
            ..Default::default()
        };
        let servers = vec![
            ServerView { id: 1, address: "a".into(), status: Some(st(1, 5000, 1)), error: None },
            ServerView { id: 2, address: "b".into(), status: Some(st(2, 100, 1)), error: None },
            ServerView { id: 3, address: "c".into(), status: None, error: Some("refused".into()) },
        ];
        let c = cluster(&servers, Some(&table()), 5);
        assert_eq!(c["leader"], 1);
        let health: Vec<&str> =
            c["servers"].as_array().unwrap().iter().map(|s| s["health"].as_str().unwrap()).collect();
        assert_eq!(health, ["ok", "behind", "down"]);
        assert!(c["wait_for_svg"].as_str().unwrap().contains("session 2"));
        let lines = text(&servers, Some(&table()), 5);
        assert!(lines[0].contains("leader 1"), "{lines:?}");
        assert!(lines.iter().any(|l| l.contains("/hot")) && lines.iter().any(|l| l.contains("session 2 → session 1")));
    }
}
