//! `stripelock token verify`.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use token::{ClusterKey, SignedToken};

/// Reads a cluster secret file: 64 hex digits, surrounding white space ignored.
pub fn read_secret(path: &Path) -> Result<ClusterKey, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the cluster secret {}: {e}", path.display()))?;
    let hex = text.trim();
    let bad = || format!("{} is not a cluster secret: expected 64 hex digits", path.display());
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(ClusterKey::from_bytes(bytes))
}

pub fn verify(token: &str, secret_file: &Path, json: bool) -> ExitCode {
    let mut text = token.to_string();
    if token == "-" {
        text.clear();
        if let Err(e) = std::io::stdin().read_to_string(&mut text) {
            eprintln!("error: cannot read the token from standard input: {e}");
            return ExitCode::from(2);
        }
    }
    let signed: SignedToken = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let key = match read_secret(secret_file) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let c = &signed.claims;
    let verified = key.verify(&signed);
    if json {
        let value = serde_json::json!({
            "valid": verified.is_ok(),
            "token": c.token,
            "epoch": c.token >> lockengine::TOKEN_EPOCH_SHIFT,
            "session": c.session.0,
            "mode": c.mode.name(),
            "range": c.range.to_string(),
            "resource": c.resource,
        });
        println!("{value}");
    } else {
        let state = if verified.is_ok() { "valid" } else { "INVALID (signature does not match)" };
        println!(
            "{state}: token {} (epoch {}) for {} {} {} held by session {}",
            c.token,
            c.token >> lockengine::TOKEN_EPOCH_SHIFT,
            c.resource,
            c.range,
            c.mode,
            c.session.0
        );
    }
    match verified {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
