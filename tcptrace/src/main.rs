use std::process::ExitCode;

use clap::Parser as _;
use tcptrace::{cli::Cli, output::SinkClosed};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcptrace: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(tcptrace::run::main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<SinkClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcptrace: {e:#}");
            ExitCode::from(1)
        }
    }
}
