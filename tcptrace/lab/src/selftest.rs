//! `tcptrace selftest`: loads the tracer in this process, reproduces every
//! scenario in a lab and checks the live pipeline's verdicts.
use std::{io, time::Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use tcptrace::{cli::TableFormat, output::NdjsonWriter};

use crate::{
    observer::Observer,
    scenarios::{self, Case, CaseResult, Expect},
};

/// One row of the report.
#[derive(Debug, Serialize)]
struct Row<'a> {
    scenario: &'a str,
    case: &'a str,
    expected: String,
    got: String,
    result: &'a str,
    seconds: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    detail: String,
}

fn row(r: &CaseResult) -> Row<'_> {
    Row {
        scenario: r.scenario,
        case: r.case,
        expected: match r.expect {
            Expect::Verdict(c) => c.as_str().to_string(),
            Expect::NoVerdict(c) => format!("no {}", c.as_str()),
        },
        got: r.got.clone(),
        result: r.status(),
        seconds: (r.elapsed.as_secs_f64() * 10.0).round() / 10.0,
        detail: r.detail.clone(),
    }
}

/// The report as a table.
pub fn render(results: &[CaseResult]) -> String {
    let rows: Vec<Row<'_>> = results.iter().map(row).collect();
    let mut out = tcptrace::output::table(
        &["SCENARIO", "CASE", "EXPECTED", "GOT", "RESULT", "SECS"],
        rows.iter().map(|r| {
            [
                r.scenario.to_string(),
                r.case.to_string(),
                r.expected.clone(),
                r.got.clone(),
                r.result.to_string(),
                format!("{:.1}", r.seconds),
            ]
        }),
    );
    let notes: Vec<String> = rows
        .iter()
        .filter(|r| !r.detail.is_empty())
        .map(|r| format!("{} {}: {}", r.scenario, r.case, r.detail))
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    out
}

/// Runs the named scenarios (all when empty) and prints the report.
/// Fails when a case that was not skipped failed.
pub fn main(names: &[String], format: TableFormat) -> Result<()> {
    tcptrace::bpf::require_privileges()?;
    let all = scenarios::all();
    let known: Vec<&str> = scenarios::names();
    for n in names {
        if !known.contains(&n.as_str()) {
            bail!("unknown scenario {n:?}: choose from {}", known.join(", "));
        }
    }
    let cases: Vec<&Case> = all
        .iter()
        .filter(|c| names.is_empty() || names.iter().any(|n| n == c.scenario))
        .collect();
    super::install_signal_cleanup()?;
    for gone in super::sweep_stale() {
        eprintln!("tcptrace: removed a stale lab resource: {gone}");
    }
    let started = Instant::now();
    let mut obs = Observer::load()?;
    let mut results = Vec::new();
    for case in cases {
        eprintln!("tcptrace: selftest {} {} ...", case.scenario, case.name);
        let r = case.run(&mut obs);
        eprintln!(
            "tcptrace: selftest {} {}: {}",
            case.scenario,
            case.name,
            r.status()
        );
        results.push(r);
    }
    match format {
        TableFormat::Table => {
            tcptrace::output::print(&format!(
                "{}\n{} passed, {} failed, {} skipped in {:.1} s\n",
                render(&results),
                results.iter().filter(|r| r.status() == "pass").count(),
                results.iter().filter(|r| r.status() == "FAIL").count(),
                results.iter().filter(|r| r.status() == "skipped").count(),
                started.elapsed().as_secs_f64()
            ))?;
        }
        TableFormat::Json => {
            let mut out = NdjsonWriter::new(io::stdout().lock());
            for r in &results {
                out.write(&row(r))?;
            }
            out.flush()?;
        }
    }
    let lost = obs.lost();
    if lost > 0 {
        eprintln!(
            "tcptrace: {lost} kernel events were lost (ring buffer full): other activity on this \
             machine was heavy, and missing events can fail a case"
        );
    }
    let failed = results.iter().filter(|r| r.status() == "FAIL").count();
    if failed > 0 {
        bail!("selftest: {failed} of {} cases failed", results.len());
    }
    Ok(())
}
