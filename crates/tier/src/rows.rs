//! Row checksums of a tier object: the crc32c of each row of the layout the file had, written
//! beside the object (`KEY.rows`) when it is migrated. The stub's blake3 covers the whole object,
//! so it can check only a read of all of it; a row fetched alone (a write to a stub, `recall
//! --range`) is checked against its own crc32c before it is striped again, where parity would
//! otherwise be computed over a damaged row and make it look whole.
//!
//! The format (docs/formats.md): a 24-byte head (`SLRS`, version 1, three zero bytes, the row
//! size and the number of rows, both u64 little-endian), then one u32 little-endian crc32c per
//! row, the last row cut at the object's end.

use std::fmt;

/// The row sums' object beside object `key`.
pub fn sums_key(key: &str) -> String {
    format!("{key}{SUFFIX}")
}

/// The object whose row sums `key` holds, if `key` names row sums.
pub fn object_of_sums(key: &str) -> Option<&str> {
    key.strip_suffix(SUFFIX)
}

const SUFFIX: &str = ".rows";
const MAGIC: &[u8; 4] = b"SLRS";
const VERSION: u8 = 1;
/// Bytes before the first row's sum.
pub const HEAD_BYTES: u64 = 24;

/// The crc32c of each `row_bytes` of a stream of bytes, fed in pieces of any size.
#[derive(Debug, Clone)]
pub struct RowSums {
    row_bytes: u64,
    in_row: u64,
    crc: u32,
    sums: Vec<u32>,
}

impl RowSums {
    /// `row_bytes` is at least 1.
    pub fn new(row_bytes: u64) -> RowSums {
        RowSums { row_bytes: row_bytes.max(1), in_row: 0, crc: 0, sums: Vec::new() }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = (self.row_bytes - self.in_row).min(bytes.len() as u64) as usize;
            self.crc = crc32c::crc32c_append(self.crc, &bytes[..take]);
            self.in_row += take as u64;
            if self.in_row == self.row_bytes {
                self.sums.push(self.crc);
                (self.crc, self.in_row) = (0, 0);
            }
            bytes = &bytes[take..];
        }
    }

    /// One sum per row, the last row's over the bytes it got.
    pub fn finish(mut self) -> Vec<u32> {
        if self.in_row > 0 {
            self.sums.push(self.crc);
        }
        self.sums
    }

    pub fn row_bytes(&self) -> u64 {
        self.row_bytes
    }
}

/// The row sums' object: its head, then the sums.
pub fn encode(row_bytes: u64, sums: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD_BYTES as usize + 4 * sums.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(&row_bytes.to_le_bytes());
    out.extend_from_slice(&(sums.len() as u64).to_le_bytes());
    for s in sums {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// What a row sums' head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub row_bytes: u64,
    pub rows: u64,
}

/// Why a row sums' object cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadSums {
    Short(usize),
    Magic,
    Version(u8),
    RowBytes { found: u64, expected: u64 },
    Rows { found: u64, needed: u64 },
}

impl fmt::Display for BadSums {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadSums::Short(n) => write!(f, "{n} bytes, shorter than its {HEAD_BYTES}-byte head"),
            BadSums::Magic => write!(f, "it does not start with SLRS"),
            BadSums::Version(v) => write!(f, "it has version {v}; this stripelock reads version {VERSION}"),
            BadSums::RowBytes { found, expected } => {
                write!(f, "its rows are {found} bytes; the stub's layout has rows of {expected}")
            }
            BadSums::Rows { found, needed } => write!(f, "it has {found} rows' sums; the object has {needed} rows"),
        }
    }
}

/// Reads a row sums' head, checking it describes rows of `row_bytes` and at least `rows` of them.
pub fn decode_head(bytes: &[u8], row_bytes: u64, rows: u64) -> Result<Head, BadSums> {
    if bytes.len() < HEAD_BYTES as usize {
        return Err(BadSums::Short(bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return Err(BadSums::Magic);
    }
    if bytes[4] != VERSION {
        return Err(BadSums::Version(bytes[4]));
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let head = Head { row_bytes: u64_at(8), rows: u64_at(16) };
    if head.row_bytes != row_bytes {
        return Err(BadSums::RowBytes { found: head.row_bytes, expected: row_bytes });
    }
    if head.rows < rows {
        return Err(BadSums::Rows { found: head.rows, needed: rows });
    }
    Ok(head)
}

/// The sums in `bytes` (4 each, little-endian).
pub fn decode_sums(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// However the bytes come in pieces, each row's sum is the crc32c of that row.
        #[test]
        fn sums_are_each_rows_crc_whatever_the_pieces(
            len in 0usize..5000,
            row_bytes in 1u64..700,
            cuts in proptest::collection::vec(0usize..5000, 0..8),
        ) {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(len)).collect();
            cuts.push(0);
            cuts.push(len);
            cuts.sort_unstable();
            let mut sums = RowSums::new(row_bytes);
            for w in cuts.windows(2) {
                sums.update(&data[w[0]..w[1]]);
            }
            let want: Vec<u32> = data.chunks(row_bytes as usize).map(crc32c::crc32c).collect();
            prop_assert_eq!(sums.finish(), want);
        }
    }

    #[test]
    fn the_head_is_checked_against_the_stub() {
        let bytes = encode(1 << 20, &[1, 2, 3]);
        assert_eq!(bytes.len(), HEAD_BYTES as usize + 12);
        assert_eq!(decode_head(&bytes, 1 << 20, 3), Ok(Head { row_bytes: 1 << 20, rows: 3 }));
        assert_eq!(decode_sums(&bytes[HEAD_BYTES as usize..]), [1, 2, 3]);
        assert_eq!(decode_head(&bytes, 2 << 20, 3), Err(BadSums::RowBytes { found: 1 << 20, expected: 2 << 20 }));
        assert_eq!(decode_head(&bytes, 1 << 20, 4), Err(BadSums::Rows { found: 3, needed: 4 }));
        assert_eq!(decode_head(&bytes[..10], 1 << 20, 3), Err(BadSums::Short(10)));
        let mut other = bytes.clone();
        other[4] = 9;
        assert_eq!(decode_head(&other, 1 << 20, 3), Err(BadSums::Version(9)));
        other[0] = b'X';
        assert_eq!(decode_head(&other, 1 << 20, 3), Err(BadSums::Magic));
        assert_eq!(object_of_sums(&sums_key("files/a/b")), Some("files/a/b"));
        assert_eq!(object_of_sums("files/a/b"), None);
    }
}
