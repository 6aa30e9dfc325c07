//! The `strata` command line.

fn main() -> std::process::ExitCode {
    strata::cli::main()
}
