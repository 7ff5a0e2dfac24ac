//! Sizes as people write them.

use anyhow::{Context, Result, bail};

/// `512MiB`, `2GiB`, `4096`: a size in bytes, up to 2^64 - 1.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().with_context(|| format!("`{text}` is not a size (e.g. 65536, 64KiB, 1MiB, 2GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => bail!("unknown size unit `{other}` in `{text}`: use B, KiB, MiB or GiB"),
    };
    n.checked_mul(mult).with_context(|| format!("{text} is too large"))
}
