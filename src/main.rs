//! The `tradeid` binary: parse the command line, set up logging, run, and
//! map errors to exit codes (see [`tradeid::exit_code`]).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tradeid::cli::Cli::parse();
    tradeid::logging::init();
    match tradeid::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("tradeid: error: {err:#}");
            ExitCode::from(tradeid::exit_code(&err))
        }
    }
}
