//! `natsfn:host/config`: read access to the manifest's `[config]` table.

use super::Invocation;
use crate::bindings::natsfn::host::config::Host;

impl Host for Invocation {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.manifest.config.get(&key).cloned())
    }
}
