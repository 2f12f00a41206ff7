//! The server's CPU time and resident memory, read from /proc while a step
//! runs, so the interval measured is exactly the step's.

use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    pub at: std::time::Instant,
}

pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

pub fn sample(pid: u32) -> anyhow::Result<Usage> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(dir.join("stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) in `(…)`:
    // state is field 3, utime 14 and stime 15.
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).context("short /proc/PID/stat");
    let cpu_ticks = field(14)? + field(15)?;
    let status = std::fs::read_to_string(dir.join("status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(Usage { cpu_ticks, rss_kib, at: std::time::Instant::now() })
}

/// CPU seconds and wall seconds between two samples.
pub fn cpu_between(before: &Usage, after: &Usage) -> (f64, f64) {
    let cpu = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / clock_ticks_per_second() as f64;
    (cpu, after.at.duration_since(before.at).as_secs_f64())
}

pub fn to_json(before: &Usage, after: &Usage) -> Value {
    let (cpu, wall) = cpu_between(before, after);
    json!({
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "cores": if wall > 0.0 { cpu / wall } else { 0.0 },
        "rss_kib_before": before.rss_kib,
        "rss_kib_after": after.rss_kib,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_this_process() {
        let usage = super::sample(std::process::id()).expect("own /proc entry");
        assert!(usage.rss_kib > 0);
    }
}
