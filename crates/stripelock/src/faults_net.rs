//! The campaign's network: one namespace per server and per client, each with a veth pair to a
//! bridge in the campaign's own namespace-less side (the root namespace, where the campaign
//! watches from at `.254`). Faults are nftables rules in a server's namespace (drops by
//! address, random drops by `numgen`), a token bucket on its link (`tc tbf`: queueing delay),
//! or its link set down. Every name carries the campaign's tag, so two campaigns never meet
//! and nothing else on the machine is touched.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs a command of iproute2 or nftables; its standard error is the failure's text.
pub fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Net {
    pub tag: String,
    /// The first three octets of the campaign's /24.
    pub subnet: String,
    pub servers: u64,
    pub clients: u64,
}

impl Net {
    pub fn new(servers: u64, clients: u64) -> Net {
        let pid = std::process::id();
        Net { tag: format!("slf{}", pid % 100_000), subnet: format!("10.88.{}", pid % 250), servers, clients }
    }

    pub fn server_ns(&self, i: u64) -> String {
        format!("{}-s{i}", self.tag)
    }

    pub fn client_ns(&self, j: u64) -> String {
        format!("{}-c{j}", self.tag)
    }

    pub fn server_ip(&self, i: u64) -> String {
        format!("{}.{i}", self.subnet)
    }

    pub fn client_ip(&self, j: u64) -> String {
        format!("{}.{}", self.subnet, 100 + j)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    fn namespaces(&self) -> Vec<String> {
        (1..=self.servers).map(|i| self.server_ns(i)).chain((1..=self.clients).map(|j| self.client_ns(j))).collect()
    }

    /// Makes the bridge, the namespaces, their links and each server's empty fault table.
    pub fn create(&self) -> Result<()> {
        let br = self.bridge();
        sh("ip", &["link", "add", &br, "type", "bridge"])?;
        sh("ip", &["addr", "add", &format!("{}.254/24", self.subnet), "dev", &br])?;
        sh("ip", &["link", "set", &br, "up"])?;
        let hosts: Vec<(String, String, String)> = (1..=self.servers)
            .map(|i| (self.server_ns(i), self.server_ip(i), format!("{}v{i}", self.tag)))
            .chain((1..=self.clients).map(|j| (self.client_ns(j), self.client_ip(j), format!("{}c{j}", self.tag))))
            .collect();
        for (ns, ip, veth) in hosts {
            sh("ip", &["netns", "add", &ns])?;
            sh("ip", &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            sh("ip", &["link", "set", &veth, "master", &br, "up"])?;
            sh("ip", &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        for i in 1..=self.servers {
            let ns = self.server_ns(i);
            nft(&ns, "add table inet slf")?;
            nft(&ns, "add chain inet slf in { type filter hook input priority 0; policy accept; }")?;
            nft(&ns, "add chain inet slf out { type filter hook output priority 0; policy accept; }")?;
        }
        Ok(())
    }

    /// Removes everything `create` made (what is already gone is passed over).
    pub fn destroy(&self) {
        for ns in self.namespaces() {
            let _ = sh("ip", &["netns", "del", &ns]);
        }
        let _ = sh("ip", &["link", "del", &self.bridge()]);
    }

    /// Server `i` drops what it receives from and sends to `peers`.
    pub fn cut(&self, i: u64, peers: &[String], inbound: bool, outbound: bool) -> Result<()> {
        if peers.is_empty() {
            return Ok(());
        }
        let set = peers.join(", ");
        let ns = self.server_ns(i);
        if inbound {
            nft(&ns, &format!("add rule inet slf in ip saddr {{ {set} }} drop"))?;
        }
        if outbound {
            nft(&ns, &format!("add rule inet slf out ip daddr {{ {set} }} drop"))?;
        }
        Ok(())
    }

    /// Server `i` drops `percent` of its packets each way at random.
    pub fn lose(&self, i: u64, percent: u64) -> Result<()> {
        let ns = self.server_ns(i);
        let peer = format!("ip saddr != {}.254", self.subnet);
        nft(&ns, &format!("add rule inet slf in {peer} numgen random mod 100 < {percent} drop"))?;
        let peer = format!("ip daddr != {}.254", self.subnet);
        nft(&ns, &format!("add rule inet slf out {peer} numgen random mod 100 < {percent} drop"))
    }

    /// Server `i`'s link sends at most `kbit` kbit/s, queueing up to `latency_ms` (then drops).
    pub fn slow(&self, i: u64, kbit: u64, latency_ms: u64) -> Result<()> {
        let ns = self.server_ns(i);
        sh(
            "tc",
            &[
                "-n",
                &ns,
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                "tbf",
                "rate",
                &format!("{kbit}kbit"),
                "burst",
                "4kb",
                "latency",
                &format!("{latency_ms}ms"),
            ],
        )
    }

    pub fn link(&self, i: u64, up: bool) -> Result<()> {
        sh("ip", &["-n", &self.server_ns(i), "link", "set", "eth0", if up { "up" } else { "down" }])
    }

    /// Undoes every network fault of server `i`.
    pub fn heal(&self, i: u64) {
        let ns = self.server_ns(i);
        let _ = nft(&ns, "flush chain inet slf in");
        let _ = nft(&ns, "flush chain inet slf out");
        let _ = sh("tc", &["-n", &ns, "qdisc", "del", "dev", "eth0", "root"]);
        let _ = self.link(i, true);
    }
}

fn nft(ns: &str, rule: &str) -> Result<()> {
    sh("ip", &["netns", "exec", ns, "nft", rule])
}

/// What the campaign needs of the machine, or what to do about it.
pub fn preflight() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("the fault campaign makes network namespaces and mounts a tmpfs: run it as root");
    }
    for (tool, package) in [("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")] {
        if Command::new(tool).arg("-V").output().is_err() {
            bail!("`{tool}` is not installed: apt-get install {package} (bench/faults.sh does this)");
        }
    }
    Ok(())
}
