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
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

pub use app::{App, AppInput, Effect, Header};
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
    ui_loop(Live(rx), new_app(header), true, false).await
}

/// An app for a real terminal: colours unless NO_COLOR is set to
/// something (https://no-color.org).
fn new_app(header: Header) -> App {
    let mut app = App::new(header);
    app.set_colors(std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()));
    app
}

/// The OSC 52 sequence that asks the terminal to put `text` on the
/// clipboard.
fn osc52(text: &str) -> String {
    format!("\x1b]52;c;{}\x07", BASE64.encode(text))
}

/// Does what a key asked for and says how it went.
fn perform(effect: Effect, out: &mut impl std::io::Write) -> String {
    match effect {
        Effect::WriteFile { name, contents } => {
            let path = std::env::current_dir()
                .map(|d| d.join(&name))
                .unwrap_or_else(|_| name.into());
            match std::fs::write(&path, contents) {
                Ok(()) => format!("wrote {}", path.display()),
                Err(e) => format!(
                    "cannot write {}: {e} (start tcptrace in a writable directory)",
                    path.display()
                ),
            }
        }
        Effect::Clipboard(text) => {
            match out
                .write_all(osc52(&text).as_bytes())
                .and_then(|()| out.flush())
            {
                Ok(()) => "fix copied to the clipboard (OSC 52; the terminal must allow it)".into(),
                Err(e) => format!("cannot copy the fix: {e}"),
            }
        }
    }
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
                    if let Some(effect) = app.take_effect() {
                        let note = perform(effect, guard.terminal.backend_mut());
                        app.notice(note);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn osc52_carries_the_text_in_base64() {
        assert_eq!(
            osc52("sysctl -w net.ipv4.ip_local_reserved_ports=30000-32767"),
            "\x1b]52;c;c3lzY3RsIC13IG5ldC5pcHY0LmlwX2xvY2FsX3Jlc2VydmVkX3BvcnRzPTMwMDAwLTMyNzY3\x07"
        );
    }

    #[test]
    fn perform_writes_the_file_and_the_clipboard_sequence() {
        let mut out = Vec::new();
        let note = perform(Effect::Clipboard("fix it".into()), &mut out);
        assert_eq!(out, b"\x1b]52;c;Zml4IGl0\x07");
        assert!(note.starts_with("fix copied"), "{note}");
        let dir = tempfile::tempdir().expect("temp dir");
        let name = dir.path().join("v.json");
        let note = perform(
            Effect::WriteFile {
                name: name.display().to_string(),
                contents: "{}\n".into(),
            },
            &mut out,
        );
        assert_eq!(note, format!("wrote {}", name.display()));
        assert_eq!(std::fs::read_to_string(&name).expect("read back"), "{}\n");
    }
}
