//! Fencing tokens as clients and storage see them: the engine's token number together with what
//! it was granted for (resource, range, mode, session), signed with a keyed BLAKE3 MAC under the
//! cluster secret created at bootstrap. Storage checks the MAC before it compares numbers, so a
//! client can neither raise its number nor move a token to another range or resource.
//!
//! The text form (what `STRIPELOCK_TOKEN` holds) is `slt1.<claims in hex>.<mac in hex>`; the
//! claims' byte layout is drawn in `docs/formats.md`. Pure: no clock, no I/O, no randomness
//! (the secret's bytes come from the caller).

use std::fmt;

use lockengine::{ByteRange, Mode, SessionId};

/// The prefix of the text form; it names the layout version of the claims.
const PREFIX: &str = "slt1";
/// Layout version byte at the head of the encoded claims.
const CLAIMS_VERSION: u8 = 1;
/// Longest resource name a token may carry (the engine's default limit is the same).
pub const RESOURCE_BYTES_MAX: usize = 4096;

/// The cluster secret. Its bytes never leave the servers; `Debug` does not print them.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; 32]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub token: u64,
    pub session: SessionId,
    pub mode: Mode,
    pub range: ByteRange,
    pub resource: String,
}

/// Claims with their MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedToken {
    pub claims: Claims,
    mac: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a stripelock token: expected `{PREFIX}.<claims>.<mac>` in hex")]
    Malformed,
    #[error("token layout version {0} is not supported by this stripelock")]
    Version(u8),
    #[error("token signature does not match: it was altered, or signed by another cluster")]
    BadMac,
    #[error("resource name of {0} bytes is too long for a token (at most {RESOURCE_BYTES_MAX})")]
    ResourceTooLong(usize),
}

impl ClusterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> ClusterKey {
        ClusterKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Signs claims. Fails only for a resource name longer than a token may carry.
    pub fn sign(&self, claims: Claims) -> Result<SignedToken, TokenError> {
        let bytes = encode_claims(&claims)?;
        let mac = *blake3::keyed_hash(&self.0, &bytes).as_bytes();
        Ok(SignedToken { claims, mac })
    }

    /// Checks a token's MAC (in constant time) and returns its claims.
    pub fn verify(&self, token: &SignedToken) -> Result<Claims, TokenError> {
        let bytes = encode_claims(&token.claims)?;
        // blake3::Hash's equality is constant-time.
        if blake3::keyed_hash(&self.0, &bytes) != blake3::Hash::from_bytes(token.mac) {
            return Err(TokenError::BadMac);
        }
        Ok(token.claims.clone())
    }
}

/// The claims as signed bytes: version, token, session, mode, start, end (big-endian), then the
/// resource name's length (u32) and bytes.
fn encode_claims(c: &Claims) -> Result<Vec<u8>, TokenError> {
    if c.resource.len() > RESOURCE_BYTES_MAX {
        return Err(TokenError::ResourceTooLong(c.resource.len()));
    }
    let mut b = Vec::with_capacity(38 + c.resource.len());
    b.push(CLAIMS_VERSION);
    b.extend_from_slice(&c.token.to_be_bytes());
    b.extend_from_slice(&c.session.0.to_be_bytes());
    b.push(c.mode as u8);
    b.extend_from_slice(&c.range.start.to_be_bytes());
    b.extend_from_slice(&c.range.end.to_be_bytes());
    b.extend_from_slice(&(c.resource.len() as u32).to_be_bytes());
    b.extend_from_slice(c.resource.as_bytes());
    Ok(b)
}

fn decode_claims(b: &[u8]) -> Result<Claims, TokenError> {
    let u64_at = |at: usize| -> Result<u64, TokenError> {
        b.get(at..at + 8).map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes"))).ok_or(TokenError::Malformed)
    };
    let version = *b.first().ok_or(TokenError::Malformed)?;
    if version != CLAIMS_VERSION {
        return Err(TokenError::Version(version));
    }
    let token = u64_at(1)?;
    let session = SessionId(u64_at(9)?);
    let mode = *Mode::ALL.get(*b.get(17).ok_or(TokenError::Malformed)? as usize).ok_or(TokenError::Malformed)?;
    let range = ByteRange::new(u64_at(18)?, u64_at(26)?).map_err(|_| TokenError::Malformed)?;
    let len = b.get(34..38).map(|s| u32::from_be_bytes(s.try_into().expect("4 bytes"))).ok_or(TokenError::Malformed)?;
    let len = len as usize;
    if len > RESOURCE_BYTES_MAX {
        return Err(TokenError::ResourceTooLong(len));
    }
    let name = b.get(38..38 + len).filter(|_| b.len() == 38 + len).ok_or(TokenError::Malformed)?;
    let resource = String::from_utf8(name.to_vec()).map_err(|_| TokenError::Malformed)?;
    Ok(Claims { token, session, mode, range, resource })
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn from_hex(s: &str) -> Result<Vec<u8>, TokenError> {
    if !s.len().is_multiple_of(2) {
        return Err(TokenError::Malformed);
    }
    let digit = |c: u8| (c as char).to_digit(16).ok_or(TokenError::Malformed);
    s.as_bytes().chunks(2).map(|p| Ok((digit(p[0])? * 16 + digit(p[1])?) as u8)).collect()
}

impl fmt::Display for SignedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let claims = encode_claims(&self.claims).map_err(|_| fmt::Error)?;
        write!(f, "{PREFIX}.{}.{}", to_hex(&claims), to_hex(&self.mac))
    }
}

impl std::str::FromStr for SignedToken {
    type Err = TokenError;

    /// Parses the text form. This does not check the MAC: only [`ClusterKey::verify`] does.
    fn from_str(s: &str) -> Result<SignedToken, TokenError> {
        let mut parts = s.trim().split('.');
        let (Some(PREFIX), Some(claims), Some(mac), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let claims = decode_claims(&from_hex(claims)?)?;
        let mac: [u8; 32] = from_hex(mac)?.try_into().map_err(|_| TokenError::Malformed)?;
        Ok(SignedToken { claims, mac })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claims() -> Claims {
        Claims {
            token: (7 << 40) + 3,
            session: SessionId(42),
            mode: Mode::PW,
            range: ByteRange::new(4096, 8192).unwrap(),
            resource: "/jobs/nightly".into(),
        }
    }

    #[test]
    fn round_trip_through_text() {
        let key = ClusterKey::from_bytes([9; 32]);
        let signed = key.sign(claims()).unwrap();
        let text = signed.to_string();
        assert!(text.starts_with("slt1."), "{text}");
        let parsed: SignedToken = text.parse().unwrap();
        assert_eq!(key.verify(&parsed).unwrap(), claims());
    }

    #[test]
    fn another_cluster_or_any_change_is_refused() {
        let key = ClusterKey::from_bytes([9; 32]);
        let signed = key.sign(claims()).unwrap();
        assert_eq!(ClusterKey::from_bytes([8; 32]).verify(&signed), Err(TokenError::BadMac));
        // Raising the number, widening the range, changing mode, session or resource: all caught.
        let edits: [fn(&mut Claims); 5] = [
            |c| c.token += 1,
            |c| c.range.end += 1,
            |c| c.mode = Mode::EX,
            |c| c.session = SessionId(43),
            |c| c.resource.push('x'),
        ];
        for edit in edits {
            let mut forged = signed.clone();
            edit(&mut forged.claims);
            let reparsed: SignedToken = forged.to_string().parse().unwrap();
            assert_eq!(key.verify(&reparsed), Err(TokenError::BadMac));
        }
    }

    #[test]
    fn malformed_text_is_refused() {
        let good = ClusterKey::from_bytes([1; 32]).sign(claims()).unwrap().to_string();
        for bad in [
            "",
            "slt1",
            "slt1..",
            "slt2.00.00",
            &good[..good.len() - 1],
            &format!("{good}.x"),
            &good.replace("slt1.01", "slt1.02"),
        ] {
            assert!(bad.parse::<SignedToken>().is_err(), "accepted {bad:?}");
        }
        assert_eq!(good.replace("slt1.01", "slt1.02").parse::<SignedToken>(), Err(TokenError::Version(2)));
    }

    proptest! {
        #[test]
        fn any_claims_round_trip(token: u64, session: u64, m in 0usize..6, start in 0u64..u64::MAX - 1, len in 1u64..1 << 40, resource in "[ -~]{0,64}") {
            let end = start.saturating_add(len).max(start + 1);
            let c = Claims { token, session: SessionId(session), mode: Mode::ALL[m], range: ByteRange::new(start, end).unwrap(), resource };
            let key = ClusterKey::from_bytes([3; 32]);
            let parsed: SignedToken = key.sign(c.clone()).unwrap().to_string().parse().unwrap();
            prop_assert_eq!(key.verify(&parsed).unwrap(), c);
        }
    }
}
