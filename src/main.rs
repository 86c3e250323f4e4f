//! The `tradeid` binary: parse the command line, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tradeid::cli::Cli::parse();
    match tradeid::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tradeid: error: {err:#}");
            ExitCode::from(tradeid::exit_code(&err))
        }
    }
}
