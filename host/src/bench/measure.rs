//! What a benchmark phase measures about the process: CPU time (user +
//! system, from the process's CPU clock, so every thread counts: the load
//! generator's as well as the handler's) and peak resident memory
//! (`VmHWM`), and the latency percentiles of a set of samples. When the
//! nats-server runs on this machine, its CPU time over the phase too: on
//! two cores it competes with both sides, and for JetStream it is most of
//! a message's cost.
//!
//! Peak RSS is per phase where the kernel allows it: writing `5` to
//! `/proc/self/clear_refs` resets `VmHWM` to the current RSS, so the natsfn
//! phase is not charged for what the native phase touched, or the other way
//! round. Where that write fails the figure is the process's lifetime peak,
//! and [`RssScope::Process`] says so.

use std::time::Duration;

/// Which span of time a peak-RSS figure covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RssScope {
    /// Reset at the start of the phase: the phase's own peak.
    Phase,
    /// The kernel refused the reset: the process's peak so far.
    Process,
}

impl RssScope {
    /// The name used in the JSON report.
    pub fn as_str(self) -> &'static str {
        match self {
            RssScope::Phase => "phase",
            RssScope::Process => "process",
        }
    }
}

/// CPU time and memory at the start of a phase.
pub(crate) struct Meter {
    cpu_at_start: Duration,
    scope: RssScope,
    /// The server's process and its CPU time at the start, when readable.
    server: Option<(u32, Duration)>,
}

/// What a [`Meter`] read over its phase.
pub(crate) struct Metered {
    /// CPU time of this process.
    pub(crate) cpu: Duration,
    /// Peak resident memory, in MiB.
    pub(crate) peak_rss_mb: f64,
    /// What the peak covers.
    pub(crate) rss_scope: RssScope,
    /// CPU time of the nats-server process, when it could be read.
    pub(crate) server_cpu: Option<Duration>,
}

impl Meter {
    /// Resets the peak-RSS mark (when allowed) and notes the CPU time used
    /// so far, this process's and that of the server process `server`.
    pub(crate) fn start(server: Option<u32>) -> Meter {
        let scope = match std::fs::write("/proc/self/clear_refs", "5") {
            Ok(()) => RssScope::Phase,
            Err(_) => RssScope::Process,
        };
        let server = server.and_then(|pid| Some((pid, other_process_cpu(pid)?)));
        Meter { cpu_at_start: process_cpu(), scope, server }
    }

    /// What was used since [`Meter::start`].
    pub(crate) fn stop(&self) -> Metered {
        let server_cpu = self.server.and_then(|(pid, at_start)| Some(other_process_cpu(pid)?.saturating_sub(at_start)));
        Metered {
            cpu: process_cpu().saturating_sub(self.cpu_at_start),
            peak_rss_mb: peak_rss_mib().unwrap_or(0.0),
            rss_scope: self.scope,
            server_cpu,
        }
    }
}

/// User plus system CPU time of another process, all its threads (those
/// that ended included): its CPU clock. `None` when the process is gone or
/// not ours to read.
fn other_process_cpu(pid: u32) -> Option<Duration> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid, writable clockid_t.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    cpu_clock(clock)
}

/// User plus system CPU time of the whole process, all threads.
pub fn process_cpu() -> Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or(Duration::ZERO)
}

/// Reads a CPU-time clock, to the nanosecond.
fn cpu_clock(clock: libc::clockid_t) -> Option<Duration> {
    let mut now = std::mem::MaybeUninit::<libc::timespec>::zeroed();
    // SAFETY: `now` is a valid, writable timespec; clock_gettime only writes it.
    if unsafe { libc::clock_gettime(clock, now.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: clock_gettime returned 0, so it filled the struct.
    let now = unsafe { now.assume_init() };
    Some(Duration::new(u64::try_from(now.tv_sec).ok()?, u32::try_from(now.tv_nsec).ok()?))
}

/// `VmHWM` from `/proc/self/status`, in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

impl Percentiles {
    /// The percentiles of `samples` (nanoseconds), nearest-rank; `None`
    /// when there are none.
    pub(crate) fn of(mut samples: Vec<u64>) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1] as f64 / 1000.0
        };
        Some(Percentiles { p50_us: at(0.50), p90_us: at(0.90), p99_us: at(0.99), p999_us: at(0.999) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=1000).map(|us| us * 1000).collect()).unwrap();
        assert_eq!((p.p50_us, p.p90_us, p.p99_us, p.p999_us), (500.0, 900.0, 990.0, 999.0));
        assert!(Percentiles::of(Vec::new()).is_none());
    }

    #[test]
    fn meter_sees_cpu_and_memory() {
        let m = Meter::start(None);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        let metered = m.stop();
        assert!(metered.peak_rss_mb > 0.0);
        assert!(metered.server_cpu.is_none());
    }

    #[test]
    fn another_process_cpu_time_is_read_to_the_nanosecond() {
        // A child that burns CPU until it is killed.
        let mut child = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        let m = Meter::start(Some(child.id()));
        std::thread::sleep(Duration::from_millis(300));
        let used = m.stop().server_cpu;
        child.kill().unwrap();
        child.wait().unwrap();
        let used = used.expect("a child's CPU clock is readable");
        assert!(used > Duration::from_millis(1) && !used.subsec_nanos().is_multiple_of(1_000_000), "{used:?}");
        assert!(other_process_cpu(child.id()).is_none(), "a reaped process has no clock");
    }
}
