//! The `tradeid` binary: parse the command line, set up logging, run, and
//! print a failure once, mapped to its exit code (see
//! [`tradeid_server::report_error`]).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match tradeid_server::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed (a closed
            // stdout is ignored, never a panic); usage errors print clap's
            // message once and exit 78 (EX_CONFIG), as the README says.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 78 } else { 0 });
        }
    };
    tradeid_server::init_logging();
    match tradeid_server::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => ExitCode::from(tradeid_server::report_error(&err)),
    }
}
