//! The `lime-server` binary: parse the command line, run it, report errors.

use clap::Parser;
use lime_server::cli::{self, Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lime-server: {error:#}");
            ExitCode::FAILURE
        }
    }
}
