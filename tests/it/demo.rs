//! `loyalty-cdc demo --duration 20s`, the real binary on the local
//! databases: generated customers shop in store and online, the ledger
//! books them, and the local receiver verifies the delivered triggers.

use regex::Regex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(crate::support::binary())
        .args([
            "demo",
            "--duration",
            "20s",
            "--listen",
            "127.0.0.1:0",
            "--dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run loyalty-cdc demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    {
        use std::io::Write as _;
        let _ = crate::support::log_file("demo").write_all(&output.stderr);
    }
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let done = Regex::new(
        r"== done: (\d+) orders and (\d+) refunds written; the ledger holds (\d+) orders, (\d+) entries, (\d+) members; (\d+) webhooks delivered and verified \((\d+) refused",
    )
    .unwrap();
    let figures = done
        .captures(&stdout)
        .unwrap_or_else(|| panic!("no summary in\n{stdout}"));
    let n = |i: usize| figures[i].parse::<u64>().unwrap();
    let (written, in_ledger, entries, members, delivered, refused) =
        (n(1), n(3), n(4), n(5), n(6), n(7));
    assert!(written >= 100, "about 20 orders/s for 20 s: {written}");
    assert_eq!(in_ledger, written, "every order booked");
    assert!(entries >= written, "{entries} entries");
    assert!(members > 0);
    assert!(
        delivered >= written,
        "points earned for each, plus welcomes: {delivered}"
    );
    assert_eq!(refused, 0, "every webhook's signature verified");
    assert!(stdout.contains("source    pos   streaming"), "{stdout}");
    assert!(stdout.contains("source    shop  streaming"), "{stdout}");
    assert!(stdout.contains("where to look"));
    // Every tenth customer wished for the tent whose price the shop cut.
    assert!(stdout.contains("price_drop 6,"), "{stdout}");

    // The ledger it leaves behind answers `member show`.
    let config = std::fs::read_to_string(dir.path().join("loyalty-cdc.toml")).unwrap();
    let show = crate::support::run_cli(
        &config,
        &["member", "show", "customer1@demo.example", "--json"],
        &[],
    )
    .await;
    assert_eq!(show.code, 0, "{}", show.output());
    let member: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    assert!(
        member["points"]["lifetime"].as_i64().unwrap() > 0,
        "{member}"
    );
}
