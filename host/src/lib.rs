//! natsfn: run sandboxed WebAssembly component handlers on NATS.
//!
//! A host binds NATS subjects to handler components described by manifests,
//! and runs each message on a fresh, limited instance. The library is the
//! product; the `natsfn` binary is a thin command line over it.
//!
//! # Layout
//! Data flows one way: trigger → dispatch → guest → host calls → NATS.
//! - [`manifest`]: handler manifests, validated into types; directory discovery.
//! - [`subject`], [`permissions`], [`limits`]: the vocabulary manifests use.
//! - [`engine`]: wasmtime configuration, compilation, per-invocation stores.
//! - `bindings`: the Rust side of `wit/`, generated.
//! - `hostcalls`: one file per WIT interface the guest imports.
//! - `triggers`: one file per message source; they admit messages and hand
//!   them to dispatch.
//! - `dispatch`: one invocation, from instance to applied outcome, inside
//!   its `process {subject}` span.
//! - [`tenant`]: the host config file, tenants' own NATS connections,
//!   limits and threads.
//! - [`host`]: the embedding API ([`Host::builder`]) and ordered shutdown.
//! - [`local_server`]: a child `nats-server` for development and tests.
//! - [`telemetry`]: OpenTelemetry tracing (OTLP export, W3C trace context
//!   in NATS headers) and log output setup for the binary.
//! - [`bench`](mod@bench): natsfn against a native async-nats handler, same
//!   server, same run (`natsfn bench`, and the `scenarios` benchmark).
//! - [`cli`]: the `natsfn` command line.
//!
//! # Errors
//! Each layer has its own error enum ([`manifest::ManifestError`],
//! [`engine::EngineError`], [`tenant::config::ConfigError`],
//! [`TenantError`], [`HostError`], [`LoadError`],
//! [`telemetry::TelemetryError`]) whose message names the file, field,
//! subject or setting at fault. Errors a guest can see are the WIT
//! `error` variant, never a Rust error type.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod bench;
mod bindings;
pub mod buckets;
pub mod cli;
mod dispatch;
pub mod engine;
pub mod host;
mod hostcalls;
pub mod limits;
pub mod local_server;
pub mod manifest;
pub mod permissions;
mod registry;
pub mod reload;
mod settle;
pub mod subject;
pub mod telemetry;
pub mod tenant;
mod triggers;
mod wire;

pub use buckets::{BucketKind, BucketSpec};
pub use dispatch::HandlerStats;
pub use host::{HandlerInfo, Host, HostBuilder, HostError, LoadError, RunningHost, ShutdownReport};
pub use local_server::NatsServer;
pub use reload::{ChangeKind, ReloadChange, ReloadError, ReloadReport};
pub use tenant::config::{HostConfig, TenantConfig};
pub use tenant::{TenantError, TenantStats};
pub use triggers::TriggerError;
