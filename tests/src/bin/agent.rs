//! The agent's own `main`, built inside this package so integration tests get its path from
//! `CARGO_BIN_EXE_agent` and can never run a stale binary.

fn main() -> std::process::ExitCode {
    proxy_agent::cli::main()
}
