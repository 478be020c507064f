//! What a benchmark phase measures about the process: CPU time (user +
//! system, from `getrusage`, so every thread counts: the load generator's
//! as well as the handler's) and peak resident memory (`VmHWM`), and the
//! latency percentiles of a set of samples.
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
}

impl Meter {
    /// Resets the peak-RSS mark (when allowed) and notes the CPU time used
    /// so far.
    pub(crate) fn start() -> Meter {
        let scope = match std::fs::write("/proc/self/clear_refs", "5") {
            Ok(()) => RssScope::Phase,
            Err(_) => RssScope::Process,
        };
        Meter { cpu_at_start: process_cpu(), scope }
    }

    /// CPU time used since [`Meter::start`], peak RSS in MiB, and its scope.
    pub(crate) fn stop(&self) -> (Duration, f64, RssScope) {
        let cpu = process_cpu().saturating_sub(self.cpu_at_start);
        (cpu, peak_rss_mib().unwrap_or(0.0), self.scope)
    }
}

/// User plus system CPU time of the whole process, all threads.
pub fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable rusage; getrusage only writes it.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return Duration::ZERO;
    }
    // SAFETY: getrusage returned 0, so it filled the struct (and zeroed()
    // made every byte initialised anyway).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
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
        let m = Meter::start();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        let (_cpu, rss, _) = m.stop();
        assert!(rss > 0.0);
    }
}
