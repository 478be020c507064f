//! The benchmark's output: a table for people and a JSON document for
//! scripts, shaped as
//! `{"machine": {...}, "scenarios": [{"name", "natsfn": {...}, "native": {...}, "ratio", "round_ratios"}],
//! "instance_cost_us": [{"guest", "fresh", "reuse", "fresh_steps"}], "idle": {"handlers", "rss_mb",
//! "distinct": {"first_start_rss_mb", "restart_rss_mb"}}}`
//! (no instance costs and a `null` idle figure unless measured).
//! Latency fields are `null` where nothing was timed (no replies), and
//! `server_cpu_us_per_msg` where the server runs elsewhere. Over
//! several rounds each side's figures are medians, and `round_ratios`
//! lists every round's ratio beside their median, `ratio`.

use std::path::Path;

use serde_json::{json, Value};

use super::{load, BenchError, Measurement, ScenarioResult};

/// The machine a report was measured on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Logical CPUs this process may use.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// The nats-server version the runs went through.
    pub nats_server: String,
    /// This crate's version.
    pub natsfn: String,
}

impl Machine {
    /// Describes this machine, asking the server at `url` for its version.
    pub async fn detect(url: &str) -> Result<Machine, BenchError> {
        let client = load::connect(url).await?;
        let nats_server = client.server_info().version;
        let _ = client.drain().await;
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "unknown".to_owned(), |m| m.trim().to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |k| k.trim().into());
        Ok(Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            kernel,
            nats_server,
            natsfn: env!("CARGO_PKG_VERSION").into(),
        })
    }
}

/// Every scenario measured in one run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Where.
    pub machine: Machine,
    /// What, in the order run.
    pub scenarios: Vec<ScenarioResult>,
    /// The instance's own cost per message, measured in isolation, for
    /// each guest measured.
    pub instance_costs: Vec<GuestCost>,
    /// Resident memory with many handlers loaded and idle.
    pub idle: Option<IdleMemory>,
}

/// One guest's [`InstanceCost`](super::InstanceCost), named.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestCost {
    /// The guest's name: its component's file stem in the `scenarios`
    /// benchmark, the handler's name in `natsfn bench`.
    pub guest: String,
    /// What an instance of it costs.
    pub cost: super::InstanceCost,
}

/// Resident memory of a process whose host has `handlers` handlers loaded,
/// bound and idle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleMemory {
    /// Handlers loaded.
    pub handlers: usize,
    /// `VmRSS`, in MiB, when the handlers share one component (and so its
    /// compiled code).
    pub rss_mb: f64,
    /// The same when every handler has a component of its own.
    pub distinct: Option<DistinctIdle>,
}

/// [`IdleMemory`] with a distinct component per handler: each compiled on
/// its own, its code held once per handler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistinctIdle {
    /// `VmRSS`, in MiB, on a first start: every component compiled, with
    /// an empty compiled-code cache.
    pub first_start_mb: f64,
    /// `VmRSS`, in MiB, on a restart: every component loaded from the
    /// cache the first start filled.
    pub restart_mb: f64,
}

impl Report {
    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        let m = &self.machine;
        let scenarios: Vec<Value> = self
            .scenarios
            .iter()
            .map(|r| {
                let s = &r.scenario;
                json!({
                    "name": s.name,
                    "messages": s.messages,
                    "payload_size": s.payload_size,
                    "concurrency": s.concurrency,
                    "natsfn": side(&r.natsfn),
                    "native": side(&r.native),
                    "ratio": r.ratio(),
                    "round_ratios": r.round_ratios,
                })
            })
            .collect();
        let costs: Vec<Value> = self
            .instance_costs
            .iter()
            .map(|GuestCost { guest, cost: c }| {
                let s = c.fresh_steps;
                json!({
                    "guest": guest,
                    "fresh": c.fresh_us,
                    "reuse": c.reuse_us,
                    "fresh_steps": {
                        "store": s.store_us, "instantiate": s.instantiate_us, "call": s.call_us, "drop": s.drop_us,
                    },
                })
            })
            .collect();
        json!({
            "machine": {
                "cpu": m.cpu, "cores": m.cores, "kernel": m.kernel,
                "nats_server": m.nats_server, "natsfn": m.natsfn,
            },
            "scenarios": scenarios,
            "instance_cost_us": costs,
            "idle": self.idle.map(|i| json!({
                "handlers": i.handlers,
                "rss_mb": i.rss_mb,
                "distinct": i.distinct.map(|d| json!({
                    "first_start_rss_mb": d.first_start_mb, "restart_rss_mb": d.restart_mb,
                })),
            })),
        })
    }

    /// Writes [`Report::to_json`] to `path`, pretty-printed.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(&self.to_json()).unwrap_or_default();
        std::fs::write(path, text + "\n").map_err(|source| BenchError::Write { path: path.to_owned(), source })
    }

    /// A fixed-width table, one row per scenario and side.
    pub fn table(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "{} ({} cores), kernel {}, nats-server {}, natsfn {}\n",
            m.cpu, m.cores, m.kernel, m.nats_server, m.natsfn
        );
        out += &format!(
            "{:<16} {:<7} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>7}\n",
            "scenario",
            "side",
            "msgs/s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "cpu µs/msg",
            "srv µs/msg",
            "rss MiB",
            "ratio"
        );
        for r in &self.scenarios {
            for (label, x, ratio) in [("native", &r.native, None), ("natsfn", &r.natsfn, Some(r.ratio()))] {
                let lat = |f: fn(&super::Percentiles) -> f64| {
                    x.latency.as_ref().map_or("-".into(), |p| format!("{:.0}", f(p)))
                };
                out += &format!(
                    "{:<16} {:<7} {:>12.0} {:>9} {:>9} {:>9} {:>9} {:>10.2} {:>10} {:>8.1} {:>7}\n",
                    r.scenario.name,
                    label,
                    x.msgs_per_sec,
                    lat(|p| p.p50_us),
                    lat(|p| p.p90_us),
                    lat(|p| p.p99_us),
                    lat(|p| p.p999_us),
                    x.cpu_us_per_msg,
                    x.server_cpu_us_per_msg.map_or("-".into(), |c| format!("{c:.2}")),
                    x.peak_rss_mb,
                    ratio.map_or(String::new(), |q| format!("{q:.2}")),
                );
            }
        }
        for r in self.scenarios.iter().filter(|r| r.round_ratios.len() > 1) {
            let each: Vec<String> = r.round_ratios.iter().map(|q| format!("{q:.2}")).collect();
            out += &format!(
                "{}: medians of {} rounds; ratio per round {}\n",
                r.scenario.name,
                r.round_ratios.len(),
                each.join(" ")
            );
        }
        for GuestCost { guest, cost: c } in &self.instance_costs {
            let s = c.fresh_steps;
            out += &format!(
                "instantiate + call + drop of {guest}, in isolation: {:.2} µs fresh (store {:.2}, instantiate {:.2}, \
                 call {:.2}, drop {:.2}), {:.2} µs reused\n",
                c.fresh_us, s.store_us, s.instantiate_us, s.call_us, s.drop_us, c.reuse_us
            );
        }
        if let Some(i) = self.idle {
            out += &format!("RSS with {} handlers loaded and idle: {:.1} MiB", i.handlers, i.rss_mb);
            if let Some(d) = i.distinct {
                out += &format!(
                    "; with a distinct component each: {:.1} MiB on a first start, {:.1} MiB on a restart \
                     (compiled-code cache warm)",
                    d.first_start_mb, d.restart_mb
                );
            }
            out += "\n";
        }
        out
    }
}

fn side(x: &Measurement) -> Value {
    let lat = |f: fn(&super::Percentiles) -> f64| x.latency.as_ref().map(f);
    json!({
        "msgs_per_sec": x.msgs_per_sec,
        "p50_us": lat(|p| p.p50_us),
        "p90_us": lat(|p| p.p90_us),
        "p99_us": lat(|p| p.p99_us),
        "p999_us": lat(|p| p.p999_us),
        "cpu_us_per_msg": x.cpu_us_per_msg,
        "server_cpu_us_per_msg": x.server_cpu_us_per_msg,
        "peak_rss_mb": x.peak_rss_mb,
        "peak_rss_scope": x.rss_scope.as_str(),
        "messages": x.messages,
        "seconds": x.seconds,
    })
}
