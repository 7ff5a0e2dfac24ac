//! Issue 16: the segment chunk store under kill -9. `stripelock bench chunk-crash` kills a
//! writer that overwrites units from four threads at random moments, 50 times; after each kill
//! every unit must read back whole at its last acknowledged version (or the put the kill cut
//! short), with that version's bytes. Bounded: 50 kills or 90 s.

use std::process::Command;

fn exe() -> String {
    std::env::var("STRIPELOCK_EXE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_stripelock").to_string())
}

#[test]
fn every_unit_reads_back_as_acknowledged_after_each_of_50_kills() {
    let dir = std::env::temp_dir().join(format!("stripelock-chunk-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(exe())
        .args(["bench", "chunk-crash", "--kills", "50", "--seconds", "90", "--seed", "16", "--json", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report["violations"], serde_json::json!([]), "{stdout}");
    assert!(out.status.success(), "{stdout}");
    assert_eq!(report["kills"], 50, "{stdout}");
    // Each kill lands after puts were acknowledged, and every unit of every kill was checked.
    assert!(report["acknowledged_puts"].as_u64().unwrap() >= 50, "{stdout}");
    assert_eq!(report["units_checked"], 50 * 64, "{stdout}");
    assert!(!dir.exists(), "the campaign removes its volume");
}
