//! The per-message cost of the instance alone, away from NATS and the
//! scheduler: instantiate a component from its `InstancePre`, call `handle`
//! with a 128-byte message, drop the store (fresh mode), or call an instance
//! kept from the previous message (reuse mode). One task, back to back, so
//! the mean is the engine's own cost.
//!
//! A NATS connection is only needed because every store carries the
//! invocation's client; nothing is sent on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::BenchError;
use crate::bindings::Message;
use crate::dispatch::pool::{InstancePool, InstanceSlot, Instances, Lease, Standby};
use crate::dispatch::Stats;
use crate::engine::Engine;
use crate::hostcalls::Invocation;
use crate::manifest::{Manifest, TenantId};
use crate::tenant::config::TenantLimits;
use crate::tenant::Tenant;

/// Mean wall time per message, fresh and reused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceCost {
    /// Instantiate + call + drop, in microseconds.
    pub fresh_us: f64,
    /// Call on a reused instance, in microseconds.
    pub reuse_us: f64,
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
    let msg = Message {
        subject: "cost".into(),
        reply: None,
        headers: Vec::new(),
        payload: vec![b'x'; 128],
        jetstream: None,
        kv: None,
    };
    let calls = || Invocation {
        manifest: manifest.clone(),
        tenant: tenant.clone(),
        stats: stats.clone(),
        deadline: tokio::time::Instant::now() + manifest.limits.timeout,
        jetstream: None,
        table: wasmtime::component::ResourceTable::new(),
        trace: None,
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(4));
    let mean = |reuse: bool| {
        // Fresh: no standby instance is ever made, so every round
        // instantiates, as a message that finds none does.
        let instances =
            if reuse { Instances::Reuse(InstancePool::new()) } else { Instances::Fresh(Standby::default()) };
        let (engine, compiled, msg, slots, calls) = (&engine, &compiled, &msg, &slots, &calls);
        async move {
            let mut total = Duration::ZERO;
            // The first rounds warm the allocator's slots and the caches.
            for round in 0..iterations + iterations / 10 {
                let start = Instant::now();
                let mut lease = Lease::checkout(engine, &instances, calls());
                let result = lease.call(&compiled.pre, msg).await;
                let ok = matches!(result, Ok(Ok(_)));
                let slot =
                    slots.clone().try_acquire_owned().ok().map(|host| InstanceSlot { _tenant: None, _host: host });
                lease.checkin(&instances, ok, slot);
                if round >= iterations / 10 {
                    total += start.elapsed();
                }
                if let Err(e) = result {
                    return Err(BenchError::Handler(format!("{e:#}")));
                }
            }
            Ok(total.as_secs_f64() * 1e6 / f64::from(iterations.max(1)))
        }
    };
    let fresh_us = mean(false).await?;
    let reuse_us = mean(true).await?;
    Ok(InstanceCost { fresh_us, reuse_us })
}
