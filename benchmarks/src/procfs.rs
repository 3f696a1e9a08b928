//! Server cost from /proc: CPU time (`/proc/PID/stat` utime + stime) and resident memory
//! (`/proc/PID/status` VmRSS), summed over the `--server-pid`s.

use anyhow::Context;

/// Clock ticks per second of /proc/PID/stat. USER_HZ is 100 on every Linux architecture we run
/// on (it is fixed by the kernel ABI, independent of CONFIG_HZ).
const TICKS_PER_SEC: f64 = 100.0;

/// One reading of the servers' CPU time and RSS.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub cpu_secs: f64,
    pub rss_kib: u64,
}

/// Reads all `pids` now; no pids gives a zero sample.
pub fn sample(pids: &[u32]) -> anyhow::Result<Sample> {
    let mut total = Sample::default();
    for &pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("server pid {pid} is not running"))?;
        let ticks = cpu_ticks(&stat).with_context(|| format!("cannot parse /proc/{pid}/stat"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("server pid {pid} is not running"))?;
        let rss = vm_rss_kib(&status)
            .with_context(|| format!("no VmRSS in /proc/{pid}/status (has the server exited?)"))?;
        total.cpu_secs += ticks as f64 / TICKS_PER_SEC;
        total.rss_kib += rss;
    }
    Ok(total)
}

/// utime + stime from a /proc/PID/stat line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ")" come field 3 (state) onwards; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let stat = "1234 (roost (engine) x) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 125 0 0 20 0 9 0 100 1000 200";
        assert_eq!(cpu_ticks(stat), Some(375));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\tmosquitto\nVmPeak:\t  10000 kB\nVmRSS:\t    5432 kB\nThreads:\t1\n";
        assert_eq!(vm_rss_kib(status), Some(5432));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(&[std::process::id()]).expect("own /proc entry");
        assert!(s.rss_kib > 0);
        assert_eq!(sample(&[]).expect("empty"), Sample::default());
    }
}
