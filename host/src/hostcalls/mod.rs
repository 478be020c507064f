//! Host calls: the implementation of every WIT interface a guest imports,
//! one file per interface.
//!
//! All of them work on an [`Invocation`], the slice of the store that belongs
//! to host calls: who is calling (the handler's manifest, for permissions and
//! config), the NATS connection to act with, the invocation's deadline, and
//! for JetStream deliveries the message to acknowledge.
//! They never see the rest of the store (WASI state, limits), which keeps each
//! interface testable and its reach obvious.

mod acks;
mod buckets;
mod config;
mod kv;
mod log;
mod messaging;
mod object;
mod types;

pub(crate) use acks::{Decision, JetStreamAck};
pub(crate) use buckets::Buckets;
pub(crate) use log::GUEST_TARGET;
pub use object::{ObjectReader, ObjectWriter};

use std::sync::Arc;

use tokio::time::Instant;
use wasmtime::component::{HasData, Linker};

use crate::bindings::{Handler, WitError};
use crate::manifest::Manifest;

/// What host calls know about the invocation they serve.
pub struct Invocation {
    /// The manifest of the handler version being run.
    pub(crate) manifest: Arc<Manifest>,
    /// The tenant's NATS connection.
    pub(crate) nats: async_nats::Client,
    /// When the invocation's time is up; waits inside host calls end here.
    pub(crate) deadline: Instant,
    /// The JetStream message being handled, for the `acks` interface.
    pub(crate) jetstream: Option<JetStreamAck>,
    /// KV and object buckets, opened once per host.
    pub(crate) buckets: Arc<Buckets>,
    /// Resources the guest holds (object readers and writers); dropped with
    /// the invocation.
    pub(crate) table: wasmtime::component::ResourceTable,
}

/// The error side of host calls that return the WIT `error` variant.
///
/// Domain problems (denied, timeout, bad subject) go back to the guest as
/// values it can handle; they never trap. This type exists so that a host
/// call can one day end the invocation instead (a breached tenant limit) by
/// adding a variant, without touching every signature.
#[derive(Debug)]
pub enum CallError {
    /// Returned to the guest.
    Guest(WitError),
}

impl From<WitError> for CallError {
    fn from(e: WitError) -> Self {
        CallError::Guest(e)
    }
}

/// `HasData` marker projecting a store's data to its [`Invocation`].
struct Calls;

impl HasData for Calls {
    type Data<'a> = &'a mut Invocation;
}

/// Adds every natsfn interface to `linker`. `get` finds the invocation in the
/// store's data.
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> &mut Invocation,
) -> wasmtime::Result<()> {
    Handler::add_to_linker::<T, Calls>(linker, get)
}
