//! `natsfn:host/types`: no functions, only the conversion of [`CallError`]
//! into the WIT `error` variant or a trap.

use super::{CallError, Invocation};
use crate::bindings::natsfn::host::types::Host;
use crate::bindings::WitError;

impl Host for Invocation {
    fn convert_error(&mut self, err: CallError) -> wasmtime::Result<WitError> {
        match err {
            CallError::Guest(e) => Ok(e),
        }
    }
}
