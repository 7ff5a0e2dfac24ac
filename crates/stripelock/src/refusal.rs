//! What the CLI says and exits with when the cluster refuses: for each error code, a sentence
//! on what went wrong and what to do, and an exit code (the table in README.md). The code is
//! read from the [`client::ClientError`] in an error's chain, never from its message.

use client::{ClientError, ErrorCode};

/// The exit code of a refusal with `code`, for every command but `lock` (which keeps 124 for a
/// lock not available and 125 for its own failures, beside its command's codes). 101–118, the
/// proto enum's number + 100, then 97–99 for the namespace's codes (19–21) and 96 for quota
/// (22): clear of 1 and 2
/// (`scrub`, errors the CLI finds itself) and of 119–127 (`lock`).
pub fn exit_code(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::Busy => 101,
        ErrorCode::Deadlock => 102,
        ErrorCode::NotLeader => 103,
        ErrorCode::SessionExpired => 104,
        ErrorCode::Fenced => 105,
        ErrorCode::StaleToken => 106,
        ErrorCode::BadToken => 107,
        ErrorCode::Denied => 108,
        ErrorCode::Limit => 109,
        ErrorCode::TooLarge => 110,
        ErrorCode::NotFound => 111,
        ErrorCode::Exists => 112,
        ErrorCode::Conflict => 113,
        ErrorCode::BadRequest => 114,
        ErrorCode::Unavailable => 115,
        ErrorCode::VersionMismatch => 116,
        ErrorCode::Corrupt => 117,
        ErrorCode::Internal => 118,
        ErrorCode::NotDir => 97,
        ErrorCode::IsDir => 98,
        ErrorCode::NotEmpty => 99,
        ErrorCode::Quota => 96,
    }
}

/// What a refusal with `code` means and what to do about it, in one sentence.
pub fn sentence(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Busy => "others hold a conflicting lock on it; wait for them (drop --nowait) or try again later",
        ErrorCode::Deadlock => {
            "waiting would deadlock with the sessions it waits for; release the locks this process holds and try again"
        }
        ErrorCode::NotLeader => {
            "the server asked does not lead the cluster; try again, or ask the leader `status` names"
        }
        ErrorCode::SessionExpired => {
            "the session ended (its lease ran out, or it was closed or evicted) and its locks are gone; take them again"
        }
        ErrorCode::Fenced => {
            "the lock's session was fenced after its lease ran out, so storage refuses its writes; take the lock again"
        }
        ErrorCode::StaleToken => {
            "the lock the token came from is gone or a newer holder has written there; take the lock again and redo the work"
        }
        ErrorCode::BadToken => {
            "the token is not one this cluster signed; use the STRIPELOCK_TOKEN of a lock it granted"
        }
        ErrorCode::Denied => "the lock held does not allow this (its mode, range or file); take the lock this needs",
        ErrorCode::Limit => {
            "a limit of the cluster is reached; release or remove what is not needed, or raise the setting the message names"
        }
        ErrorCode::TooLarge => "it is larger than the cluster allows; make it smaller or split it",
        ErrorCode::NotFound => "it does not exist; check the name (`stripelock ls`, `stripelock locks`)",
        ErrorCode::Exists => "it exists already; remove it first or choose another name",
        ErrorCode::Conflict => "it changed meanwhile (removed, replaced or not ready); look at it again and retry",
        ErrorCode::BadRequest => "the request is not valid; check the arguments",
        ErrorCode::Unavailable => {
            "no server could serve it now; check that the servers run (`stripelock status`, `stripelock up`) and try again"
        }
        ErrorCode::VersionMismatch => "another write changed the same stripe meanwhile; try again",
        ErrorCode::Corrupt => {
            "stored data is damaged beyond what parity rebuilds; run `stripelock scrub --repair`, or put the file again"
        }
        ErrorCode::Internal => "a server failed on its own; its log (stripelock-data/server-N/server.log) says more",
        ErrorCode::NotDir => "a part of the path is not a directory; check the path (`stripelock ls`)",
        ErrorCode::IsDir => "it is a directory; name a file, or remove the directory's contents first",
        ErrorCode::NotEmpty => "the directory is not empty; remove what it holds first",
        ErrorCode::Quota => {
            "this client's identity is over its quota (the message names which); release what it holds, remove \
             files it stored, slow down, or ask the operator to raise the server's `quota` setting"
        }
    }
}

/// The cluster's code for an error, if a refusal (or a failure to reach the cluster) is in its
/// chain.
pub fn code_of(e: &anyhow::Error) -> Option<ErrorCode> {
    e.chain().find_map(|c| c.downcast_ref::<ClientError>()).map(ClientError::code)
}

/// Prints an error as a sentence with its causes, the code's sentence when the cluster refused,
/// and with `json` the same as one object on standard output; returns the exit code (`other`
/// when the error is not a refusal).
pub fn report(e: &anyhow::Error, json: bool, prefix: &str, exit: impl Fn(ErrorCode) -> u8, other: u8) -> u8 {
    let code = code_of(e);
    let status = code.map_or(other, &exit);
    eprintln!("{prefix}error: {e:#}");
    if let Some(code) = code {
        eprintln!("{prefix}{code}: {} (exit {status})", sentence(code));
    }
    if json {
        let body = serde_json::json!({
            "error": {
                "code": code.map(ErrorCode::name),
                "exit_code": status,
                "message": format!("{e:#}"),
                "advice": code.map(sentence),
            }
        });
        println!("{body}");
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_own_exit_code_clear_of_the_others() {
        let mut seen = std::collections::BTreeSet::new();
        for code in ErrorCode::ALL {
            let n = exit_code(code);
            let want = match i32::from(code) {
                c @ ..=18 => c + 100,
                c @ 19..=21 => c - 19 + 97,
                _ => 96,
            };
            assert_eq!(i32::from(n), want, "{code}: the table is the enum's number + 100 (19-21: 97-99, 22: 96)");
            assert!(!(119..=127).contains(&n) && n > 2, "{code}: {n} collides with a documented exit code");
            assert!(seen.insert(n), "{code}: exit code {n} used twice");
            assert!(!sentence(code).is_empty());
        }
    }

    #[test]
    fn the_code_is_read_from_the_chain_not_the_message() {
        let refused = ClientError::Refused { code: ErrorCode::NotFound, message: "no such file: /a".into() };
        let e = anyhow::Error::new(refused).context("rm /a failed");
        assert_eq!(code_of(&e), Some(ErrorCode::NotFound));
        assert_eq!(code_of(&anyhow::anyhow!("refused (not-found): looks like one")), None);
    }
}
