//! The secondary tier on S3 (issue 14): the round trip of `tier.rs` against a real
//! S3-protocol server started here on loopback (moto's `moto_server`: `.ci/run` installs it;
//! `STRIPELOCK_MOTO_SERVER` names another). Needs stripelock's `s3` feature:
//! `cargo test -p stripelock --features s3 --test tier_s3`.

mod common;

#[cfg(not(feature = "s3"))]
#[test]
fn s3_tier_round_trip() {
    eprintln!("SKIPPED: this build has no S3 tier (built with --no-default-features); the s3 feature has it");
}

#[cfg(feature = "s3")]
mod s3 {
    use std::io::{Read, Write};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::common::*;

    /// A `moto_server` of our own on a loopback port, stopped when dropped.
    struct Moto {
        child: Child,
        port: u16,
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn moto_exe() -> Option<String> {
        if let Ok(exe) = std::env::var("STRIPELOCK_MOTO_SERVER") {
            return Some(exe);
        }
        let found = Command::new("sh").args(["-c", "command -v moto_server"]).output().ok()?;
        let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
        (!path.is_empty()).then_some(path)
    }

    /// One HTTP/1.1 request to the server, its status line back.
    fn http(port: u16, method: &str, path: &str) -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer.lines().next().unwrap_or_default().to_string())
    }

    impl Moto {
        fn start() -> Option<Moto> {
            let exe = moto_exe()?;
            let port = free_port();
            let child = Command::new(&exe)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{exe} did not start: {e}"));
            let moto = Moto { child, port };
            let deadline = Instant::now() + Duration::from_secs(30);
            while http(port, "GET", "/").is_err() {
                assert!(Instant::now() < deadline, "moto_server did not answer on port {port} within 30 s");
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(moto)
        }
    }

    fn json(c: &Cluster, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&cli(c, &a)).unwrap()
    }

    fn get(c: &Cluster, path: &str) -> Vec<u8> {
        let out = c.dir.join("get.out");
        cli(c, &["get", path, out.to_str().unwrap()]);
        std::fs::read(&out).unwrap()
    }

    #[test]
    fn s3_tier_round_trip() {
        let Some(moto) = Moto::start() else {
            eprintln!("SKIPPED: no moto_server (pip install 'moto[server]', or set STRIPELOCK_MOTO_SERVER)");
            return;
        };
        let made = http(moto.port, "PUT", "/cold").unwrap();
        assert!(made.contains(" 200"), "the bucket was not made: {made}");
        serial(async {
            let endpoint = format!("http://127.0.0.1:{}", moto.port);
            let extra = ["--tier", "s3://cold", "--tier-endpoint", &endpoint, "--recall-on-read", "false"];
            let env = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")];
            // Over mutual TLS: the S3 client and the cluster's TLS share one rustls crypto
            // provider (ring); with two (aws-lc-rs came with S3) the servers once panicked at
            // their first TLS config.
            let tls = std::env::temp_dir().join(format!("stripelock-tier-s3-certs-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tls);
            let made = Command::new(&*EXE).args(["certs", "init", "--dir"]).arg(&tls).output().unwrap();
            assert!(made.status.success(), "certs init: {}", String::from_utf8_lossy(&made.stderr));
            let c = Cluster::start_tls_with_env(3, "tier-s3", &tls, &extra, &env).await;
            let data = noise(20 << 20, 61);
            let local = c.dir.join("s3.in");
            std::fs::write(&local, &data).unwrap();
            cli(&c, &["put", local.to_str().unwrap(), "/s"]);

            let m = json(&c, &["migrate", "/s"]);
            let f = &m["files"][0];
            assert_eq!((f["ok"].as_bool(), f["bytes"].as_u64()), (Some(true), Some(20 << 20)), "{m}");
            assert_eq!(f["blake3"].as_str().unwrap(), blake3::hash(&data).to_hex().as_str());
            let key = f["key"].as_str().unwrap().to_string();
            // The object is in the bucket (asked of the S3 server itself), nothing in a directory.
            let head = http(moto.port, "HEAD", &format!("/cold/{key}")).unwrap();
            assert!(head.contains(" 200"), "the object is not in the bucket: {head}");
            assert!(!c.dir.join("tier").exists(), "nothing went to the default directory tier");

            assert!(get(&c, "/s") == data, "the stub reads byte-identical from S3");
            let out = run_at(&c, 2, &["cat", "/s", "--range", "10000000..10004096"], b"");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(out.stdout == data[10_000_000..10_004_096]);
            cli(&c, &["scrub", "/"]);
            let gc = json(&c, &["tier", "gc", "--grace", "0s"]);
            assert_eq!((gc["named"].as_u64(), gc["deleted"].as_array().unwrap().len()), (Some(1), 0), "{gc}");

            cli(&c, &["recall", "/s"]);
            assert_eq!(json(&c, &["stat", "/s"])["tier_key"].as_str(), Some(""));
            assert!(get(&c, "/s") == data, "recalled bytes differ");
            let gc = json(&c, &["tier", "gc", "--grace", "0s"]);
            assert_eq!(gc["deleted"], serde_json::json!([key]), "{gc}");
            let head = http(moto.port, "HEAD", &format!("/cold/{key}")).unwrap();
            assert!(head.contains(" 404"), "gc deleted the object from the bucket: {head}");
            drop(c);
            let _ = std::fs::remove_dir_all(&tls);
        });
        drop(moto);
    }
}
