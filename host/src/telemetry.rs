//! Log output for the `natsfn` binary: human-readable lines on stderr,
//! filtered by `RUST_LOG` (default `info`). Embedders set up their own
//! subscriber; the library only emits `tracing` events.
//!
//! Guest output arrives under the `natsfn::guest` target with `handler` and
//! `tenant` fields, so `RUST_LOG=natsfn::guest=debug` shows guest debug lines
//! without turning on the host's.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Calling it twice is harmless (the second
/// call does nothing).
pub fn init_logging(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
