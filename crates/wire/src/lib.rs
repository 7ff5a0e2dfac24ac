//! The stripelock wire protocol (`proto/stripelock.proto`, package `stripelock.v1`): prost
//! messages and tonic clients and servers, generated at build time without protoc; the
//! `Connector` through which servers and clients open channels; [`ErrorCode`], the one error
//! code of every service, with how a refused call carries it; and `convert`, every conversion
//! between messages and the domain's types.

#![allow(missing_debug_implementations, clippy::all)]

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

pub mod v1 {
    tonic::include_proto!("stripelock.v1");
}

pub mod convert;
mod error;

pub use error::{
    ERROR_DETAIL_KEY, ErrorCode, LeaderHint, UnknownErrorCode, code_of, from_server, not_leader_status, refusal_of,
    reword,
};

/// Opens a lazily connecting gRPC channel to a `host:port`. Real TCP by default; the simulation
/// hands servers and clients one that dials its simulated network instead.
#[derive(Clone)]
pub struct Connector(Arc<dyn Fn(&str) -> Result<Channel, BadAddress> + Send + Sync>);

/// A server address no channel can be made to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad server address {addr:?}: {reason}")]
pub struct BadAddress {
    pub addr: String,
    pub reason: String,
}

impl Connector {
    pub fn new(f: impl Fn(&str) -> Result<Channel, BadAddress> + Send + Sync + 'static) -> Connector {
        Connector(Arc::new(f))
    }

    /// Real TCP, no Nagle delay, a connection attempt gives up after `connect_timeout`, and an
    /// HTTP/2 ping every second that must be answered within 3 s: a peer cut off without a word
    /// (packets dropped, a paused process) fails its calls in seconds instead of leaving them
    /// to TCP's retransmissions for many minutes (found by the fault campaign: a stripe write
    /// waiting on such a call kept its row's stripe lock, and the row stopped taking writes).
    pub fn tcp(connect_timeout: Duration) -> Connector {
        Connector::new(move |addr| {
            Ok(endpoint(addr)?
                .connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true)
                .connect_lazy())
        })
    }

    pub fn channel(&self, addr: &str) -> Result<Channel, BadAddress> {
        (self.0)(addr)
    }
}

impl Default for Connector {
    fn default() -> Connector {
        Connector::tcp(Duration::from_millis(500))
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

/// The endpoint for `host:port`: over mutual TLS once this process has an identity
/// ([`use_tls`]), else plain HTTP/2.
pub fn endpoint(addr: &str) -> Result<Endpoint, BadAddress> {
    let bad = |e: tonic::transport::Error| BadAddress { addr: addr.to_string(), reason: e.to_string() };
    match TLS.get() {
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(bad),
        Some(tls) => {
            Endpoint::from_shared(format!("https://{addr}")).and_then(|e| e.tls_config(tls.client())).map_err(bad)
        }
    }
}

/// The name every server's certificate carries and every client checks (servers are told
/// apart by the CA that signed them, not by their addresses).
pub const SERVER_NAME: &str = "stripelock-server";

/// A process's TLS identity in its cluster: the cluster's CA and its own certificate and key
/// (PEM), read from a directory that `stripelock certs init` made.
#[derive(Clone)]
pub struct Tls {
    pub dir: std::path::PathBuf,
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({})", self.dir.display())
    }
}

/// A TLS directory that lacks a file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason} (make the cluster's certificates with `stripelock certs init --dir DIR`)")]
pub struct TlsMissing {
    pub path: String,
    pub reason: String,
}

impl Tls {
    /// `DIR/ca.pem`, `DIR/NAME.pem` and `DIR/NAME.key`.
    pub fn from_dir(dir: &std::path::Path, name: &str) -> Result<Tls, TlsMissing> {
        use_ring();
        let read = |file: String| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|e| TlsMissing { path: path.display().to_string(), reason: e.to_string() })
        };
        Ok(Tls {
            dir: dir.to_path_buf(),
            ca: read("ca.pem".into())?,
            cert: read(format!("{name}.pem"))?,
            key: read(format!("{name}.key"))?,
        })
    }

    /// What a client presents and checks.
    pub fn client(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .domain_name(SERVER_NAME)
    }

    /// What a server presents, and the CA its clients' certificates must come from.
    pub fn server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca))
    }
}

/// Makes ring rustls's process-wide crypto provider, which tonic's TLS takes. Built with a
/// second provider (as object_store's batteries-included S3 client would bring aws-lc-rs),
/// rustls cannot choose one on its own and panics when the first TLS config is made.
fn use_ring() {
    // Already made (by an earlier call, or by whoever came first): nothing to do.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
}

/// Who may use a server's HTTP port (metrics, status page) when the server runs with TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HttpClients {
    /// Only clients presenting a certificate of the cluster's CA (mutual TLS, the default).
    #[default]
    Certified,
    /// Any client, certificate or none (still over TLS): a browser on the server's own host.
    Any,
}

/// A setting of who may use the HTTP port that is neither `certified` nor `any`.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not `certified` or `any`")]
pub struct UnknownHttpClients(pub String);

impl std::str::FromStr for HttpClients {
    type Err = UnknownHttpClients;
    fn from_str(s: &str) -> Result<Self, UnknownHttpClients> {
        match s {
            "certified" => Ok(HttpClients::Certified),
            "any" => Ok(HttpClients::Any),
            _ => Err(UnknownHttpClients(s.to_string())),
        }
    }
}

/// A TLS directory whose files do not make a TLS setup.
#[derive(Debug, thiserror::Error)]
#[error("TLS from {dir}: {reason}")]
pub struct TlsBad {
    pub dir: String,
    pub reason: String,
}

impl Tls {
    /// What the HTTP port accepts connections with: this server's certificate, and (for
    /// [`HttpClients::Certified`]) a client certificate of the cluster's CA required.
    pub fn http_acceptor(&self, clients: HttpClients) -> Result<tokio_rustls::TlsAcceptor, TlsBad> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |reason: String| TlsBad { dir: self.dir.display().to_string(), reason };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let certs = |pem: &[u8], what: &str| {
            CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("{what} is not a PEM certificate: {e}")))
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&self.ca, "ca.pem")? {
            roots.add(ca).map_err(|e| bad(format!("ca.pem: {e}")))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone());
        let verifier = match clients {
            HttpClients::Certified => verifier,
            HttpClients::Any => verifier.allow_unauthenticated(),
        }
        .build()
        .map_err(|e| bad(format!("ca.pem: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| bad(format!("the server key: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.cert, "the server certificate")?, key)
            .map_err(|e| bad(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
    }
}

static TLS: std::sync::OnceLock<Tls> = std::sync::OnceLock::new();

/// From now on this process connects over mutual TLS as `tls` (once; a second call keeps the
/// first identity and says whether it was this one).
pub fn use_tls(tls: Tls) -> bool {
    let dir = tls.dir.clone();
    TLS.get_or_init(|| tls).dir == dir
}

/// `text` (why a connection failed), with what to do when it looks like a TLS mismatch: a
/// plain client talking to a TLS server sees an HTTP/2 framing error, a TLS client talking to a
/// plain server a handshake error, and a certificate the server refuses an alert.
pub fn tls_hint(text: String) -> String {
    let plain_to_tls =
        TLS.get().is_none() && (text.contains("frame with invalid size") || text.contains("http2 error"));
    let tls_refused = TLS.get().is_some()
        && ["certificate", "handshake", "InvalidContentType", "alert", "UnknownIssuer"]
            .iter()
            .any(|w| text.contains(w));
    if plain_to_tls {
        format!("{text} (the server may require TLS: give --tls-dir DIR or set STRIPELOCK_TLS_DIR)")
    } else if tls_refused {
        format!(
            "{text} (TLS was refused: the server and these certificates must come from the same cluster CA, and be in date)"
        )
    } else {
        text
    }
}

/// The identity [`use_tls`] set, if any.
pub fn tls() -> Option<&'static Tls> {
    TLS.get()
}

/// A port on 127.0.0.1 that nothing listens on now, chosen below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`). A port the kernel handed out for port 0 is an ephemeral
/// one: until a server binds it, the kernel may give it to an outgoing connection, and a
/// connection to it from this host may connect to itself (TCP self-connection), which a Raft
/// peer then takes for a message from another server.
pub fn unused_port() -> std::io::Result<u16> {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (low, high) = if first_ephemeral > 12_000 { (10_000u32, u32::from(first_ephemeral)) } else { (49_152, 65_536) };
    // A start that differs between processes and calls, so parallel callers rarely collide.
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let span = high - low;
    for i in 0..span {
        let port = (low + (seed.wrapping_add(i.wrapping_mul(7919)) % span)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no free port below the ephemeral range"))
}
