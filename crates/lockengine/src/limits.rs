//! A named maximum for everything that could otherwise grow without bound.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Configurable limits. Past one, the request fails with [`crate::EngineError::Limit`] and
/// nothing else changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub sessions_max: u64,
    pub locks_per_session_max: u64,
    pub waiters_per_resource_max: u64,
    pub ranges_per_owner_max: u64,
    pub resources_max: u64,
    pub value_block_bytes_max: usize,
    pub resource_name_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            sessions_max: 65_536,
            locks_per_session_max: 65_536,
            waiters_per_resource_max: 4_096,
            ranges_per_owner_max: 4_096,
            resources_max: 1 << 20,
            value_block_bytes_max: 64,
            resource_name_bytes_max: 4_096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitKind {
    Sessions,
    LocksPerSession,
    WaitersPerResource,
    RangesPerOwner,
    Resources,
}

impl LimitKind {
    pub(crate) fn advice(self) -> &'static str {
        match self {
            LimitKind::Sessions => "close idle sessions or raise sessions_max",
            LimitKind::LocksPerSession => "release locks or raise locks_per_session_max",
            LimitKind::WaitersPerResource => "retry later or raise waiters_per_resource_max",
            LimitKind::RangesPerOwner => "unlock or merge ranges, or raise ranges_per_owner_max",
            LimitKind::Resources => "release locks or raise resources_max",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitKind::Sessions => "sessions",
            LimitKind::LocksPerSession => "locks per session",
            LimitKind::WaitersPerResource => "waiters per resource",
            LimitKind::RangesPerOwner => "ranges per POSIX owner",
            LimitKind::Resources => "resources",
        })
    }
}
