//! Rust bindings generated from `wit/`, the single source of truth for the
//! guest contract.
//!
//! Every import is async (host calls do NATS I/O) and trappable (a host bug
//! or a guest abusing the host can end the invocation). Functions that return
//! the WIT `error` variant use [`crate::hostcalls::CallError`] on the Rust
//! side, so host code can use `?` and still choose between a guest-visible
//! error and a trap.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "handler",
    imports: { default: async | trappable },
    exports: { default: async },
    trappable_error_type: {
        "natsfn:host/types.error" => crate::hostcalls::CallError,
    },
    with: {
        "natsfn:host/object.reader": crate::hostcalls::ObjectReader,
        "natsfn:host/object.writer": crate::hostcalls::ObjectWriter,
    },
});

pub use self::natsfn::host::types::Error as WitError;
