//! `docker/setup-local-databases.sh` is idempotent: on servers it has
//! already prepared (the test command runs it first) it changes nothing.

#[test]
fn setup_script_changes_nothing_on_a_prepared_machine() {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/setup-local-databases.sh");
    for run in 1..=2 {
        let output = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .expect("run setup script");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "run {run}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.ends_with("setup: 0 change(s)\n"),
            "run {run} changed something:\n{stdout}"
        );
        assert!(
            stdout.contains("wal_level=logical max_replication_slots=20 max_wal_senders=20"),
            "{stdout}"
        );
        assert!(
            stdout.contains("binlog_format=ROW binlog_row_image=FULL binlog_row_metadata=FULL"),
            "{stdout}"
        );
    }
}
