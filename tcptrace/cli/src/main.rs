//! The tcptrace command: everything but `selftest` is the library's
//! `run::main`; `selftest` is the lab's, when built with it.
use std::process::ExitCode;

use clap::Parser as _;
use tcptrace::{
    cli::{Cli, Command},
    output::SinkClosed,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Selftest { scenarios, format }) => selftest(&scenarios, format),
        _ => trace(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<SinkClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcptrace: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn trace(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(tcptrace::run::main(cli))
}

/// An unknown scenario is a usage error (exit 2), found before anything runs.
#[cfg(feature = "selftest")]
fn selftest(scenarios: &[String], format: tcptrace::cli::TableFormat) -> anyhow::Result<()> {
    let known = tcptrace_lab::scenarios::names();
    if let Some(unknown) = scenarios.iter().find(|n| !known.contains(&n.as_str())) {
        <Cli as clap::CommandFactory>::command()
            .error(
                clap::error::ErrorKind::InvalidValue,
                format!(
                    "unknown scenario {unknown:?}: choose from {}",
                    known.join(", ")
                ),
            )
            .exit();
    }
    tcptrace_lab::selftest::main(scenarios, format)
}

#[cfg(not(feature = "selftest"))]
fn selftest(_: &[String], _: tcptrace::cli::TableFormat) -> anyhow::Result<()> {
    anyhow::bail!("this tcptrace was built without the lab: rebuild with the `selftest` feature")
}
