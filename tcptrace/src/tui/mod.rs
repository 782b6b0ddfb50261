//! Live incident TUI (ratatui): a board of causes per pod and destination,
//! the live event feed and a detail pane, fed by the tracer (`run_live`) or a
//! recorded NDJSON file (`run_replay`).
//!
//! Ingestion and drawing are decoupled: records are folded into `App` as
//! they come, and the screen is drawn at most every `FRAME`.
mod app;
mod board;
mod input;
mod render;
mod replay;
mod terminal;
#[cfg(test)]
mod testdata;

use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

pub use app::{App, AppInput, Header};
pub use board::BOARD_CAP;
pub use input::Key;
pub use render::render;
pub use replay::{ReplaySummary, replay_into_app, run_replay};

use crate::model::Record;
use input::TermEvent;
use terminal::TerminalGuard;

/// At most 10 frames per second.
const FRAME: Duration = Duration::from_millis(100);
/// Records folded in per wake-up before keys and frames get a turn.
const DRAIN: usize = 8192;

/// Shows records from the tracer until the user quits, a signal arrives
/// (SIGINT, SIGTERM, SIGHUP) or the sender is dropped.
pub async fn run_live(rx: mpsc::Receiver<Record>, header: Header) -> anyhow::Result<()> {
    ui_loop(Live(rx), App::new(header), true, false).await
}

/// One step of input: a record or what the replay reader has to say.
enum Feed {
    Record(Record),
    Invalid,
    Clock(SystemTime),
    End(String),
}

fn apply(app: &mut App, feed: Feed) {
    match feed {
        Feed::Record(r) => app.handle(AppInput::Record(r)),
        Feed::Invalid => app.invalid_line(),
        Feed::Clock(t) => app.handle(AppInput::Tick(t)),
        Feed::End(note) => app.end_input(note),
    }
}

trait Source {
    async fn recv(&mut self) -> Option<Feed>;
    fn try_recv(&mut self) -> Option<Feed>;
}

struct Live(mpsc::Receiver<Record>);

impl Source for Live {
    async fn recv(&mut self) -> Option<Feed> {
        self.0.recv().await.map(Feed::Record)
    }
    fn try_recv(&mut self) -> Option<Feed> {
        self.0.try_recv().ok().map(Feed::Record)
    }
}

impl Source for mpsc::Receiver<Feed> {
    async fn recv(&mut self) -> Option<Feed> {
        mpsc::Receiver::recv(self).await
    }
    fn try_recv(&mut self) -> Option<Feed> {
        mpsc::Receiver::try_recv(self).ok()
    }
}

/// `wall_clock`: tick the app with the real time (live). `stay_after_end`:
/// keep showing the final state until `q` once the source is exhausted.
async fn ui_loop(
    mut source: impl Source,
    mut app: App,
    wall_clock: bool,
    stay_after_end: bool,
) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut guard = TerminalGuard::enter()?;
    let mut keys = spawn_key_reader()?;
    let mut frames = tokio::time::interval(FRAME);
    frames.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut dirty = true;
    let mut open = true;
    let mut shown_sec = 0;
    loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => break,
            key = keys.recv() => match key {
                Some(Ok(TermEvent::Key(k))) => {
                    app.handle(AppInput::Key(k));
                    if app.should_quit() {
                        break;
                    }
                    dirty = true;
                }
                Some(Ok(TermEvent::Resize)) => dirty = true,
                Some(Err(e)) => anyhow::bail!("cannot read keys from the terminal: {e}"),
                None => anyhow::bail!("the terminal key reader stopped"),
            },
            _ = frames.tick() => {
                if wall_clock {
                    let now = SystemTime::now();
                    app.handle(AppInput::Tick(now));
                    // Ages and sparklines move once a second.
                    let sec = app::unix_secs(now);
                    dirty |= sec != shown_sec;
                    shown_sec = sec;
                }
                if dirty {
                    guard
                        .terminal
                        .draw(|frame| render(frame, &app))
                        .context("cannot draw the TUI")?;
                    dirty = false;
                }
            }
            feed = source.recv(), if open => match feed {
                Some(feed) => {
                    apply(&mut app, feed);
                    for _ in 0..DRAIN {
                        match source.try_recv() {
                            Some(feed) => apply(&mut app, feed),
                            None => break,
                        }
                    }
                    dirty = true;
                }
                None if stay_after_end => open = false,
                None => break,
            },
        }
    }
    drop(guard);
    Ok(())
}

/// Reads the terminal on a thread (crossterm's read blocks) and forwards
/// keys until the receiver is dropped.
fn spawn_key_reader() -> anyhow::Result<mpsc::Receiver<Result<TermEvent, String>>> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::Builder::new()
        .name("tui-keys".into())
        .spawn(move || {
            while !tx.is_closed() {
                let event = match crossterm::event::poll(FRAME) {
                    Ok(false) => continue,
                    Ok(true) => crossterm::event::read(),
                    Err(e) => Err(e),
                };
                let sent = match event {
                    Ok(event) => match TermEvent::from_crossterm(&event) {
                        Some(t) => tx.blocking_send(Ok(t)),
                        None => Ok(()),
                    },
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e.to_string()));
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        })
        .context("cannot start the key reader thread")?;
    Ok(rx)
}
