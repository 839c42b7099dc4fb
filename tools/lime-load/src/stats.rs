//! Measurement helpers shared by the subcommands: latency percentiles, process
//! CPU time from `/proc`, the machine's load average.

use anyhow::{Context, Result, bail};
use std::time::Duration;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`). The
/// kernel reports these fields in USER_HZ, which is 100 on every Linux ABI.
const USER_HZ: f64 = 100.0;

/// CPU time (user + system, all threads, 10 ms resolution) that process `pid`
/// has used so far; `None` reads this process.
pub fn process_cpu(pid: Option<u32>) -> Result<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count the
    // fields after its closing parenthesis. There, field 3 (state) is index 0, so
    // utime (field 14) is index 11 and stime (field 15) index 12.
    let rest = stat
        .rfind(')')
        .map(|end| &stat[end + 1..])
        .with_context(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|field| field.parse().ok())
            .with_context(|| format!("{path}: field {} missing or not a number", index + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_secs_f64(total as f64 / USER_HZ))
}

/// CPU time all processes of the machine have used so far (user, nice, system,
/// irq, softirq, steal: everything but idle and iowait), from `/proc/stat`.
pub fn machine_busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat
        .lines()
        .find(|line| line.starts_with("cpu "))
        .context("/proc/stat: no `cpu` line")?;
    // cpu user nice system idle iowait irq softirq steal guest guest_nice
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().context("/proc/stat: not a number"))
        .collect::<Result<_>>()?;
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|index| fields.get(*index))
        .sum();
    Ok(Duration::from_secs_f64(busy as f64 / USER_HZ))
}

/// The number of CPUs the machine has online.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |count| count.get())
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Latency percentiles of a run.
pub struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    /// Sorts the recorded latencies.
    pub fn new(mut recorded: Vec<Duration>) -> Result<Latencies> {
        if recorded.is_empty() {
            bail!("no request completed: no latency to report");
        }
        recorded.sort_unstable();
        Ok(Latencies { sorted: recorded })
    }

    /// The `p`-th percentile (nearest rank), `p` in 0..=100.
    pub fn percentile(&self, p: f64) -> Duration {
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }
}

/// Milliseconds, for printing.
pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// How many bundles came back with each flag: `[flag 0, flag 1, flag 2]`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flags(pub [u64; 3]);

impl Flags {
    /// Counts one bundle of wire flag `flag` (0, 1 or 2).
    pub fn add(&mut self, flag: u8) {
        if let Some(count) = self.0.get_mut(usize::from(flag)) {
            *count += 1;
        }
    }

    /// Adds another run's counts.
    pub fn merge(&mut self, other: Flags) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }
}

impl std::fmt::Display for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [zero, one, two] = self.0;
        write!(
            f,
            "flag 1 (with OPk) {one}, flag 0 (no OPk left) {zero}, flag 2 (no bundle) {two}"
        )
    }
}
