//! `natsfn-guest`: the one place where bindings for the natsfn `handler` world
//! are generated, so that handler crates share a single copy of the contract
//! and a handful of helpers instead of each running `generate!` and
//! re-implementing the same small conversions.
//!
//! A handler implements [`Guest`] and registers itself with
//! [`export_handler!`]:
//!
//! ```ignore
//! use natsfn_guest::{Guest, HandlerError, Message, Reply};
//!
//! struct Echo;
//!
//! impl Guest for Echo {
//!     fn handle(msg: Message) -> Result<Option<Reply>, HandlerError> {
//!         natsfn_guest::reply(msg.payload)
//!     }
//! }
//!
//! natsfn_guest::export_handler!(Echo);
//! ```

// No standard library needed: guests built with `std` link it themselves,
// and `no_std` guests (see `natsfn-guest-bare`) get the same bindings.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

// Lets the generated code's absolute `natsfn_guest::...` paths (needed so the
// exported macro works in guest crates) also resolve inside this crate.
extern crate self as natsfn_guest;

/// Generated bindings for `natsfn:host/handler`.
///
/// Kept in its own module so the crate root can re-export a flat, stable API
/// while `export_handler!` still finds the generated export glue at a fixed
/// path (`natsfn_guest::bindings`) from any downstream crate.
pub mod bindings {
    wit_bindgen::generate!({
        world: "handler",
        path: "../../wit",
        // Guests call the macro from their own crate, so it has to be
        // `#[macro_export]`ed and must name this module by absolute path.
        pub_export_macro: true,
        export_macro_name: "export_handler",
        default_bindings_module: "natsfn_guest::bindings",
        // The expansion runs inside the guest crate, which does not depend
        // on wit-bindgen itself.
        runtime_path: "natsfn_guest::__rt::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __rt;

pub use bindings::natsfn::host::{acks, config, kv, log, messaging, object, types};
pub use bindings::{export_handler, Guest};
pub use types::{Error, HandlerError, Header, Message, Reply};

/// What `handle` returns; spelled out once so guests don't repeat it.
pub type HandleResult = Result<Option<Reply>, HandlerError>;

/// A successful handler result carrying `payload` and no headers.
pub fn reply(payload: impl Into<Vec<u8>>) -> HandleResult {
    Ok(Some(Reply { headers: Vec::new(), payload: payload.into() }))
}

/// Renders a host error in the stable `kind[: detail]` form that tests and
/// logs match on, so it must not change without updating them.
pub fn describe(err: &Error) -> String {
    match err {
        Error::PermissionDenied(s) => format!("permission-denied: {s}"),
        Error::NotFound => "not-found".to_string(),
        Error::Conflict(n) => format!("conflict: {n}"),
        Error::Timeout => "timeout".to_string(),
        Error::NoResponders => "no-responders".to_string(),
        Error::TooLarge(n) => format!("too-large: {n}"),
        Error::Invalid(s) => format!("invalid: {s}"),
        Error::Unavailable(s) => format!("unavailable: {s}"),
    }
}

/// Shorthand for `config::get(key).unwrap_or(default)`, the common case.
pub fn config_or(key: &str, default: &str) -> String {
    config::get(key).unwrap_or_else(|| default.to_string())
}

/// Maps a host error to a handler failure, for guests that just give up.
pub fn fail(err: &Error) -> HandlerError {
    HandlerError::Fail(describe(err))
}
