//! `stripelock certs`: a cluster's certificate authority and the certificates of its servers
//! and clients (rcgen over ring), as PEM files in one directory: `ca.pem`/`ca.key`, and
//! `NAME.pem`/`NAME.key` per identity. Every server's certificate names `stripelock-server`
//! (clients check that name and the CA, not addresses) and serves as a client one too (servers
//! talk to each other); a client's common name is its identity.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// The CA's common name (the same in every cluster: clusters are told apart by the CA's key).
const CA_NAME: &str = "stripelock cluster CA";

fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

/// Today as (year, month, day) in UTC, `days` from now.
fn civil_day(days_from_now: i64) -> (i32, u8, u8) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    // Howard Hinnant's days-to-civil.
    let z = now.div_euclid(86_400) + days_from_now + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// How a certificate is issued.
#[derive(Debug, Clone, Copy)]
pub struct Issue {
    /// A server's (names `stripelock-server`, for serving and for calling peers).
    pub server: bool,
    /// Valid this many days from yesterday.
    pub days: u32,
    /// Tests only: valid for one day in 2020 (so expired now).
    pub expired: bool,
}

/// Issues `NAME.pem`/`NAME.key` in `dir` from its CA.
pub fn issue_in(dir: &Path, name: &str, how: Issue) -> Result<()> {
    if name.is_empty() || name == "ca" || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        bail!("`{name}` cannot name a certificate: use letters, digits, - _ . (and not `ca`)");
    }
    let ca_key = std::fs::read_to_string(dir.join("ca.key")).with_context(|| {
        format!("{} has no CA key; run `stripelock certs init --dir {}` first", dir.display(), dir.display())
    })?;
    let issuer = Issuer::new(ca_params()?, KeyPair::from_pem(&ca_key).context("ca.key is not a PEM key")?);
    // A server's certificate also names this host's loopback, for a browser or curl on the
    // status page of a local cluster (the gRPC clients check `stripelock-server`).
    let sans = if how.server {
        vec![wire::SERVER_NAME.to_string(), "localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        Vec::new()
    };
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = if how.server {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    let ((y0, m0, d0), (y1, m1, d1)) =
        if how.expired { ((2020, 1, 1), (2020, 1, 2)) } else { (civil_day(-1), civil_day(i64::from(how.days))) };
    p.not_before = rcgen::date_time_ymd(y0, m0, d0);
    p.not_after = rcgen::date_time_ymd(y1, m1, d1);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write_private(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
    Ok(())
}

/// Makes `dir` with a new CA, a `server` and a `client` certificate.
pub fn init_in(dir: &Path) -> Result<()> {
    if dir.join("ca.pem").exists() {
        bail!(
            "{} already holds a CA; issue more certificates with `stripelock certs issue NAME --dir {}`",
            dir.display(),
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let key = KeyPair::generate()?;
    let mut p = ca_params()?;
    p.not_before = rcgen::date_time_ymd(civil_day(-1).0, civil_day(-1).1, civil_day(-1).2);
    let (y, m, d) = civil_day(3650);
    p.not_after = rcgen::date_time_ymd(y, m, d);
    let ca = p.self_signed(&key)?;
    write_private(&dir.join("ca.key"), &key.serialize_pem())?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    issue_in(dir, "server", Issue { server: true, days: 3650, expired: false })?;
    issue_in(dir, "client", Issue { server: false, days: 3650, expired: false })?;
    Ok(())
}

pub fn init(dir: &Path, json: bool) -> Result<ExitCode> {
    init_in(dir)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"dir": dir, "files": ["ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"]})
        );
    } else {
        println!(
            "made a cluster CA and a server and a client certificate in {d}\n\
             servers: stripelock server ... --tls-dir {d}\n\
             clients: stripelock --tls-dir {d} ...   (or STRIPELOCK_TLS_DIR={d}); keep ca.key private",
            d = dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn issue(dir: &Path, name: &str, how: Issue, json: bool) -> Result<ExitCode> {
    issue_in(dir, name, how)?;
    if json {
        println!("{}", serde_json::json!({"dir": dir, "name": name, "server": how.server}));
    } else {
        println!("issued {name}.pem and {name}.key in {}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::civil_day;

    #[test]
    fn civil_days_step_over_months_and_years() {
        let (y, m, d) = civil_day(0);
        assert!((2024..2200).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&d));
        let later = civil_day(366);
        assert!(later.0 == y + 1 || (later.0 == y + 2 && m == 12), "{later:?} a year after {y}-{m}-{d}");
    }
}
