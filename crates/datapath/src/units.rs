//! Reading one stripe unit from the server that holds it, as the stripe planner sees it: a
//! unit read, missing, damaged, refused (a read without a lock of locked bytes) or unavailable.

use chunks::UnitId;
use layout::Role;
use layout::stripe::{self, StoredUnit, UnitRead as Fetched, role_name};
use lockservice::{FileMeta, Op};
use tonic::Status;
use wire::ErrorCode;
use wire::convert::{span_to_pb, unit_ref};
use wire::v1 as pb;

use crate::shared::Shared;

impl Shared {
    /// Stores `unit` as role `role` of `f`'s row `row` as it is given, version and covers
    /// included (a rebuild, resync, a recall from the tier), under `token` for `resource`.
    pub async fn restore_unit(
        &self,
        f: &FileMeta,
        row: u64,
        role: Role,
        unit: StoredUnit,
        token: &str,
        resource: &str,
    ) -> Result<(), Status> {
        let server = f.layout.server(row, role);
        let req = pb::RestoreUnitRequest {
            unit: Some(unit_ref(&UnitId { file: f.id, row, role })),
            resource: resource.to_string(),
            token: token.to_string(),
            data: unit.bytes.into(),
            version: unit.version,
            covers: unit.covers,
        };
        self.storage(server)?
            .restore_unit(req)
            .await
            .map(|_| ())
            .map_err(|e| wire::reword(&e, format!("row {row} {} on server {server}: {}", role_name(role), e.message())))
    }

    /// The roles of `f`'s row `row` that are stale: marked by a degraded write, or on a server
    /// whose volume came back empty and is not rebuilt yet (a mask of role indices).
    pub fn stale_roles(&self, f: &FileMeta, row: u64) -> u8 {
        let mut mask = self.locks.stale_mask(f.id, row);
        let wiped = self.locks.wiped();
        if !wiped.is_empty() {
            for (i, r) in f.layout.roles().enumerate() {
                if wiped.contains(&f.layout.server(row, r)) {
                    mask |= 1 << i;
                }
            }
        }
        mask
    }

    /// Marks `roles` of `f`'s row `row` stale in the namespace before a degraded write is
    /// acknowledged (issue 16): reads then rebuild them from parity until resync does. Refused
    /// if the row would have more stale units than its parity rebuilds.
    pub async fn mark_stale(&self, f: &FileMeta, path: &str, row: u64, roles: &[layout::Role]) -> Result<(), Status> {
        let l = &f.layout;
        let mask = roles.iter().fold(0u8, |m, r| m | 1 << stripe::role_index(l, *r));
        let known = self.stale_roles(f, row);
        let all = known | mask;
        if all.count_ones() > u32::from(l.parity()) {
            return Err(ErrorCode::Unavailable.status(format!(
                "row {row} of {path} has {} units on servers that are down or not yet resynced; its parity rebuilds \
                 at most {}: bring a server back",
                all.count_ones(),
                l.parity()
            )));
        }
        if mask & !known == 0 {
            return Ok(());
        }
        let reply = self
            .locks
            .propose(Op::MarkStale { id: f.id, rows: vec![(row, mask & !known)] })
            .await
            .map_err(|e| e.status())?;
        if let Some(e) = reply.error {
            return Err(e.status());
        }
        self.applied(reply.index).await;
        metrics::counter!("stripelock_degraded_units_total").increment(u64::from((mask & !known).count_ones()));
        Ok(())
    }

    /// One unit as its server has it.
    pub async fn fetch(&self, f: &FileMeta, row: u64, role: Role) -> Fetched {
        self.fetch_as(f, row, role, None).await
    }

    /// One unit, read for a reader without a lock on `unlocked` (a path) if given: its server
    /// then serves it only while the bytes it holds are free of write locks.
    pub async fn fetch_as(&self, f: &FileMeta, row: u64, role: Role, unlocked: Option<&str>) -> Fetched {
        let server = f.layout.server(row, role);
        let what = format!("row {row} {} on server {server}", role_name(role));
        // A unit a degraded write left behind is never read: parity rebuilds it (issue 16).
        if self.stale_roles(f, row) & (1 << stripe::role_index(&f.layout, role)) != 0 {
            return Fetched::Unavailable(format!(
                "{what}: marked stale (written while its server was down; resync rebuilds it)"
            ));
        }
        let mut client = match self.storage(server) {
            Ok(c) => c,
            Err(e) => return Fetched::Unavailable(format!("{what}: {}", e.message())),
        };
        let l = &f.layout;
        let bytes = match role {
            Role::Data(j) => {
                let start = row * l.row_bytes() + j as u64 * l.unit() as u64;
                start..start + l.unit() as u64
            }
            Role::P | Role::Q => row * l.row_bytes()..(row + 1) * l.row_bytes(),
        };
        let req = pb::ReadUnitRequest {
            unit: Some(unit_ref(&UnitId { file: f.id, row, role })),
            unlocked_path: unlocked.unwrap_or_default().to_string(),
            unlocked_range: unlocked.map(|_| span_to_pb(&bytes)),
        };
        match client.read_unit(req).await {
            Ok(r) => {
                let u = r.into_inner();
                if !u.found {
                    Fetched::Missing(format!("{what}: missing"))
                } else if u.data.len() > f.layout.unit() as usize {
                    Fetched::Damaged(format!("{what}: {} bytes, more than {}", u.data.len(), f.layout.unit()))
                } else {
                    // A short unit (the end of a file) holds zeros past its bytes.
                    let mut data = Vec::from(u.data);
                    data.resize(f.layout.unit() as usize, 0);
                    Fetched::Ok(StoredUnit { bytes: data, version: u.version, covers: u.covers })
                }
            }
            Err(e) if wire::code_of(&e) == Ok(ErrorCode::Corrupt) => {
                Fetched::Damaged(format!("{what}: {}", e.message()))
            }
            Err(e) if unlocked.is_some() && wire::code_of(&e) == Ok(ErrorCode::Busy) => {
                Fetched::Refused(format!("server {server}: {}", e.message()))
            }
            Err(e) => Fetched::Unavailable(format!("{what}: {}", e.message())),
        }
    }
}
