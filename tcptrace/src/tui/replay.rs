//! `tcptrace replay FILE`: a recorded NDJSON stream shown in the TUI, paced
//! by the records' own `time` (or as fast as possible), then kept on screen.
use std::{
    fs::File,
    io::{self, BufRead, BufReader},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::sync::mpsc;

use super::{App, FRAME, Feed, Header, apply, new_app, ui_loop};
use crate::model::Record;

/// Longer lines are counted as invalid without being kept in memory.
const MAX_LINE: usize = 1 << 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub records: u64,
    pub invalid: u64,
}

/// Reads NDJSON from `path` ("-" = stdin) into the TUI. `speed` divides the
/// gaps between records' times; `None` or 0 replays as fast as possible.
pub async fn run_replay(path: &Path, speed: Option<f64>, header: Header) -> anyhow::Result<()> {
    let speed = match speed {
        None => None,
        Some(0.0) => None,
        Some(s) if s.is_finite() && s > 0.0 => Some(s),
        Some(s) => anyhow::bail!("--speed must be a positive number (times real time), not {s}"),
    };
    let reader: Box<dyn BufRead + Send> = if path == Path::new("-") {
        Box::new(BufReader::new(io::stdin()))
    } else {
        let file = File::open(path)
            .with_context(|| format!("cannot open {}: check the path", path.display()))?;
        Box::new(BufReader::new(file))
    };
    let (tx, rx) = mpsc::channel(4096);
    std::thread::Builder::new()
        .name("tui-replay".into())
        .spawn(move || feed_replay(reader, speed, &tx))
        .context("cannot start the replay reader thread")?;
    ui_loop(rx, new_app(header), false, true).await
}

/// Folds every line of `reader` into `app` without pacing (tests, benchmarks).
pub fn replay_into_app(reader: impl BufRead, app: &mut App) -> io::Result<ReplaySummary> {
    let mut lines = Lines::new(reader);
    let mut summary = ReplaySummary::default();
    while let Some(feed) = lines.next_feed()? {
        match &feed {
            Feed::Invalid => summary.invalid += 1,
            _ => summary.records += 1,
        }
        apply(app, feed);
    }
    apply(app, Feed::End(finished(summary.records)));
    Ok(summary)
}

fn finished(records: u64) -> String {
    format!("replay finished: {records} records (q quits)")
}

/// Runs on its own thread: reads, paces, sends; stops when the UI is gone.
fn feed_replay(reader: impl BufRead, speed: Option<f64>, tx: &mpsc::Sender<Feed>) {
    let mut lines = Lines::new(reader);
    // When the first record was sent, and its time.
    let mut origin: Option<(Instant, SystemTime)> = None;
    let mut records = 0;
    loop {
        let feed = match lines.next_feed() {
            Ok(Some(feed)) => feed,
            Ok(None) => break,
            Err(e) => {
                let _ = tx.blocking_send(Feed::End(format!("replay stopped: read error: {e}")));
                return;
            }
        };
        if let (Some(speed), Feed::Record(record)) = (speed, &feed) {
            let t = record_time(record);
            let (start, t0) = *origin.get_or_insert((Instant::now(), t));
            let due = t
                .duration_since(t0)
                .ok()
                .and_then(|ahead| Duration::try_from_secs_f64(ahead.as_secs_f64() / speed).ok())
                .and_then(|d| start.checked_add(d));
            if let Some(due) = due {
                // Sleep a frame at a time so the clock on screen keeps moving.
                while let Some(left) = due.checked_duration_since(Instant::now()) {
                    if left.is_zero() {
                        break;
                    }
                    std::thread::sleep(left.min(FRAME));
                    let replayed =
                        Duration::try_from_secs_f64(start.elapsed().as_secs_f64() * speed)
                            .ok()
                            .and_then(|d| t0.checked_add(d));
                    if let Some(clock) = replayed
                        && tx.blocking_send(Feed::Clock(clock.min(t))).is_err()
                    {
                        return;
                    }
                }
            }
        }
        if matches!(feed, Feed::Record(_)) {
            records += 1;
        }
        if tx.blocking_send(feed).is_err() {
            return;
        }
    }
    let _ = tx.blocking_send(Feed::End(finished(records)));
}

fn record_time(record: &Record) -> SystemTime {
    match record {
        Record::Event(e) => e.time,
        Record::Verdict(v) => v.time,
        Record::Stats(s) => s.time,
    }
}

/// NDJSON lines as records; blank lines are skipped, anything else that is
/// not a record (bad JSON, bad UTF-8, over `MAX_LINE`) is `Feed::Invalid`.
struct Lines<R> {
    reader: R,
    buf: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    fn new(reader: R) -> Self {
        Self {
            reader,
            buf: Vec::new(),
        }
    }

    fn next_feed(&mut self) -> io::Result<Option<Feed>> {
        loop {
            self.buf.clear();
            let n = <&mut R as io::Read>::take(&mut self.reader, MAX_LINE as u64)
                .read_until(b'\n', &mut self.buf)?;
            if n == 0 {
                return Ok(None);
            }
            if n == MAX_LINE && self.buf.last() != Some(&b'\n') {
                self.skip_rest_of_line()?;
                return Ok(Some(Feed::Invalid));
            }
            let line = self.buf.trim_ascii();
            if line.is_empty() {
                continue;
            }
            return Ok(Some(match serde_json::from_slice::<Record>(line) {
                Ok(record) => Feed::Record(record),
                Err(_) => Feed::Invalid,
            }));
        }
    }

    fn skip_rest_of_line(&mut self) -> io::Result<()> {
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                return Ok(());
            }
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.reader.consume(i + 1);
                    return Ok(());
                }
                None => {
                    let len = chunk.len();
                    self.reader.consume(len);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufWriter, Seek, Write};

    use super::*;
    use crate::{
        model::{Event, EventKind, TcpState},
        tui::testdata::{at, ep, event, header, incident_ndjson, pod},
    };

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/incident.ndjson"
    );

    /// Regenerate with `TCPTRACE_UPDATE_FIXTURES=1`.
    #[test]
    fn committed_fixture_is_the_model_serialized() {
        let fresh = incident_ndjson();
        if std::env::var_os("TCPTRACE_UPDATE_FIXTURES").is_some() {
            std::fs::write(FIXTURE, &fresh).expect("write the fixture");
        }
        let committed = std::fs::read_to_string(FIXTURE).expect("read the fixture");
        assert_eq!(committed, fresh, "run with TCPTRACE_UPDATE_FIXTURES=1");
        let mut app = App::new(header());
        let summary = replay_into_app(committed.as_bytes(), &mut app).expect("replay");
        assert_eq!(
            summary,
            ReplaySummary {
                records: 71,
                invalid: 1
            }
        );
    }

    #[test]
    fn bad_lines_are_counted_not_fatal() {
        let good = serde_json::to_string(&Record::Event(Box::new(event(
            0,
            EventKind::Drop,
            None,
            ep("10.0.0.1", 1),
            ep("10.0.0.2", 2),
        ))))
        .expect("serialize");
        let mut input = Vec::new();
        input.extend_from_slice(b"\n   \nnot json\n{\"type\":\"nope\"}\n\xff\xfe\n");
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.push(b'\n');
        input.extend_from_slice(good.as_bytes());
        // The last line has no newline.
        input.extend_from_slice(format!("\n{good}").as_bytes());
        let mut app = App::new(header());
        let summary = replay_into_app(&input[..], &mut app).expect("replay");
        assert_eq!(
            summary,
            ReplaySummary {
                records: 2,
                invalid: 4
            }
        );
        assert_eq!(app.invalid, 4);
        assert_eq!(app.events(), 2);
        assert!(app.input_note.is_some());
    }

    #[test]
    fn paced_replay_sends_records_in_order_with_the_clock_between() {
        let lines: String = (0..3)
            .map(|i| {
                let e = event(
                    i * 1_000,
                    EventKind::Drop,
                    None,
                    ep("10.0.0.1", 1),
                    ep("10.0.0.2", 2),
                );
                format!(
                    "{}\n",
                    serde_json::to_string(&Record::Event(Box::new(e))).unwrap_or_default()
                )
            })
            .collect();
        let (tx, mut rx) = mpsc::channel(1024);
        // 1 s apart at 500x: 2 ms each.
        let reader = std::thread::spawn(move || feed_replay(lines.as_bytes(), Some(500.0), &tx));
        let mut seen = Vec::new();
        while let Some(feed) = rx.blocking_recv() {
            seen.push(feed);
        }
        reader.join().expect("reader thread");
        let times: Vec<SystemTime> = seen
            .iter()
            .filter_map(|f| match f {
                Feed::Record(r) => Some(record_time(r)),
                _ => None,
            })
            .collect();
        assert_eq!(times, [at(0), at(1_000), at(2_000)]);
        let mut last = at(0);
        for feed in &seen {
            let t = match feed {
                Feed::Clock(t) => *t,
                Feed::Record(r) => record_time(r),
                _ => continue,
            };
            assert!(t >= last, "time goes forward");
            last = t;
        }
        assert!(matches!(seen.last(), Some(Feed::End(note)) if note.contains("3 records")));
    }

    /// `cargo test --release -p tcptrace --lib replay_a_million -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark: run in release"]
    fn replay_a_million_events() {
        const N: u64 = 1_000_000;
        let mut file = tempfile::tempfile().expect("temp file");
        {
            let mut out = BufWriter::new(&mut file);
            for i in 0..N {
                // 2,000 pods x 9 kinds x 50 destinations, 10,000 events/s.
                let kind = EventKind::all()
                    .nth((i % 9) as usize)
                    .unwrap_or(EventKind::Drop);
                let p = pod("load", &format!("worker-{}", i % 2_000));
                let mut e: Event = event(
                    i / 10,
                    kind,
                    Some(p),
                    ep("10.244.0.1", 30_000 + (i % 20_000) as u16),
                    ep("10.96.0.1", 8_000 + (i % 50) as u16),
                );
                e.state = Some(TcpState::Established);
                let line = serde_json::to_string(&Record::Event(Box::new(e))).expect("serialize");
                writeln!(out, "{line}").expect("write");
            }
            out.flush().expect("flush");
        }
        file.rewind().expect("rewind");
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        // Reading and parsing alone, to tell it apart from App::handle.
        let start = Instant::now();
        let mut lines = Lines::new(BufReader::new(&mut file));
        let mut parsed = 0;
        while let Some(feed) = lines.next_feed().expect("read") {
            parsed += u64::from(matches!(feed, Feed::Record(_)));
        }
        let parse_only = start.elapsed();
        assert_eq!(parsed, N);
        file.rewind().expect("rewind");
        let before = vm_hwm_kib();
        let mut app = App::new(header());
        let start = Instant::now();
        let summary = replay_into_app(BufReader::new(file), &mut app).expect("replay");
        let elapsed = start.elapsed();
        assert_eq!(summary.records, N);
        assert!(app.board_len() <= crate::tui::BOARD_CAP);
        let handle = elapsed.saturating_sub(parse_only);
        println!(
            "replayed {N} events ({:.0} MB NDJSON) in {:.2} s = {:.0} events/s \
             (parsing alone {:.2} s; App::handle about {:.2} s = {:.2} us/event); \
             board {} rows; VmHWM {} KiB before, {} KiB after",
            bytes as f64 / 1e6,
            elapsed.as_secs_f64(),
            N as f64 / elapsed.as_secs_f64(),
            parse_only.as_secs_f64(),
            handle.as_secs_f64(),
            handle.as_secs_f64() * 1e6 / N as f64,
            app.board_len(),
            before,
            vm_hwm_kib(),
        );
    }

    fn vm_hwm_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }
}
