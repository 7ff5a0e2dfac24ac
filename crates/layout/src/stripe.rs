//! A stripe row's reads and writes, decided without I/O: which units a write changes, their new
//! bytes, versions and parity (updated from the change when the row's parity is current,
//! recomputed from all its data otherwise), and a row's data rebuilt from what its servers
//! returned. The runtime fetches the units, calls these, and stores what they return.
//!
//! Versions: every stored unit has a version its store bumps on each accepted write. A parity
//! unit also records `covers`, the version of each data unit of the row it was computed from,
//! so a parity that missed a write (a crash between the data and the parity writes: a write
//! hole) is never used to rebuild, and the next write of the row recomputes it. The row's
//! *stripe version* (kept by the caller, in the row lock's value block) is the parity's version
//! after the last complete write: a write that finds it equal to the parity's version, and
//! every data unit it changes at the version the parity covers, may update parity from the
//! change alone.

use crate::{Layout, Role, parity};

/// A unit as its store returned it; `bytes` padded with zeros to the unit size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredUnit {
    pub bytes: Vec<u8>,
    pub version: u64,
    /// For a parity unit: the data versions it was computed from. Empty for data.
    pub covers: Vec<u64>,
}

/// What reading one unit gave. The texts say which unit and why, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitRead {
    Ok(StoredUnit),
    /// Its server did not answer: not known to be bad.
    Unavailable(String),
    /// Its server has no such unit.
    Missing(String),
    /// Its record failed its checks.
    Damaged(String),
    /// Read without a lock, and its server refused: the bytes are locked for writing.
    Refused(String),
}

impl UnitRead {
    fn version(&self) -> Option<u64> {
        if let UnitRead::Ok(u) = self { Some(u.version) } else { None }
    }

    fn why(&self) -> Option<&str> {
        match self {
            UnitRead::Ok(_) => None,
            UnitRead::Unavailable(w) | UnitRead::Missing(w) | UnitRead::Damaged(w) | UnitRead::Refused(w) => Some(w),
        }
    }
}

/// A unit's role in words, for messages (never the enum's Rust name, `Data(3)`).
pub fn role_name(r: Role) -> String {
    match r {
        Role::Data(j) => format!("data unit {j}"),
        Role::P => "parity P".into(),
        Role::Q => "parity Q".into(),
    }
}

/// Where `role` comes in a row's units in role order (data, P, Q).
pub fn role_index(l: &Layout, role: Role) -> usize {
    match role {
        Role::Data(j) => j as usize,
        Role::P => l.data() as usize,
        Role::Q => l.data() as usize + 1,
    }
}

/// Whether a row's units (all of them, role order) show a hole: a row no write ever reached,
/// which reads as zeros. A written row has all its units, so with at most `m` servers not
/// answering, some unit would be found; here none is.
pub fn is_hole(l: &Layout, units: &[UnitRead]) -> bool {
    let unavailable = units.iter().filter(|u| matches!(u, UnitRead::Unavailable(_))).count();
    unavailable <= l.parity() as usize
        && units.iter().all(|u| matches!(u, UnitRead::Missing(_) | UnitRead::Unavailable(_)))
}

/// How many of row `row`'s data units start before byte `size` (the rest are wholly past the
/// end of the file).
pub fn units_in_file(l: &Layout, row: u64, size: u64) -> usize {
    let start = row * l.row_bytes();
    (size.saturating_sub(start).div_ceil(l.unit() as u64)).min(l.data() as u64) as usize
}

/// A row's data units and their versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Solved {
    pub data: Vec<Vec<u8>>,
    pub versions: Vec<u64>,
    /// Data units never written (not stored: zeros), which nothing needs to rebuild.
    pub absent: Vec<bool>,
}

impl Solved {
    /// The row's parity units as they should be, P then Q.
    pub fn parity(&self, l: &Layout) -> Vec<StoredUnit> {
        let unit = l.unit() as usize;
        let refs: Vec<&[u8]> = self.data.iter().map(Vec::as_slice).collect();
        let (mut p, mut q) = (vec![0u8; unit], vec![0u8; unit]);
        parity::encode(&refs, Some(&mut p), (l.parity() == 2).then_some(&mut q[..]));
        let version = self.versions.iter().copied().max().unwrap_or(0);
        [p, q]
            .into_iter()
            .take(l.parity() as usize)
            .map(|bytes| StoredUnit { bytes, version, covers: self.versions.clone() })
            .collect()
    }
}

/// Why a row's data cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SolveError {
    /// More units are lost (unreadable, missing, or parity of other versions) than the row's
    /// parity rebuilds. `damaged`: some of them are known bad, not merely on servers that did
    /// not answer (then the row may be read once they are back).
    #[error("{}; its parity rebuilds at most {parity} lost unit(s)", .problems.join("; "))]
    TooManyLost { problems: Vec<String>, parity: u8, damaged: bool },
    #[error("the row's units do not fit its layout: {0}")]
    Parity(#[from] parity::ParityError),
}

/// The data of a row from its units (role order, all of them), rebuilding lost data units from
/// parity. A parity unit is used only if it was computed from the versions the data units it
/// did not lose are at; otherwise the row had an interrupted write and that parity would
/// rebuild wrong bytes. A data unit that cannot be read is zeros, not lost, when such a parity
/// says it was never written (version 0), or when it is missing, wholly past the end of the
/// file (`in_file` data units start before it) and no parity says it was written.
pub fn solve_row(l: &Layout, units: &[UnitRead], in_file: usize) -> Result<Solved, SolveError> {
    let k = l.data() as usize;
    let unit = l.unit() as usize;
    let versions: Vec<Option<u64>> = units[..k].iter().map(UnitRead::version).collect();
    let consistent =
        |u: &StoredUnit| u.covers.len() == k && versions.iter().zip(&u.covers).all(|(v, c)| v.is_none_or(|v| v == *c));
    let covers: Option<Vec<u64>> = units[k..].iter().find_map(|u| match u {
        UnitRead::Ok(u) if consistent(u) => Some(u.covers.clone()),
        _ => None,
    });
    let absent: Vec<bool> = (0..k)
        .map(|j| {
            !matches!(units[j], UnitRead::Ok(_))
                && match &covers {
                    Some(c) => c[j] == 0,
                    None => j >= in_file && matches!(units[j], UnitRead::Missing(_)),
                }
        })
        .collect();
    let mut bytes: Vec<Vec<u8>> = Vec::with_capacity(l.width());
    let mut lost = Vec::new();
    let mut problems = Vec::new();
    let mut damaged = false;
    for (i, u) in units.iter().enumerate() {
        match u {
            UnitRead::Ok(u) if i < k => bytes.push(u.bytes.clone()),
            _ if i < k && absent[i] => bytes.push(vec![0; unit]),
            UnitRead::Ok(u) if consistent(u) => bytes.push(u.bytes.clone()),
            other => {
                damaged |= matches!(other, UnitRead::Ok(_) | UnitRead::Damaged(_) | UnitRead::Missing(_));
                if let UnitRead::Ok(u) = other {
                    let now: Vec<String> =
                        versions.iter().map(|v| v.map_or_else(|| "unknown".to_string(), |v| v.to_string())).collect();
                    problems.push(format!(
                        "{} was computed from data versions {:?}, the data is at versions [{}]",
                        role_name(l.roles().nth(i).expect("in the row")),
                        u.covers,
                        now.join(", ")
                    ));
                } else if let Some(why) = other.why() {
                    problems.push(why.to_string());
                }
                bytes.push(vec![0; unit]);
                lost.push(i);
            }
        }
    }
    if lost.len() > l.parity() as usize {
        return Err(SolveError::TooManyLost { problems, parity: l.parity(), damaged });
    }
    let mut refs: Vec<&mut [u8]> = bytes.iter_mut().map(Vec::as_mut_slice).collect();
    parity::reconstruct(&mut refs, &lost, k, l.parity() as usize)?;
    let versions = versions
        .iter()
        .enumerate()
        .map(|(j, v)| if absent[j] { Some(0) } else { *v }.or_else(|| covers.as_ref().map(|c| c[j])).unwrap_or(1))
        .collect();
    bytes.truncate(k);
    Ok(Solved { data: bytes, versions, absent })
}

/// A write of `data` at byte `lo` of a row (row-relative; it ends inside the row).
#[derive(Debug, Clone, Copy)]
pub struct RowWrite<'a> {
    pub lo: u64,
    pub data: &'a [u8],
}

impl RowWrite<'_> {
    /// The data units it changes, by index.
    pub fn touched(&self, l: &Layout) -> Vec<usize> {
        let unit = l.unit() as u64;
        let hi = self.lo + self.data.len().max(1) as u64;
        ((self.lo / unit) as usize..=((hi - 1) / unit) as usize).collect()
    }

    /// Data unit `j`'s bytes after the write, where it was zeros before.
    fn unit_bytes(&self, l: &Layout, j: usize) -> Vec<u8> {
        let unit = l.unit() as u64;
        let (u0, u1) = (j as u64 * unit, (j as u64 + 1) * unit);
        let hi = self.lo + self.data.len() as u64;
        if self.lo <= u0 && u1 <= hi {
            return self.data[(u0 - self.lo) as usize..(u1 - self.lo) as usize].to_vec();
        }
        let mut new = vec![0; unit as usize];
        let (a, b) = (self.lo.max(u0), hi.min(u1));
        if a < b {
            new[(a - u0) as usize..(b - u0) as usize]
                .copy_from_slice(&self.data[(a - self.lo) as usize..(b - self.lo) as usize]);
        }
        new
    }

    /// Data unit `j`'s bytes after the write, from its bytes before.
    fn splice(&self, l: &Layout, j: usize, old: &[u8]) -> Vec<u8> {
        let unit = l.unit() as u64;
        let hi = self.lo + self.data.len() as u64;
        let mut new = old.to_vec();
        let (u0, u1) = (j as u64 * unit, (j as u64 + 1) * unit);
        let (a, b) = (self.lo.max(u0), hi.min(u1));
        if a < b {
            new[(a - u0) as usize..(b - u0) as usize]
                .copy_from_slice(&self.data[(a - self.lo) as usize..(b - self.lo) as usize]);
        }
        new
    }
}

/// One unit to store: its new bytes, its covers (parity), and the version it must be at now
/// (`None`: no expectation, it may not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitWrite {
    pub role: Role,
    pub bytes: Vec<u8>,
    pub covers: Vec<u64>,
    pub expect: Option<u64>,
}

/// A whole row stored from `data` (its bytes from the row's start, at most a row, the last row
/// of a file shorter), as a put stores it: the data units that hold any of it, each as long as
/// the first (the others padded with zeros), and parity over those, every unit at version 1,
/// parity covering version 1 of each stored data unit and 0 (never written: zeros) of the rest.
/// Each unit expects to be absent (`expect: Some(0)`).
pub fn encode_row(l: &Layout, data: &[u8]) -> Vec<UnitWrite> {
    let k = l.data() as usize;
    let stored: Vec<&[u8]> = data.chunks(l.unit() as usize).collect();
    let longest = stored.first().map_or(0, |u| u.len());
    let padded: Vec<Vec<u8>> = (0..k)
        .map(|j| {
            let mut u = stored.get(j).map_or_else(Vec::new, |u| u.to_vec());
            u.resize(longest, 0);
            u
        })
        .collect();
    let units: Vec<&[u8]> = padded.iter().map(Vec::as_slice).collect();
    let mut p = vec![0u8; if l.parity() >= 1 { longest } else { 0 }];
    let mut q = vec![0u8; if l.parity() == 2 { longest } else { 0 }];
    parity::encode(&units, (l.parity() >= 1).then_some(&mut p[..]), (l.parity() == 2).then_some(&mut q[..]));
    let covers: Vec<u64> = (0..k).map(|j| u64::from(j < stored.len())).collect();
    let mut out = Vec::with_capacity(stored.len() + l.parity() as usize);
    for role in l.roles() {
        let (bytes, covers) = match role {
            Role::Data(j) if j as usize >= stored.len() => continue,
            Role::Data(j) => (stored[j as usize].to_vec(), Vec::new()),
            Role::P => (std::mem::take(&mut p), covers.clone()),
            Role::Q => (std::mem::take(&mut q), covers.clone()),
        };
        out.push(UnitWrite { role, bytes, covers, expect: Some(0) });
    }
    out
}

/// What a row's write stores: the data units first, then the parity (so a crash in between
/// leaves parity that does not cover the data), and the row's stripe version after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub data: Vec<UnitWrite>,
    pub parity: Vec<UnitWrite>,
    pub version: u64,
    /// Parity recomputed from all the row's data, not updated from the change.
    pub recomputed: bool,
    /// Units not written because their servers did not answer (a degraded write): the caller
    /// marks them stale before storing the plan, and reads rebuild them from parity.
    pub skipped: Vec<Role>,
}

/// The write of a row that does not exist yet (past the end of the file, `stripe` unknown or
/// 0), planned without reading it: its data units are the write's bytes with zeros around them,
/// parity is computed from those, and every unit goes to version 1 expecting to be absent
/// (version 0). Should a unit exist after all (a write that failed part-way, bytes left past a
/// truncation), storage refuses it with a version mismatch: then read the row and plan again
/// with [`plan_update`] / [`plan_recompute`]. `None` when the row is known to have been written.
pub fn plan_new_row(l: &Layout, w: &RowWrite, stripe: Option<u64>) -> Option<Plan> {
    if stripe.unwrap_or(0) != 0 {
        return None;
    }
    let (k, m) = (l.data() as usize, l.parity() as usize);
    let bytes: Vec<Vec<u8>> = (0..k).map(|j| w.unit_bytes(l, j)).collect();
    let versions = vec![1; k];
    let mut parity = Vec::new();
    if m > 0 {
        let unit = l.unit() as usize;
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let (mut p, mut q) = (vec![0u8; unit], vec![0u8; unit]);
        parity::encode(&refs, Some(&mut p), (m == 2).then_some(&mut q[..]));
        for (role, b) in l.roles().skip(k).zip([p, q]) {
            parity.push(UnitWrite { role, bytes: b, covers: versions.clone(), expect: Some(0) });
        }
    }
    let data = bytes
        .into_iter()
        .enumerate()
        .map(|(j, bytes)| UnitWrite { role: Role::Data(j as u8), bytes, covers: Vec::new(), expect: Some(0) })
        .collect();
    Some(Plan { data, parity, version: 1, recomputed: m > 0, skipped: Vec::new() })
}

/// A unit a row that does not exist yet is missing reads as zeros at version 0 (covering
/// zeros, for parity); everything else stays as read.
pub fn fresh(l: &Layout, u: UnitRead, role: Role, existing: bool) -> UnitRead {
    match u {
        UnitRead::Missing(_) if !existing => UnitRead::Ok(StoredUnit {
            bytes: vec![0; l.unit() as usize],
            version: 0,
            covers: if matches!(role, Role::Data(_)) { Vec::new() } else { vec![0; l.data() as usize] },
        }),
        u => u,
    }
}

/// The roles a write reads first: the data units it changes, then the parity units.
pub fn update_roles(l: &Layout, w: &RowWrite) -> Vec<Role> {
    let k = l.data() as usize;
    w.touched(l).iter().map(|&j| Role::Data(j as u8)).chain(l.roles().skip(k)).collect()
}

/// The write by parity update, when the row allows it: `read` holds the units of
/// [`update_roles`] (after [`fresh`]), `stripe` the row's stripe version if known. `None`
/// when the row does not exist yet (its first write stores every data unit, so the row is
/// whole even without parity), a unit could not be read, or the parity is not current: then
/// read the whole row and call [`plan_recompute`].
pub fn plan_update(l: &Layout, w: &RowWrite, read: &[UnitRead], stripe: Option<u64>, existing: bool) -> Option<Plan> {
    let (k, m) = (l.data() as usize, l.parity() as usize);
    let touched = w.touched(l);
    let t = touched.len();
    let ok: Vec<&StoredUnit> =
        read.iter().filter_map(|u| if let UnitRead::Ok(u) = u { Some(u) } else { None }).collect();
    if !existing || ok.len() != read.len() || read.len() != t + m {
        return None;
    }
    if m > 0 {
        let p = ok[t];
        let current = stripe == Some(p.version)
            && ok[t..].iter().all(|u| u.version == p.version && u.covers.len() == k && u.covers == p.covers)
            && touched.iter().enumerate().all(|(i, &j)| ok[i].version == p.covers[j]);
        if !current {
            return None;
        }
    }
    let mut parity: Vec<Vec<u8>> = ok[t..].iter().map(|u| u.bytes.clone()).collect();
    let mut covers = if m > 0 { ok[t].covers.clone() } else { Vec::new() };
    let mut data = Vec::with_capacity(t);
    for (i, &j) in touched.iter().enumerate() {
        let new = w.splice(l, j, &ok[i].bytes);
        let (p, q) = match parity.as_mut_slice() {
            [p] => (Some(&mut p[..]), None),
            [p, q] => (Some(&mut p[..]), Some(&mut q[..])),
            _ => (None, None),
        };
        parity::update(j, &ok[i].bytes, &new, p, q);
        if m > 0 {
            covers[j] = ok[i].version + 1;
        }
        data.push(UnitWrite { role: Role::Data(j as u8), bytes: new, covers: Vec::new(), expect: Some(ok[i].version) });
    }
    let version = if m > 0 { ok[t].version + 1 } else { stripe.unwrap_or(0) + 1 };
    let parity = l
        .roles()
        .skip(k)
        .zip(parity)
        .map(|(role, bytes)| UnitWrite { role, bytes, covers: covers.clone(), expect: Some(version - 1) })
        .collect();
    Some(Plan { data, parity, version, recomputed: false, skipped: Vec::new() })
}

/// Why a row cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A unit the write changes (a data unit it touches, or parity) did not answer.
    #[error("unit {} is unreachable ({why})", role_name(*role))]
    Unreachable { role: Role, why: String },
    /// The row's data cannot be read to recompute its parity.
    #[error(transparent)]
    Unreadable(#[from] SolveError),
}

/// The write by recomputing parity from all the row's data: `all` holds every unit of the row
/// in role order, as read (this applies [`fresh`] itself); `existing` says whether the row is
/// inside the file, `in_file` how many of its data units start before the file's end.
pub fn plan_recompute(
    l: &Layout,
    w: &RowWrite,
    all: Vec<UnitRead>,
    stripe: Option<u64>,
    existing: bool,
    in_file: usize,
) -> Result<Plan, PlanError> {
    plan_whole_row(l, w, all, stripe, existing, in_file, None)
}

/// [`plan_recompute`] with servers down (issue 16): a unit that did not answer (or is marked
/// stale, which the caller reads as not answering) is not written but listed in
/// [`Plan::skipped`]; the rest of the row, parity included, is written as if it had been, so
/// that parity rebuilds the skipped units' new bytes. Possible while no more units are lost
/// than the row's parity rebuilds. A touched data unit that cannot be read is rebuilt from a
/// parity consistent with the units read if the stripe version says it is current, or if
/// `trust_parity`: the caller knows no parity of the row was left behind by a failed write
/// (it marks such parity stale, and a stale unit reads as not answering).
pub fn plan_degraded(
    l: &Layout,
    w: &RowWrite,
    all: Vec<UnitRead>,
    stripe: Option<u64>,
    existing: bool,
    in_file: usize,
    trust_parity: bool,
) -> Result<Plan, PlanError> {
    plan_whole_row(l, w, all, stripe, existing, in_file, Some(trust_parity))
}

fn plan_whole_row(
    l: &Layout,
    w: &RowWrite,
    all: Vec<UnitRead>,
    stripe: Option<u64>,
    existing: bool,
    in_file: usize,
    degraded: Option<bool>,
) -> Result<Plan, PlanError> {
    let (trust_parity, degraded) = (degraded == Some(true), degraded.is_some());
    let (k, m) = (l.data() as usize, l.parity() as usize);
    let touched = w.touched(l);
    let existing = existing && !is_hole(l, &all);
    let all: Vec<UnitRead> = all.into_iter().zip(l.roles()).map(|(u, r)| fresh(l, u, r, existing)).collect();
    if let Some((i, UnitRead::Unavailable(why))) =
        all.iter().enumerate().find(|(i, u)| matches!(u, UnitRead::Unavailable(_)) && (*i >= k || touched.contains(i)))
        && !degraded
    {
        return Err(PlanError::Unreachable { role: l.roles().nth(i).expect("in the row"), why: why.clone() });
    }
    let down = |i: usize| degraded && matches!(all[i], UnitRead::Unavailable(_));
    let solved = solve_row(l, &all, in_file)?;
    // A touched data unit that could not be read is rebuilt from parity and then written over
    // without a version to expect. That is right only if parity is known current: its version
    // is the row's stripe version. Parity left behind by an interrupted write (of that very
    // unit, say) would rebuild old bytes, and the write would store them around its own.
    let parity_current =
        trust_parity || all[k..].iter().filter_map(UnitRead::version).max().is_some_and(|v| stripe == Some(v));
    if let Some(&j) = touched.iter().find(|&&j| !matches!(all[j], UnitRead::Ok(_)) && !solved.absent[j])
        && !parity_current
    {
        return Err(PlanError::Unreachable {
            role: Role::Data(j as u8),
            why: format!(
                "it could not be read ({}) and the row's parity is not known to be current, so it cannot be \
                 rebuilt to write around",
                all[j].why().unwrap_or("unknown")
            ),
        });
    }
    let mut bytes = solved.data;
    let mut versions = solved.versions;
    let mut data = Vec::new();
    let mut skipped = Vec::new();
    for j in 0..k {
        let old = all[j].version();
        // A unit of a new row is written even where the write does not touch it (zeros), so
        // the row is whole; one whose server is down is marked stale like any skipped unit, so
        // it is never taken for a unit past the end of the file.
        let new_row_unit = !existing && (old == Some(0) || down(j));
        if !touched.contains(&j) && !new_row_unit {
            continue;
        }
        if touched.contains(&j) {
            bytes[j] = w.splice(l, j, &bytes[j]);
        }
        versions[j] = old.unwrap_or(versions[j]) + 1;
        if down(j) {
            skipped.push(Role::Data(j as u8));
            continue;
        }
        data.push(UnitWrite { role: Role::Data(j as u8), bytes: bytes[j].clone(), covers: Vec::new(), expect: old });
    }
    let parity_version = all[k..].iter().filter_map(UnitRead::version).max().unwrap_or(0);
    let version = stripe.unwrap_or(0).max(parity_version) + 1;
    let mut parity = Vec::new();
    if m > 0 {
        let unit = l.unit() as usize;
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        let (mut p, mut q) = (vec![0u8; unit], vec![0u8; unit]);
        parity::encode(&refs, Some(&mut p), (m == 2).then_some(&mut q[..]));
        for (i, (role, b)) in l.roles().skip(k).zip([p, q]).enumerate() {
            if down(k + i) {
                skipped.push(role);
                continue;
            }
            parity.push(UnitWrite { role, bytes: b, covers: versions.clone(), expect: all[k + i].version() });
        }
    }
    Ok(Plan { data, parity, version, recomputed: m > 0, skipped })
}
