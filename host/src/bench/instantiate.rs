//! The per-message cost of the instance alone, away from NATS and the
//! scheduler: instantiate a component from its `InstancePre`, call `handle`
//! with a 128-byte message, drop the store (fresh mode), or call an instance
//! kept from the previous message (reuse mode). One task, back to back, so
//! the mean is the engine's own cost; the fresh figure is also split into
//! its steps (store, instantiate, call, drop), each timed on its own.
//!
//! A NATS connection is only needed because every store carries the
//! invocation's client; nothing is sent on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::BenchError;
use crate::dispatch::pool::{InstancePool, InstanceSlot, Instances, Lease, Standby};
use crate::dispatch::Stats;
use crate::engine::Engine;
use crate::hostcalls::{Invocation, MessageCalls};
use crate::manifest::{Manifest, TenantId};
use crate::tenant::config::TenantLimits;
use crate::tenant::Tenant;
use crate::wire::Received;

/// Mean wall time per message, fresh and reused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceCost {
    /// Instantiate + call + drop, in microseconds.
    pub fresh_us: f64,
    /// Call on a reused instance, in microseconds.
    pub reuse_us: f64,
    /// Where the fresh figure goes, step by step.
    pub fresh_steps: FreshSteps,
}

/// The steps of a message on a fresh instance, mean microseconds each; they
/// add up to [`InstanceCost::fresh_us`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FreshSteps {
    /// A new store: the WASI context, limits, the invocation's state.
    pub store_us: f64,
    /// Instantiating the component from its `InstancePre`.
    pub instantiate_us: f64,
    /// Calling `handle`: the message lowered into the guest, the guest's
    /// own work, the result lifted out.
    pub call_us: f64,
    /// Dropping the store and instance: memory reset and slots returned to
    /// the pool.
    pub drop_us: f64,
}

/// Measures `wasm` (a component of the handler world) `iterations` times
/// each way, after a warm-up.
pub async fn instance_cost(nats: async_nats::Client, wasm: &[u8], iterations: u32) -> Result<InstanceCost, BenchError> {
    let engine = Engine::new(4, None, false).map_err(|e| BenchError::Handler(e.to_string()))?;
    let (compiled, _) = engine.compile(wasm).map_err(|e| BenchError::Handler(e.to_string()))?;
    let manifest = Arc::new(
        Manifest::from_toml("name = \"cost\"\n[[trigger]]\nsubject = \"cost\"\n", "cost.toml".as_ref())
            .map_err(|e| BenchError::Handler(e.to_string()))?,
    );
    let tenant = Arc::new(Tenant::on_connection(TenantId::default(), nats, TenantLimits::default()));
    let stats = Arc::new(Stats::default());
    let msg = Received::core(async_nats::Message {
        subject: "cost".into(),
        reply: None,
        payload: vec![b'x'; 128].into(),
        headers: None,
        status: None,
        description: None,
        length: 128,
    });
    let message = || MessageCalls {
        deadline: tokio::time::Instant::now() + manifest.limits.timeout,
        jetstream: None,
        trace: None,
    };
    let calls = |message| Invocation::new(manifest.clone(), tenant.clone(), stats.clone(), message);
    let slots = Arc::new(tokio::sync::Semaphore::new(4));
    let steps = |reuse: bool| {
        // Fresh: no standby instance is ever made, so every round
        // instantiates, as a message that finds none does.
        let instances =
            if reuse { Instances::Reuse(InstancePool::new()) } else { Instances::Fresh(Standby::default()) };
        let (engine, compiled, msg, slots, message, calls) = (&engine, &compiled, &msg, &slots, &message, &calls);
        async move {
            let mut total = [Duration::ZERO; 4];
            // The first rounds warm the allocator's slots and the caches.
            for round in 0..iterations + iterations / 10 {
                let t0 = Instant::now();
                let mut lease = Lease::checkout(engine, &instances, message(), calls, None);
                let t1 = Instant::now();
                let made = lease.instantiate(&compiled.pre).await;
                let t2 = Instant::now();
                let result = match made {
                    Ok(()) => lease.call(&compiled.pre, msg.view()).await,
                    Err(e) => Err(e),
                };
                let t3 = Instant::now();
                let ok = matches!(result, Ok(Ok(_)));
                let slot =
                    slots.clone().try_acquire_owned().ok().map(|host| InstanceSlot { _tenant: None, _host: host });
                lease.checkin(&instances, ok, slot);
                let t4 = Instant::now();
                if round >= iterations / 10 {
                    for (sum, (from, to)) in total.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4)]) {
                        *sum += to - from;
                    }
                }
                if let Err(e) = result {
                    return Err(BenchError::Handler(format!("{e:#}")));
                }
            }
            let mean = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(iterations.max(1));
            Ok(FreshSteps {
                store_us: mean(total[0]),
                instantiate_us: mean(total[1]),
                call_us: mean(total[2]),
                drop_us: mean(total[3]),
            })
        }
    };
    let fresh_steps = steps(false).await?;
    let reuse = steps(true).await?;
    Ok(InstanceCost { fresh_us: fresh_steps.total(), reuse_us: reuse.total(), fresh_steps })
}

/// The instance cost of every handler whose manifest is in `dirs` (the
/// stores get a connection to the server at `url`; nothing is sent), each
/// named after its handler: what `natsfn bench` reports beside its
/// scenario, so a user can see what their own component's shape costs
/// (and, say, compare a build without `std`). Manifests that do not parse
/// are skipped: loading the host has already reported them.
pub async fn handlers_instance_cost(
    url: &str,
    dirs: &[std::path::PathBuf],
    iterations: u32,
) -> Result<Vec<super::GuestCost>, BenchError> {
    let nats = super::load::connect(url).await?;
    let mut costs = Vec::new();
    for dir in dirs {
        let found = crate::manifest::discover(dir)
            .map_err(|e| BenchError::Handler(format!("{}: cannot read the directory: {e}", dir.display())))?;
        for manifest in found.into_iter().flatten() {
            let Some(path) = &manifest.component else { continue };
            let wasm = std::fs::read(path).map_err(|e| BenchError::Handler(format!("{}: {e}", path.display())))?;
            let cost = instance_cost(nats.clone(), &wasm, iterations)
                .await
                .map_err(|e| BenchError::Handler(format!("{}: {e}", manifest.name)))?;
            costs.push(super::GuestCost { guest: manifest.name.to_string(), cost });
        }
    }
    Ok(costs)
}

impl FreshSteps {
    /// All the steps together.
    pub fn total(&self) -> f64 {
        self.store_us + self.instantiate_us + self.call_us + self.drop_us
    }
}
