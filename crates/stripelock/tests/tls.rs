//! Keeping strangers out (issue 15): a cluster over mutual TLS admits only certificates of its
//! own CA that are in date: no certificate, another cluster's CA, an expired certificate and a
//! server of another cluster are refused, and a client will not talk to another cluster's
//! server; a token signed by another cluster is refused by storage.

mod common;
use common::*;
use wire::v1 as pb;

fn certs(args: &[&str]) {
    let out = std::process::Command::new(&*EXE).arg("certs").args(args).output().unwrap();
    assert!(out.status.success(), "certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The CLI's `status` against `c` with the environment `env` (TLS settings), its output.
fn status_with(c: &Cluster, env: &[(&str, &std::path::Path)], name: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(&*EXE);
    cmd.env_remove("STRIPELOCK_TLS_DIR").env_remove("STRIPELOCK_TLS_NAME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(n) = name {
        cmd.env("STRIPELOCK_TLS_NAME", n);
    }
    cmd.args(["lock", "/tls/probe", "--nowait", "--cluster", &c.addrs().join(","), "--", "true"]).output().unwrap()
}

/// `curl` of `url` with these extra arguments: whether it answered 200, and what curl said.
fn curl(url: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl (installed by .ci/run)");
    let said = format!("{} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && out.stdout == b"200", said)
}

#[test]
fn only_certificates_of_the_clusters_ca_in_date_get_in() {
    serial(async {
        let base = std::env::temp_dir().join(format!("stripelock-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (ours, theirs) = (base.join("ours"), base.join("theirs"));
        certs(&["init", "--dir", ours.to_str().unwrap()]);
        certs(&["init", "--dir", theirs.to_str().unwrap()]);
        certs(&["issue", "old", "--dir", ours.to_str().unwrap(), "--expired-for-test"]);
        certs(&["issue", "alice", "--dir", ours.to_str().unwrap()]);
        let c = Cluster::start_tls(3, "tls", &ours, &[]).await;

        // Ours: in.
        let key = "STRIPELOCK_TLS_DIR";
        for name in [None, Some("alice")] {
            let ok = status_with(&c, &[(key, &ours)], name);
            assert!(ok.status.success(), "{name:?}: {}", String::from_utf8_lossy(&ok.stderr));
        }
        // No certificate, another CA's client and server, an expired one: refused.
        let plain = status_with(&c, &[], None);
        assert!(!plain.status.success());
        let why = String::from_utf8_lossy(&plain.stderr);
        assert!(why.contains("require TLS"), "a plain client is told what to do: {why}");
        for (dir, name, what) in [
            (&theirs, None, "another cluster's client"),
            (&theirs, Some("server"), "another cluster's server"),
            (&ours, Some("old"), "an expired certificate"),
        ] {
            let out = status_with(&c, &[(key, dir)], name);
            assert!(!out.status.success(), "{what} got in");
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(why.contains("no server of the cluster answered"), "{what}: {why}");
        }

        // The HTTP port (metrics, status page) is TLS too, and by default mutual: our client's
        // certificate gets in; none, another CA's, or plain HTTP do not.
        let metrics = format!("https://{}/metrics", c.servers[0].http);
        let pem = |dir: &std::path::Path, f: &str| dir.join(f).to_str().unwrap().to_string();
        let (ca, cert, key_file) = (pem(&ours, "ca.pem"), pem(&ours, "client.pem"), pem(&ours, "client.key"));
        let (ok, said) = curl(&metrics, &["--cacert", &ca, "--cert", &cert, "--key", &key_file]);
        assert!(ok, "our client on the HTTP port: {said}");
        let (theirs_cert, theirs_key) = (pem(&theirs, "client.pem"), pem(&theirs, "client.key"));
        for (what, args) in [
            ("no certificate", vec!["--cacert", &ca]),
            ("another cluster's certificate", vec!["--cacert", &ca, "--cert", &theirs_cert, "--key", &theirs_key]),
        ] {
            let (ok, said) = curl(&metrics, &args);
            assert!(!ok, "{what} got into the HTTP port: {said}");
        }
        let (ok, said) = curl(&format!("http://{}/metrics", c.servers[0].http), &[]);
        assert!(!ok, "plain HTTP got into the HTTP port: {said}");

        // A client of ours does not talk to another cluster's server either: a lone server of
        // theirs, asked with our certificates, is refused by the client.
        let (lone_port, lone_http) = (free_port(), format!("127.0.0.1:{}", free_port()));
        let lone_dir = base.join("lone");
        let mut lone = std::process::Command::new(&*EXE)
            .args(["server", "--id", "1", "--peers", &format!("1=127.0.0.1:{lone_port}"), "--bootstrap"])
            .args(["--http", &lone_http, "--http-clients", "any"])
            .arg("--data")
            .arg(&lone_dir)
            .arg("--tls-dir")
            .arg(&theirs)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let lone_addr = format!("127.0.0.1:{lone_port}");
        let theirs_token = {
            // Their own client gets in, and holds a lock whose signed token it prints.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let out = std::process::Command::new(&*EXE)
                    .env(key, &theirs)
                    .args(["lock", "/tls/f", "--cluster", &lone_addr, "--", "sh", "-c", "echo $STRIPELOCK_TOKEN"])
                    .output()
                    .unwrap();
                let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if out.status.success() && token.starts_with("slt1.") {
                    break token;
                }
                assert!(std::time::Instant::now() < deadline, "their server did not serve its own client");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        let ours_to_theirs = std::process::Command::new(&*EXE)
            .env(key, &ours)
            .args(["lock", "/tls/g", "--nowait", "--cluster", &lone_addr, "--", "true"])
            .output()
            .unwrap();
        assert!(!ours_to_theirs.status.success(), "our client talked to another cluster's server");
        // With `--http-clients any` (as `up` runs) its HTTP port takes a browser without a
        // certificate, still over TLS with the server's certificate.
        let page = format!("https://{lone_http}/");
        let (ok, said) = curl(&page, &["--cacert", &pem(&theirs, "ca.pem")]);
        assert!(ok, "--http-clients any, no client certificate: {said}");
        let (ok, said) = curl(&page, &["--cacert", &ca]);
        assert!(!ok, "the server's certificate is checked against the CA the client trusts: {said}");
        let _ = lone.kill();
        let _ = lone.wait();

        // A token signed by the other cluster is refused by our storage.
        let local = c.dir.join("f.in");
        std::fs::write(&local, b"ours").unwrap();
        cli(&c, &["put", local.to_str().unwrap(), "/tls/f"]);
        let ch = wire::endpoint(&c.servers[0].addr).unwrap().connect().await.unwrap();
        let mut files = pb::files_client::FilesClient::new(ch);
        let req =
            pb::WriteRequest { path: "/tls/f".into(), token: theirs_token, offset: 0, data: b"THEIRS"[..].into() };
        let refused = files.write(req).await.unwrap_err();
        assert!(
            refused.message().contains("token") || refused.message().contains("signature"),
            "refused for its token: {refused:?}"
        );
        let out = c.dir.join("f.out");
        cli(&c, &["get", "/tls/f", out.to_str().unwrap()]);
        assert_eq!(std::fs::read(&out).unwrap(), b"ours");
        let _ = std::fs::remove_dir_all(&base);
    });
}
