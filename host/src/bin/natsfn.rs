//! The `natsfn` binary: all of it lives in [`natsfn::cli`].

fn main() -> std::process::ExitCode {
    natsfn::cli::Cli::run_from_env()
}
