//! Raw mode, alternate screen and mouse reports (for the wheel), restored
//! on every way out: drop (quit, signal, error) and panic (a hook restores,
//! then runs the previous hook).
use std::{
    io::{self, Stdout},
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use crossterm::{
    cursor::{Hide, Show},
    event::{DisableMouseCapture, EnableMouseCapture},
    execute,
    terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
};
use ratatui::{Terminal, backend::CrosstermBackend};

/// True while the terminal is in raw mode for us.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

pub(crate) struct TerminalGuard {
    pub(crate) terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl TerminalGuard {
    pub(crate) fn enter() -> anyhow::Result<Self> {
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                previous(info);
            }));
        });
        ACTIVE.store(true, Ordering::SeqCst);
        // From here on a failure restores whatever was already switched.
        let setup = || -> anyhow::Result<Terminal<CrosstermBackend<Stdout>>> {
            enable_raw_mode().context("cannot switch the terminal to raw mode")?;
            // Mouse reports carry the wheel (the detail pane scrolls with it).
            execute!(io::stdout(), EnterAlternateScreen, EnableMouseCapture, Hide)
                .context("cannot switch to the alternate screen")?;
            Terminal::new(CrosstermBackend::new(io::stdout())).context("cannot start the TUI")
        };
        match setup() {
            Ok(terminal) => Ok(Self { terminal }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves raw mode and the alternate screen once; later calls do nothing.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        // Best effort: nothing better to do if the terminal is gone.
        let _ = disable_raw_mode();
        let _ = execute!(
            io::stdout(),
            DisableMouseCapture,
            LeaveAlternateScreen,
            Show
        );
    }
}
