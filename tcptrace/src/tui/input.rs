//! Keys as the app understands them, and the one place that converts
//! crossterm's events into them.
use crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEventKind};

/// A key press, independent of the terminal library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
    Enter,
    Esc,
    Tab,
    Backspace,
    CtrlC,
    /// The mouse wheel, turned up or down.
    WheelUp,
    WheelDown,
}

/// What the terminal reported that the UI loop cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TermEvent {
    Key(Key),
    Resize,
}

impl TermEvent {
    /// `None` for events the UI ignores (clicks, focus, key releases).
    pub(crate) fn from_crossterm(event: &Event) -> Option<Self> {
        match event {
            Event::Key(key) => key_from_crossterm(*key).map(TermEvent::Key),
            Event::Mouse(m) => match m.kind {
                MouseEventKind::ScrollUp => Some(TermEvent::Key(Key::WheelUp)),
                MouseEventKind::ScrollDown => Some(TermEvent::Key(Key::WheelDown)),
                _ => None,
            },
            Event::Resize(..) => Some(TermEvent::Resize),
            _ => None,
        }
    }
}

fn key_from_crossterm(key: KeyEvent) -> Option<Key> {
    if key.kind == KeyEventKind::Release {
        return None;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) {
        return match key.code {
            KeyCode::Char('c') => Some(Key::CtrlC),
            _ => None,
        };
    }
    Some(match key.code {
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::PageUp => Key::PageUp,
        KeyCode::PageDown => Key::PageDown,
        KeyCode::Home => Key::Home,
        KeyCode::End => Key::End,
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        KeyCode::Tab | KeyCode::BackTab => Key::Tab,
        KeyCode::Backspace => Key::Backspace,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use crossterm::event::{MouseButton, MouseEvent};

    use super::*;

    #[test]
    fn converts_keys_and_ignores_the_rest() {
        let press = |code, mods| Event::Key(KeyEvent::new(code, mods));
        assert_eq!(
            TermEvent::from_crossterm(&press(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(TermEvent::Key(Key::CtrlC))
        );
        assert_eq!(
            TermEvent::from_crossterm(&press(KeyCode::Char('j'), KeyModifiers::NONE)),
            Some(TermEvent::Key(Key::Char('j')))
        );
        assert_eq!(
            TermEvent::from_crossterm(&press(KeyCode::Char('x'), KeyModifiers::CONTROL)),
            None
        );
        assert_eq!(
            TermEvent::from_crossterm(&Event::Resize(80, 24)),
            Some(TermEvent::Resize)
        );
        assert_eq!(TermEvent::from_crossterm(&Event::FocusGained), None);
        let mouse = |kind| {
            Event::Mouse(MouseEvent {
                kind,
                column: 3,
                row: 4,
                modifiers: KeyModifiers::NONE,
            })
        };
        assert_eq!(
            TermEvent::from_crossterm(&mouse(MouseEventKind::ScrollDown)),
            Some(TermEvent::Key(Key::WheelDown))
        );
        assert_eq!(
            TermEvent::from_crossterm(&mouse(MouseEventKind::ScrollUp)),
            Some(TermEvent::Key(Key::WheelUp))
        );
        assert_eq!(
            TermEvent::from_crossterm(&mouse(MouseEventKind::Down(MouseButton::Left))),
            None
        );
    }
}
