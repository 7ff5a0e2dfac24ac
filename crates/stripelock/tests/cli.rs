//! The `stripelock` command as a user runs it: exit codes and what it prints.

use std::process::Command;

fn stripelock(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_stripelock")).args(args).output().expect("run stripelock")
}

fn scenario_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../lockengine/tests/scenarios")
}

#[test]
fn replay_checks_every_scenario() {
    let mut files: Vec<String> = std::fs::read_dir(scenario_dir())
        .expect("scenarios")
        .map(|e| e.expect("entry").path().display().to_string())
        .filter(|p| p.ends_with(".scn"))
        .collect();
    files.sort();
    let mut args = vec!["debug", "replay", "--check"];
    args.extend(files.iter().map(String::as_str));
    let out = stripelock(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "replay --check failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), files.len(), "{stdout}");
}

#[test]
fn replay_prints_the_trace() {
    let dir = std::env::temp_dir().join(format!("stripelock-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t.scn");
    std::fs::write(&file, "session A\nlock L1 A /f all EX\nlock L2 A /f 0..1 PR nowait\n").unwrap();
    let out = stripelock(&["debug", "replay", file.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "granted L1 EX all token=1\nbusy L2 blockers=L1\n");

    // A trace that differs from its expectation fails --check with exit 1 and a diff.
    std::fs::write(&file, "session A\nlock L1 A /f all EX\n> granted L1 EX all token=2\n").unwrap();
    let out = stripelock(&["debug", "replay", "--check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("- granted L1 EX all token=2") && stdout.contains("+ granted L1 EX all token=1"),
        "{stdout}"
    );

    // A malformed line exits 2 naming the line and what was expected.
    std::fs::write(&file, "session A\nlock L1 A /f\n").unwrap();
    let out = stripelock(&["debug", "replay", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2") && stderr.contains("expected `lock <L> <S>"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_engine_json_has_the_figures() {
    let out = stripelock(&["bench", "engine", "--json", "--seconds", "0.05"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    for key in [
        "uncontended_acquire_release_per_s",
        "disjoint_64_owners_per_s",
        "shared_16_pr_holders_per_s",
        "ex_handoff_2_sessions_per_s",
        "beside_10_ranges_per_s",
        "beside_10000_ranges_per_s",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} missing or zero in {v}");
    }
}

#[test]
fn token_verify_checks_the_signature() {
    use lockengine::{ByteRange, Mode, SessionId};
    let dir = std::env::temp_dir().join(format!("stripelock-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("cluster.secret");
    std::fs::write(&secret, format!("{}\n", "ab".repeat(32))).unwrap();
    let key = token::ClusterKey::from_bytes([0xab; 32]);
    let claims = token::Claims {
        token: 5,
        session: SessionId(9),
        mode: Mode::EX,
        range: ByteRange::ALL,
        resource: "/jobs/nightly".into(),
    };
    let good = key.sign(claims).unwrap().to_string();
    let out = stripelock(&["token", "verify", &good, "--secret-file", secret.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["valid"].as_bool(), v["token"].as_u64(), v["resource"].as_str()),
        (Some(true), Some(5), Some("/jobs/nightly"))
    );

    // Signed by another cluster: exit 1 and says so.
    let other = token::ClusterKey::from_bytes([1; 32]).sign(key.verify(&good.parse().unwrap()).unwrap()).unwrap();
    let out = stripelock(&["token", "verify", &other.to_string(), "--secret-file", secret.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("INVALID"));

    // Not a token, or no secret: exit 2.
    let out = stripelock(&["token", "verify", "hello", "--secret-file", secret.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let out = stripelock(&["token", "verify", &good, "--secret-file", dir.join("missing").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the cluster secret"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn server_config_file_errors_name_the_problem() {
    let dir = std::env::temp_dir().join(format!("stripelock-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "id = 1\nheartbeat = 100\n").unwrap();
    let out = stripelock(&["server", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `heartbeat`") && err.contains("heartbeat_ms"), "{err}");

    std::fs::write(&file, "id = 1\npeers = \"1=127.0.0.1:1\"\n").unwrap();
    let out = stripelock(&["server", "--config", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("no data: give --data or set `data` in"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A single-server cluster from a config file, with one setting overridden by a flag, answers.
#[test]
fn server_runs_from_a_config_file() {
    let dir = std::env::temp_dir().join(format!("stripelock-cfg-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = wire::unused_port().unwrap();
    let file = dir.join("server.toml");
    let config = format!(
        "id = 1\npeers = \"1=127.0.0.1:{port}\"\ndata = \"{}\"\nbootstrap = true\nheartbeat_ms = 50\ninsecure = true\n",
        dir.join("data").display()
    );
    std::fs::write(&file, config).unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_stripelock"))
        .args(["server", "--config", file.to_str().unwrap(), "--snapshot-every", "100"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the server");
    let cluster = format!("127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut answered = None;
    while std::time::Instant::now() < deadline {
        let out = stripelock(&["status", "--json", "--cluster", &cluster]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("\"leader\":1,") {
            answered = Some(text);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = server.kill();
    let _ = server.wait();
    let status = answered.expect("the server from the config file never answered `status`");
    assert!(status.contains(&format!("127.0.0.1:{port}")), "{status}");
    assert!(dir.join("data").join("raft.redb").exists(), "the data dir of the file was not used");
    std::fs::remove_dir_all(&dir).unwrap();
}
