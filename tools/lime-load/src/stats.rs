//! Measurement helpers shared by the subcommands: latency percentiles, process
//! CPU time and memory from `/proc`, the machine's load average.

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

/// CPU time process `root` and all its descendants have used so far, and how
/// many they are: a database server's, whose connections may be processes of
/// their own (PostgreSQL's backends are children of its first process).
/// Processes that exit meanwhile take their time with them: compare two readings
/// taken while the same connections are open.
pub fn process_tree_cpu(root: u32) -> Result<(Duration, usize)> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue; // exited meanwhile
        };
        // Field 4 (ppid) is the second after the command name's parenthesis.
        let parent = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().nth(1))
            .and_then(|field| field.parse::<u32>().ok());
        if let Some(parent) = parent {
            parents.push((pid, parent));
        }
    }
    let mut tree = vec![root];
    let mut index = 0;
    while let Some(&pid) = tree.get(index) {
        tree.extend(
            parents
                .iter()
                .filter(|(_, parent)| *parent == pid)
                .map(|(child, _)| *child),
        );
        index += 1;
    }
    let mut total = Duration::ZERO;
    let mut count = 0;
    for pid in tree {
        if let Ok(cpu) = process_cpu(Some(pid)) {
            total += cpu;
            count += 1;
        }
    }
    Ok((total, count))
}

/// The resident memory of process `pid` (`VmRSS` of `/proc/PID/status`), in KiB.
pub fn process_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("{path}: no VmRSS line in kB"))
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

/// The number of CPUs the machine has online (the `cpuN` lines of `/proc/stat`,
/// which [`machine_busy`] adds up), whatever this process's CPU affinity.
pub fn cpu_count() -> usize {
    std::fs::read_to_string("/proc/stat")
        .map(|stat| {
            stat.lines()
                .filter(|line| {
                    line.strip_prefix("cpu")
                        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0)
        .max(1)
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

#[cfg(test)]
mod tests {
    use super::{cpu_count, process_rss_kib, process_tree_cpu};

    #[test]
    fn cpu_count_is_the_machines_not_the_affinitys() {
        let usable = std::thread::available_parallelism().map_or(1, |count| count.get());
        assert!(cpu_count() >= usable);
    }

    #[test]
    fn this_process_has_memory_and_a_tree_with_its_child() {
        assert!(process_rss_kib(std::process::id()).unwrap() > 0);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let (_, processes) = process_tree_cpu(std::process::id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(processes >= 2, "the tree holds this process and its child");
    }
}
