//! The `tradeid` binary: parse the command line, set up logging, run, and
//! map errors to exit codes (see [`tradeid_server::exit_code`]).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tradeid_server::Cli::parse();
    tradeid_server::init_logging();
    match tradeid_server::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("tradeid: error: {err:#}");
            ExitCode::from(tradeid_server::exit_code(&err))
        }
    }
}
