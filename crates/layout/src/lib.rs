//! Striped layouts: where each stripe unit of a file lives, and the parity that protects it.
//!
//! A file is cut into stripe units of `unit` bytes. A stripe *row* is `data` consecutive units
//! of the file plus `parity` units computed from them (0: none, 1: P = XOR, 2: P and Q over
//! GF(2^8) as Linux md's raid6 computes them). The row's `data + parity` units go to the
//! layout's servers, one each; the parity positions rotate by one server per row, so no server
//! holds every parity unit (RAID-5 "left-symmetric": row r puts P on position
//! `width - 1 - r mod width`, Q after it, data after that, wrapping around).
//!
//! Everything here is arithmetic on numbers and byte slices: no I/O, no clock.

pub mod parity;
pub mod stripe;

use std::collections::BTreeSet;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Smallest and largest stripe unit.
pub const UNIT_MIN: u32 = 512;
pub const UNIT_MAX: u32 = 64 << 20;
/// Most data units in a row.
pub const DATA_MAX: u8 = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("stripe unit {0} is not a power of two between 512 B and 64 MiB")]
    Unit(u32),
    #[error("{0} data units per row: give 1 to 32")]
    Data(u8),
    #[error("{0} parity units per row: give 0 (none), 1 (XOR) or 2 (P+Q)")]
    Parity(u8),
    #[error("a {data}+{parity} layout needs {} servers, and {given} were given", data + parity)]
    Servers { data: u8, parity: u8, given: usize },
    #[error("server {0} appears twice in the layout")]
    Duplicate(u64),
}

/// What a unit of a row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// The row's `j`th data unit.
    Data(u8),
    /// XOR of the row's data units.
    P,
    /// The RAID-6 syndrome: sum of g^j · data unit j over GF(2^8).
    Q,
}

/// A file's layout. Part of the replicated namespace; every server computes the same placement
/// from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    unit: u32,
    data: u8,
    parity: u8,
    /// The row's servers in position order.
    servers: Vec<u64>,
}

/// One stripe unit's share of a byte range of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub row: u64,
    /// Which data unit of the row.
    pub unit: u8,
    /// The bytes of that unit the range covers.
    pub within: (u32, u32),
    /// Where those bytes are in the file.
    pub file_offset: u64,
}

impl Layout {
    pub fn new(unit: u32, data: u8, parity: u8, servers: Vec<u64>) -> Result<Layout, LayoutError> {
        if !unit.is_power_of_two() || !(UNIT_MIN..=UNIT_MAX).contains(&unit) {
            return Err(LayoutError::Unit(unit));
        }
        if data == 0 || data > DATA_MAX {
            return Err(LayoutError::Data(data));
        }
        if parity > 2 {
            return Err(LayoutError::Parity(parity));
        }
        if servers.len() != (data + parity) as usize {
            return Err(LayoutError::Servers { data, parity, given: servers.len() });
        }
        let mut seen = BTreeSet::new();
        for s in &servers {
            if !seen.insert(*s) {
                return Err(LayoutError::Duplicate(*s));
            }
        }
        Ok(Layout { unit, data, parity, servers })
    }

    /// The default shape for a cluster of `n` servers: as much data per row as leaves one
    /// parity unit (two from six servers on), at most 8 data units.
    pub fn default_shape(n: usize) -> (u8, u8) {
        match n {
            0 | 1 => (1, 0),
            2..=5 => (n as u8 - 1, 1),
            _ => ((n - 2).min(8) as u8, 2),
        }
    }

    pub fn unit(&self) -> u32 {
        self.unit
    }

    pub fn data(&self) -> u8 {
        self.data
    }

    pub fn parity(&self) -> u8 {
        self.parity
    }

    pub fn servers(&self) -> &[u64] {
        &self.servers
    }

    /// Units per row.
    pub fn width(&self) -> usize {
        self.servers.len()
    }

    /// File bytes per row.
    pub fn row_bytes(&self) -> u64 {
        self.unit as u64 * self.data as u64
    }

    /// Rows a file of `size` bytes spans.
    pub fn rows(&self, size: u64) -> u64 {
        size.div_ceil(self.row_bytes())
    }

    /// The position (index into `servers`) of `role` in `row`.
    pub fn position(&self, row: u64, role: Role) -> usize {
        let width = self.width();
        if self.parity == 0 {
            let Role::Data(j) = role else { panic!("a layout without parity has no {role:?} unit") };
            return j as usize;
        }
        let p = width - 1 - (row % width as u64) as usize;
        let offset = match role {
            Role::P => 0,
            Role::Q => {
                assert!(self.parity == 2, "a layout with one parity unit has no Q");
                1
            }
            Role::Data(j) => self.parity as usize + j as usize,
        };
        (p + offset) % width
    }

    /// The server holding `role` of `row`.
    pub fn server(&self, row: u64, role: Role) -> u64 {
        self.servers[self.position(row, role)]
    }

    /// The role of the unit that server position `position` holds in `row`.
    pub fn role_at(&self, row: u64, position: usize) -> Role {
        let width = self.width();
        if self.parity == 0 {
            return Role::Data(position as u8);
        }
        let p = width - 1 - (row % width as u64) as usize;
        match (position + width - p) % width {
            0 => Role::P,
            1 if self.parity == 2 => Role::Q,
            k => Role::Data((k - self.parity as usize) as u8),
        }
    }

    /// Every role of a row, data first, then P and Q.
    pub fn roles(&self) -> impl Iterator<Item = Role> + '_ {
        let parity = [Role::P, Role::Q].into_iter().take(self.parity as usize);
        (0..self.data).map(Role::Data).chain(parity)
    }

    /// The stripe units a byte range of the file touches, in file order.
    pub fn pieces(&self, range: Range<u64>) -> impl Iterator<Item = Piece> + '_ {
        let unit = self.unit as u64;
        let mut at = range.start;
        std::iter::from_fn(move || {
            if at >= range.end {
                return None;
            }
            let index = at / unit;
            let start = at % unit;
            let end = (range.end - index * unit).min(unit);
            let piece = Piece {
                row: index / self.data as u64,
                unit: (index % self.data as u64) as u8,
                within: (start as u32, end as u32),
                file_offset: at,
            };
            at = index * unit + end;
            Some(piece)
        })
    }

    /// The servers whose units a write to `range` changes: the data units it covers and the
    /// parity units of their rows. (Seed 000: only these need to hear of a new lock on it.)
    pub fn servers_touching(&self, range: Range<u64>) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        if range.is_empty() {
            return out;
        }
        let rows = range.start / self.row_bytes()..(range.end - 1) / self.row_bytes() + 1;
        if rows.end - rows.start >= self.width() as u64 {
            // Parity has visited every server by then.
            return self.servers.iter().copied().collect();
        }
        for piece in self.pieces(range) {
            out.insert(self.server(piece.row, Role::Data(piece.unit)));
        }
        for row in rows {
            for role in [Role::P, Role::Q].into_iter().take(self.parity as usize) {
                out.insert(self.server(row, role));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_rotates_and_every_row_uses_every_server_once() {
        let l = Layout::new(4096, 4, 1, vec![10, 11, 12, 13, 14]).unwrap();
        let p: Vec<u64> = (0..5).map(|r| l.server(r, Role::P)).collect();
        assert_eq!(p, vec![14, 13, 12, 11, 10]);
        for row in 0..10 {
            let mut servers: Vec<u64> = l.roles().map(|r| l.server(row, r)).collect();
            servers.sort_unstable();
            assert_eq!(servers, vec![10, 11, 12, 13, 14]);
            for pos in 0..5 {
                assert_eq!(l.position(row, l.role_at(row, pos)), pos);
            }
        }
        let q = Layout::new(4096, 4, 2, (1..=6).collect()).unwrap();
        for row in 0..12 {
            assert_eq!(q.position(row, Role::Q), (q.position(row, Role::P) + 1) % 6);
            for pos in 0..6 {
                assert_eq!(q.position(row, q.role_at(row, pos)), pos);
            }
        }
    }

    #[test]
    fn pieces_cover_a_range_exactly() {
        let l = Layout::new(512, 3, 1, vec![1, 2, 3, 4]).unwrap();
        let pieces: Vec<Piece> = l.pieces(100..2000).collect();
        assert_eq!(pieces.first().unwrap().within, (100, 512));
        assert_eq!(pieces.first().unwrap().file_offset, 100);
        let covered: u64 = pieces.iter().map(|p| (p.within.1 - p.within.0) as u64).sum();
        assert_eq!(covered, 1900);
        // Unit 3 of the file is row 1's first data unit.
        assert!(pieces.iter().any(|p| p.row == 1 && p.unit == 0 && p.file_offset == 1536));
        assert_eq!(l.pieces(5..5).count(), 0);
    }

    #[test]
    fn a_small_write_touches_only_its_unit_and_that_rows_parity() {
        let l = Layout::new(4096, 4, 1, vec![1, 2, 3, 4, 5]).unwrap();
        let touched = l.servers_touching(0..100);
        assert_eq!(touched, [l.server(0, Role::Data(0)), l.server(0, Role::P)].into_iter().collect());
        assert_eq!(touched.len(), 2);
        assert_eq!(l.servers_touching(0..10 * l.row_bytes()).len(), 5);
    }

    #[test]
    fn bad_layouts_say_what_is_wrong() {
        assert_eq!(Layout::new(1000, 2, 1, vec![1, 2, 3]), Err(LayoutError::Unit(1000)));
        assert_eq!(Layout::new(4096, 0, 1, vec![1]), Err(LayoutError::Data(0)));
        assert_eq!(Layout::new(4096, 2, 3, vec![1, 2, 3, 4, 5]), Err(LayoutError::Parity(3)));
        let e = Layout::new(4096, 4, 1, vec![1, 2, 3]).unwrap_err();
        assert_eq!(e.to_string(), "a 4+1 layout needs 5 servers, and 3 were given");
        assert_eq!(Layout::new(4096, 2, 1, vec![1, 2, 1]), Err(LayoutError::Duplicate(1)));
        assert_eq!(Layout::default_shape(3), (2, 1));
        assert_eq!(Layout::default_shape(5), (4, 1));
        assert_eq!(Layout::default_shape(6), (4, 2));
    }
}
