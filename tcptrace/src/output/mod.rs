//! Sinks. Every sink reads the same stream of [`Record`]s.
use std::io::{self, Write};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::{
    diagnosis::Finding,
    model::{Record, Verdict},
};

/// Prints text to stdout; a closed pipe (`tcptrace probes | head`) is
/// [`SinkClosed`], not a panic.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(map_io)
}

/// A plain text table: a header row, then one row per item, columns
/// padded to their widest cell, no borders (`tcptrace probes`, `audit`,
/// `selftest`).
pub fn table<R: IntoIterator<Item = String>>(
    header: &[&str],
    rows: impl IntoIterator<Item = R>,
) -> String {
    let mut builder = tabled::builder::Builder::default();
    builder.push_record(header.iter().copied());
    for row in rows {
        builder.push_record(row);
    }
    let mut table = builder.build();
    table
        .with(tabled::settings::Style::blank())
        .with(tabled::settings::Padding::new(0, 1, 0, 0));
    let text = table.to_string();
    let mut out: String = text
        .lines()
        .map(|l| format!("{}\n", l.trim_end()))
        .collect();
    if out.is_empty() {
        out.push('\n');
    }
    out
}

/// Audit findings as aligned plain-text columns, one per line.
pub fn findings_table(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "no findings\n".into();
    }
    table(
        &["NETNS", "CAUSE", "CONFIDENCE", "DETAIL", "FIX"],
        findings.iter().map(|f| {
            [
                f.netns_name.clone().unwrap_or_else(|| f.netns.to_string()),
                f.cause.as_str().into(),
                f.confidence.as_str().into(),
                f.detail.clone(),
                f.fix.clone(),
            ]
        }),
    )
}

/// Where records go: stdout as NDJSON, or the live TUI.
pub trait Sink {
    fn write(&mut self, record: &Record) -> anyhow::Result<()>;
    /// An aggregated verdict whose counts moved between two records of it:
    /// for sinks that show counts as they change (board, metrics); the
    /// NDJSON stream keeps its cadence and ignores it.
    fn live(&mut self, _verdict: &Verdict) -> anyhow::Result<()> {
        Ok(())
    }
    /// Makes written records visible to the reader.
    fn flush(&mut self) -> anyhow::Result<()>;
    /// Records the reader could not take (it fell behind), so far.
    fn dropped(&self) -> u64 {
        0
    }
}

impl<W: Write> Sink for NdjsonWriter<W> {
    fn write(&mut self, record: &Record) -> anyhow::Result<()> {
        NdjsonWriter::write(self, record)
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        NdjsonWriter::flush(self)
    }
}

/// Feeds the TUI. Never blocks tracing: when the UI is this far behind,
/// records are counted as dropped (and shown in stats) instead.
pub struct ChannelSink {
    tx: mpsc::Sender<Record>,
    dropped: u64,
}

impl ChannelSink {
    pub fn new(tx: mpsc::Sender<Record>) -> Self {
        Self { tx, dropped: 0 }
    }
}

impl Sink for ChannelSink {
    fn live(&mut self, verdict: &Verdict) -> anyhow::Result<()> {
        self.write(&Record::Verdict(Box::new(verdict.clone())))
    }

    fn write(&mut self, record: &Record) -> anyhow::Result<()> {
        match self.tx.try_send(record.clone()) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped += 1;
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(anyhow::Error::new(SinkClosed)),
        }
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Writes one JSON object per line. A closed pipe is reported as
/// [`SinkClosed`] so the caller can end quietly.
pub struct NdjsonWriter<W: Write> {
    out: io::BufWriter<W>,
}

/// The reader went away (EPIPE): stop without an error message.
#[derive(Debug, thiserror::Error)]
#[error("output closed")]
pub struct SinkClosed;

impl<W: Write> NdjsonWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out: io::BufWriter::with_capacity(64 * 1024, out),
        }
    }

    pub fn write(&mut self, record: &impl Serialize) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.out, record).map_err(|e| match e.io_error_kind() {
            Some(io::ErrorKind::BrokenPipe) => anyhow::Error::new(SinkClosed),
            _ => anyhow::Error::new(e).context("writing NDJSON"),
        })?;
        self.out.write_all(b"\n").map_err(map_io)
    }

    /// Flushes buffered lines; call after each batch so readers see them.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.out.flush().map_err(map_io)
    }
}

fn map_io(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        anyhow::Error::new(SinkClosed)
    } else {
        anyhow::Error::new(e).context("writing NDJSON")
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::Map;

    use super::*;
    use crate::model::{Cause, Confidence, Stats};

    struct ClosedPipe;
    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    fn stats() -> Record {
        Record::Stats(Stats {
            node: None,
            kernel: None,
            time: UNIX_EPOCH + Duration::from_secs(1),
            uptime_s: 1.5,
            seen: 3,
            lost: 0,
            malformed: 0,
            sink_dropped: 0,
            hooks: vec![],
            unaccounted: crate::model::Unaccounted::default(),
            r#final: true,
            tick: None,
        })
    }

    #[test]
    fn writes_one_object_per_line() {
        let mut buf = Vec::new();
        let mut w = NdjsonWriter::new(&mut buf);
        w.write(&stats()).unwrap();
        w.write(&stats()).unwrap();
        w.flush().unwrap();
        drop(w);
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            r#"{"type":"stats","time":"1970-01-01T00:00:01.000000Z","uptime_s":1.5,"seen":3,"lost":0,"malformed":0,"sink_dropped":0,"hooks":[],"unaccounted":{"ledger_full":0,"repeats":0,"evicted_resets":0},"final":true}"#
        );
    }

    #[test]
    fn channel_sink_counts_what_a_slow_reader_misses_and_stops_when_it_quits() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut sink = ChannelSink::new(tx);
        Sink::write(&mut sink, &stats()).unwrap();
        Sink::write(&mut sink, &stats()).unwrap();
        assert_eq!(sink.dropped(), 1);
        assert_eq!(rx.try_recv().unwrap(), stats());
        drop(rx);
        let err = Sink::write(&mut sink, &stats()).unwrap_err();
        assert!(err.is::<SinkClosed>());
    }

    #[test]
    fn closed_pipe_is_reported_as_sink_closed() {
        let mut w = NdjsonWriter::new(ClosedPipe);
        w.write(&stats()).unwrap();
        let err = w.flush().unwrap_err();
        assert!(err.is::<SinkClosed>());
    }

    #[test]
    fn findings_table_is_aligned() {
        assert_eq!(findings_table(&[]), "no findings\n");
        let finding = |netns, name: Option<&str>, cause, confidence, detail: &str| Finding {
            netns,
            netns_name: name.map(String::from),
            cause,
            confidence,
            detail: detail.into(),
            fix: "fix it".into(),
            evidence: Map::new(),
        };
        let t = findings_table(&[
            finding(
                4026531840,
                None,
                Cause::IdleTimeout,
                Confidence::Possible,
                "long detail here",
            ),
            finding(
                7,
                Some("default/client"),
                Cause::PortExhaustion,
                Confidence::Likely,
                "short",
            ),
        ]);
        let expected = "\
NETNS           CAUSE            CONFIDENCE  DETAIL            FIX
4026531840      idle_timeout     possible    long detail here  fix it
default/client  port_exhaustion  likely      short             fix it
";
        assert_eq!(t, expected);
    }
}
