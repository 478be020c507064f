//! The `natsfn` command line, built inside the test package so cargo builds
//! it before the tests and hands them its path (`CARGO_BIN_EXE_natsfn-cli`):
//! the same code as `host/src/bin/natsfn.rs`, always fresh, never stale.

fn main() -> std::process::ExitCode {
    natsfn::cli::Cli::run_from_env()
}
