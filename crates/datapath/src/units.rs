//! Reading one stripe unit from the server that holds it, as the stripe planner sees it: a
//! unit read, missing, damaged, refused (a read without a lock of locked bytes) or unavailable.

use chunks::UnitId;
use layout::Role;
use layout::stripe::{StoredUnit, UnitRead as Fetched, role_name};
use lockservice::FileMeta;
use wire::ErrorCode;
use wire::convert::{span_to_pb, unit_ref};
use wire::v1 as pb;

use crate::shared::Shared;

impl Shared {
    /// One unit as its server has it.
    pub async fn fetch(&self, f: &FileMeta, row: u64, role: Role) -> Fetched {
        self.fetch_as(f, row, role, None).await
    }

    /// One unit, read for a reader without a lock on `unlocked` (a path) if given: its server
    /// then serves it only while the bytes it holds are free of write locks.
    pub async fn fetch_as(&self, f: &FileMeta, row: u64, role: Role, unlocked: Option<&str>) -> Fetched {
        let server = f.layout.server(row, role);
        let what = format!("row {row} {} on server {server}", role_name(role));
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
