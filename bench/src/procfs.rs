//! The server's CPU time and resident memory, read from /proc while a step
//! runs, so the interval measured is exactly the step's.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// The server's utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    /// This client's utime + stime: a saturated client would distort results.
    pub client_ticks: u64,
    /// Busy time of the whole machine: what neither server nor client used
    /// was someone else's (other builds, Cassandra, …) and skews a run.
    pub machine_ticks: u64,
    pub at: std::time::Instant,
}

pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// utime + stime of a process, in clock ticks.
fn process_ticks(dir: &Path) -> anyhow::Result<u64> {
    let path = dir.join("stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // Fields after the command name (which may contain spaces) in `(…)`:
    // state is field 3, utime 14 and stime 15.
    let after = stat.rsplit_once(") ").map(|(_, rest)| rest).context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).context("short /proc/PID/stat");
    Ok(field(14)? + field(15)?)
}

/// Busy clock ticks of all CPUs: everything in /proc/stat's `cpu` line but
/// idle and iowait (guest time is already inside user).
fn machine_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().filter(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let values: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| values.get(i)).sum();
    Ok(busy)
}

fn rss_kib(dir: &Path) -> anyhow::Result<u64> {
    let path = dir.join("status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// The server processes (summed: several gateways count as one server).
pub fn sample(pids: &[u32]) -> anyhow::Result<Usage> {
    let (mut cpu_ticks, mut rss) = (0, 0);
    for pid in pids {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        cpu_ticks += process_ticks(&dir)?;
        rss += rss_kib(&dir)?;
    }
    let client_ticks = process_ticks(Path::new("/proc/self"))?;
    let machine_ticks = machine_ticks()?;
    Ok(Usage { cpu_ticks, rss_kib: rss, client_ticks, machine_ticks, at: std::time::Instant::now() })
}

/// CPU seconds and wall seconds between two samples.
pub fn cpu_between(before: &Usage, after: &Usage) -> (f64, f64) {
    let cpu = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / clock_ticks_per_second() as f64;
    (cpu, after.at.duration_since(before.at).as_secs_f64())
}

pub fn to_json(before: &Usage, after: &Usage) -> Value {
    let (cpu, wall) = cpu_between(before, after);
    let cores = |ticks: u64| ticks as f64 / clock_ticks_per_second() as f64 / wall.max(1e-9);
    let client = cores(after.client_ticks.saturating_sub(before.client_ticks));
    let machine = cores(after.machine_ticks.saturating_sub(before.machine_ticks));
    json!({
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "cores": cpu / wall.max(1e-9),
        "client_cores": client,
        "other_cores": (machine - client - cpu / wall.max(1e-9)).max(0.0),
        "rss_kib_before": before.rss_kib,
        "rss_kib_after": after.rss_kib,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_this_process() {
        let usage = super::sample(&[std::process::id()]).expect("own /proc entry");
        assert!(usage.rss_kib > 0);
        assert!(usage.machine_ticks >= usage.client_ticks);
    }
}
