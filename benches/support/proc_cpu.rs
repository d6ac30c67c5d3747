//! CPU time of a process, from /proc: shared by the benches that report
//! what a run cost beside how long it took.

/// CPU seconds (user + system) a process has used so far (`pid`: a number,
/// or `self`). `None`: it is gone, or its stat line is not readable.
pub fn seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // utime and stime are fields 14 and 15 of the line; counted after the
    // command name (in brackets, and it may hold spaces), 12 and 13. In
    // clock ticks: USER_HZ, 100 on every Linux this runs on.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
}
