//! Incident state: everything the TUI shows, built from records, keys and
//! clock ticks. No I/O here: `App::handle` is the only way in and
//! `render::render` only reads.
use std::{
    cell::Cell,
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::model::{Event, Record, Verdict};

use super::{
    board::{
        Board, Key as RowKey, Label, Pair, Row, RowEnds, Spark, Subject, subject_label,
        target_label,
    },
    input::Key,
};

/// Events kept for the live feed.
pub const FEED_CAP: usize = 500;
/// Connections whose last events are kept for the detail pane.
const CONN_CAP: usize = 4_096;
/// Events kept per connection.
const CONN_EVENTS: usize = 6;

/// Facts about the node the caller knows before the first record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub node: String,
    pub kernel: String,
    /// Live probe tiers as (hook, tier), e.g. ("tcp_retransmit_skb", "tracepoint").
    pub probes: Vec<(String, String)>,
}

impl Header {
    /// Fills what is still unknown (a replay's header) from a stats record.
    fn learn(&mut self, stats: &crate::model::Stats) {
        for (mine, theirs) in [
            (&mut self.node, &stats.node),
            (&mut self.kernel, &stats.kernel),
        ] {
            if let (true, Some(value)) = (mine.is_empty(), theirs) {
                mine.clone_from(value);
            }
        }
    }

    /// This machine's host name and kernel release, for a live session.
    pub fn local(probes: Vec<(String, String)>) -> Self {
        let read = |path| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        Self {
            node: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
            probes,
        }
    }
}

pub enum AppInput {
    Record(Record),
    Key(Key),
    /// The current time: ages and sparklines move with it.
    Tick(SystemTime),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    Recency,
    Count,
}

/// Which pane the movement keys act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Focus {
    Board,
    /// The detail pane when it is open, else the feed.
    Bottom,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Typing the filter text.
    Filter,
    Help,
}

/// Something to do outside the app, asked for by a key: the UI loop does
/// it and reports back with `App::notice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Write `contents` to a file `name` in the current directory.
    WriteFile { name: String, contents: String },
    /// Put `text` on the clipboard through the terminal (OSC 52).
    Clipboard(String),
}

/// The detail pane as last drawn: a page of lines and the largest scroll
/// that still shows its last line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DetailView {
    pub page: u16,
    pub max_scroll: u16,
}

/// Lines the mouse wheel scrolls the detail pane by.
const WHEEL_LINES: u16 = 3;

/// A connection as far as the detail pane can tell: source ip, destination.
type ConnKey = (IpAddr, IpAddr, u16);

struct Conn {
    events: VecDeque<Arc<Event>>,
    touched: u64,
}

pub struct App {
    pub(super) header: Header,
    /// The newest time seen in records or ticks.
    pub(super) now: SystemTime,
    pub(super) events: u64,
    pub(super) events_with_pod: u64,
    pub(super) verdicts: u64,
    /// Input lines that were not a record (replay).
    pub(super) invalid: u64,
    pub(super) stats: Option<crate::model::Stats>,
    /// Events per second, all kinds.
    pub(super) rate: Spark,
    /// Set when the input has ended ("replay finished").
    pub(super) input_note: Option<String>,
    board: Board,
    /// Newest first.
    pub(super) feed: VecDeque<Arc<Event>>,
    conns: HashMap<ConnKey, Conn>,
    conn_touch: u64,
    pub(super) sort: Sort,
    pub(super) focus: Focus,
    pub(super) mode: Mode,
    pub(super) detail_open: bool,
    pub(super) filter: String,
    /// Row id the user picked; `None` follows the top row.
    selected: Option<u64>,
    pub(super) feed_scroll: usize,
    pub(super) detail_scroll: u16,
    /// Written by `render` (the only state it writes): the pane's size
    /// decides how far it scrolls.
    pub(super) detail_view: Cell<DetailView>,
    pub(super) paused: bool,
    /// Colours on (off with NO_COLOR): the marks say the same without them.
    pub(super) colors: bool,
    /// What the last command did ("wrote /path"), until the next key.
    pub(super) notice: Option<String>,
    effect: Option<Effect>,
    quit: bool,
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

enum Move {
    By(isize),
    First,
    Last,
}

impl App {
    pub fn new(header: Header) -> Self {
        Self {
            header,
            now: UNIX_EPOCH,
            events: 0,
            events_with_pod: 0,
            verdicts: 0,
            invalid: 0,
            stats: None,
            rate: Spark::new(),
            input_note: None,
            board: Board::default(),
            conn_touch: 0,
            feed: VecDeque::with_capacity(FEED_CAP + 1),
            conns: HashMap::new(),
            sort: Sort::Recency,
            focus: Focus::Board,
            mode: Mode::Normal,
            detail_open: false,
            filter: String::new(),
            selected: None,
            feed_scroll: 0,
            detail_scroll: 0,
            detail_view: Cell::new(DetailView::default()),
            paused: false,
            colors: true,
            notice: None,
            effect: None,
            quit: false,
        }
    }

    /// Colours on or off (NO_COLOR); marks and text stay the same.
    pub fn set_colors(&mut self, on: bool) {
        self.colors = on;
    }

    /// The effect the last key asked for, once.
    pub fn take_effect(&mut self) -> Option<Effect> {
        self.effect.take()
    }

    /// Shows what an effect did, until the next key.
    pub fn notice(&mut self, text: impl Into<String>) {
        self.notice = Some(text.into());
    }

    pub fn handle(&mut self, input: AppInput) {
        match input {
            AppInput::Record(record) => self.ingest(record),
            AppInput::Key(key) => self.key(key),
            AppInput::Tick(t) => self.advance(t),
        }
    }

    /// Counts an input line that was not a record.
    pub fn invalid_line(&mut self) {
        self.invalid += 1;
    }

    /// Notes that no more records will come, with why.
    pub fn end_input(&mut self, note: impl Into<String>) {
        self.input_note = Some(note.into());
    }

    pub fn should_quit(&self) -> bool {
        self.quit
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn board_len(&self) -> usize {
        self.board.len()
    }

    fn advance(&mut self, t: SystemTime) {
        self.now = self.now.max(t);
    }

    fn ingest(&mut self, record: Record) {
        match record {
            Record::Event(e) => self.ingest_event(e),
            Record::Verdict(v) => self.ingest_verdict(v),
            Record::Stats(s) => {
                self.advance(s.time);
                self.header.learn(&s);
                self.stats = Some(s);
            }
        }
    }

    fn ingest_event(&mut self, event: Box<Event>) {
        self.advance(event.time);
        // A storm's counted repeats are that many failures.
        let n = event.count.unwrap_or(1);
        self.events += n;
        if event.pod.is_some() {
            self.events_with_pod += n;
        }
        self.rate.add(unix_secs(event.time), n);
        let event: Arc<Event> = Arc::from(event);
        self.remember_connection(&event);
        if !self.paused {
            self.feed.push_front(event);
            self.feed.truncate(FEED_CAP);
        }
    }

    fn ingest_verdict(&mut self, v: Box<Verdict>) {
        self.advance(v.time);
        self.verdicts += 1;
        let pair = Pair {
            subject: Subject::of(v.pod.as_ref(), v.netns),
            dst: (v.dst.ip, v.dst.port),
        };
        let key = RowKey {
            pair,
            label: Label::of(&v),
        };
        let slot = match self.board.find(key) {
            Some(slot) => slot,
            None => self.board.insert(
                key,
                RowEnds {
                    subject: subject_label(&v),
                    src: v.src.clone(),
                    dst: v.dst.clone(),
                    target: target_label(&v),
                },
                v.first_seen,
            ),
        };
        self.board.touch(slot);
        let Some(row) = self.board.row_mut(slot) else {
            return;
        };
        let before = row.count;
        row.count = row.verdict_count.update(v.first_seen, v.count);
        row.spark
            .add(unix_secs(v.last_seen), row.count.saturating_sub(before));
        row.first_seen = row.first_seen.min(v.first_seen);
        row.last_seen = row.last_seen.max(v.last_seen);
        row.confidence = Some(v.confidence);
        row.src = v.src.clone();
        row.verdict = Some(v);
    }

    fn remember_connection(&mut self, e: &Arc<Event>) {
        self.conn_touch += 1;
        let key = (e.src.ip, e.dst.ip, e.dst.port);
        if !self.conns.contains_key(&key) && self.conns.len() >= CONN_CAP {
            let mut touched: Vec<u64> = self.conns.values().map(|c| c.touched).collect();
            let (_, &mut keep_from, _) = touched.select_nth_unstable(CONN_CAP / 10);
            self.conns.retain(|_, c| c.touched >= keep_from);
        }
        let conn = self.conns.entry(key).or_insert_with(|| Conn {
            events: VecDeque::with_capacity(CONN_EVENTS + 1),
            touched: 0,
        });
        conn.touched = self.conn_touch;
        conn.events.push_front(Arc::clone(e));
        conn.events.truncate(CONN_EVENTS);
    }

    /// The last events of the row's connection, newest first. A verdict with
    /// a source port names one connection; other rows match any port. A
    /// verdict without a destination (a bind, a namespace's counters) has
    /// no connection: only events of its own namespace without one match.
    pub(crate) fn connection_events(&self, row: &Row) -> Vec<&Event> {
        let port = if row.verdict.is_some() {
            row.src.port
        } else {
            0
        };
        let netns = row
            .verdict
            .as_ref()
            .filter(|_| row.dst.is_unspecified())
            .map(|v| v.netns);
        self.conns
            .get(&(row.src.ip, row.dst.ip, row.dst.port))
            .map(|c| {
                c.events
                    .iter()
                    .filter(|e| port == 0 || e.src.port == port)
                    .filter(|e| netns.is_none_or(|n| e.netns == n))
                    .map(|e| &**e)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn filter_terms(&self) -> Vec<String> {
        self.filter
            .split_whitespace()
            .map(str::to_lowercase)
            .collect()
    }

    /// Board rows after the filter, in display order.
    pub(crate) fn visible_rows(&self) -> Vec<&Row> {
        let terms = self.filter_terms();
        let mut rows: Vec<&Row> = self
            .board
            .rows()
            .filter(|r| terms.iter().all(|t| r.haystack.contains(t.as_str())))
            .collect();
        match self.sort {
            Sort::Recency => {
                rows.sort_by(|a, b| {
                    (b.last_seen, b.count, a.id).cmp(&(a.last_seen, a.count, b.id))
                });
            }
            Sort::Count => {
                rows.sort_by(|a, b| {
                    (b.count, b.last_seen, a.id).cmp(&(a.count, a.last_seen, b.id))
                });
            }
        }
        rows
    }

    /// Index of the selected row in `rows` (the top row unless the user
    /// picked one that is still visible).
    pub(crate) fn selected_index(&self, rows: &[&Row]) -> Option<usize> {
        if rows.is_empty() {
            return None;
        }
        Some(
            self.selected
                .and_then(|id| rows.iter().position(|r| r.id == id))
                .unwrap_or(0),
        )
    }

    /// Feed events that pass the filter, newest first.
    pub(crate) fn visible_feed(&self) -> Vec<&Event> {
        let terms = self.filter_terms();
        self.feed
            .iter()
            .map(|e| &**e)
            .filter(|e| {
                terms.is_empty() || {
                    let text = event_haystack(e);
                    terms.iter().all(|t| text.contains(t.as_str()))
                }
            })
            .collect()
    }

    /// The selected row, if any.
    fn selected_row(&self) -> Option<&Row> {
        let rows = self.visible_rows();
        self.selected_index(&rows).map(|i| rows[i])
    }

    /// Asks for the selected verdict, its evidence and its connection's
    /// events to be written to a file named after it.
    fn export_selected(&mut self) {
        let Some(row) = self.selected_row() else {
            self.notice = Some("no row selected: nothing to write".into());
            return;
        };
        let Some(v) = &row.verdict else {
            self.notice = Some("this row has no verdict yet: nothing to write".into());
            return;
        };
        let events = self.connection_events(row);
        let document = serde_json::json!({ "verdict": v, "events": events });
        let effect = match serde_json::to_string_pretty(&document) {
            Ok(mut contents) => {
                contents.push('\n');
                Effect::WriteFile {
                    name: export_name(v, &row.subject),
                    contents,
                }
            }
            Err(e) => {
                self.notice = Some(format!("cannot serialize the verdict: {e}"));
                return;
            }
        };
        self.effect = Some(effect);
    }

    fn copy_fix(&mut self) {
        let fix = self
            .selected_row()
            .and_then(|r| r.verdict.as_ref())
            .map(|v| v.fix.clone());
        match fix {
            Some(fix) => self.effect = Some(Effect::Clipboard(fix)),
            None => self.notice = Some("no verdict selected: no fix to copy".into()),
        }
    }

    /// Scrolls the open detail pane, within what was last drawn.
    fn scroll_detail(&mut self, by: i32) {
        let max = self.detail_view.get().max_scroll;
        let to = (i32::from(self.detail_scroll) + by).clamp(0, i32::from(max));
        self.detail_scroll = u16::try_from(to).unwrap_or(0);
    }

    fn key(&mut self, key: Key) {
        if key == Key::CtrlC {
            self.quit = true;
            return;
        }
        self.notice = None;
        if self.detail_open && self.mode == Mode::Normal {
            let page = i32::from(self.detail_view.get().page.max(1));
            let wheel = i32::from(WHEEL_LINES);
            match key {
                Key::PageDown => return self.scroll_detail(page),
                Key::PageUp => return self.scroll_detail(-page),
                Key::WheelDown => return self.scroll_detail(wheel),
                Key::WheelUp => return self.scroll_detail(-wheel),
                _ => {}
            }
        }
        match self.mode {
            Mode::Help => self.mode = Mode::Normal,
            Mode::Filter => match key {
                Key::Char(c) => self.filter.push(c),
                Key::Backspace => {
                    self.filter.pop();
                }
                Key::Enter => self.mode = Mode::Normal,
                Key::Esc => {
                    self.filter.clear();
                    self.mode = Mode::Normal;
                }
                other => self.navigate(other),
            },
            Mode::Normal => match key {
                Key::Char('q') => self.quit = true,
                Key::Char('?') => self.mode = Mode::Help,
                Key::Char('/') => self.mode = Mode::Filter,
                Key::Char('s') => {
                    self.sort = match self.sort {
                        Sort::Recency => Sort::Count,
                        Sort::Count => Sort::Recency,
                    }
                }
                Key::Char('p') => self.paused = !self.paused,
                Key::Char('w') => self.export_selected(),
                Key::Char('c') => self.copy_fix(),
                Key::Tab => {
                    self.focus = match self.focus {
                        Focus::Board => Focus::Bottom,
                        Focus::Bottom => Focus::Board,
                    }
                }
                Key::Enter if self.focus == Focus::Board => {
                    let rows = self.visible_rows();
                    if let Some(i) = self.selected_index(&rows) {
                        self.selected = Some(rows[i].id);
                        self.detail_open = !self.detail_open;
                        self.detail_scroll = 0;
                    }
                }
                Key::Esc if self.detail_open => {
                    self.detail_open = false;
                    self.focus = Focus::Board;
                }
                Key::Esc => self.filter.clear(),
                other => self.navigate(other),
            },
        }
    }

    fn navigate(&mut self, key: Key) {
        let step = match key {
            Key::Up | Key::Char('k') | Key::WheelUp => Move::By(-1),
            Key::Down | Key::Char('j') | Key::WheelDown => Move::By(1),
            Key::PageUp => Move::By(-10),
            Key::PageDown => Move::By(10),
            Key::Home => Move::First,
            Key::End => Move::Last,
            _ => return,
        };
        let moved = |cur: usize, len: usize| match step {
            Move::By(d) => cur.saturating_add_signed(d).min(len.saturating_sub(1)),
            Move::First => 0,
            Move::Last => len.saturating_sub(1),
        };
        match (self.focus, self.detail_open) {
            (Focus::Board, _) => {
                let rows = self.visible_rows();
                if let Some(cur) = self.selected_index(&rows) {
                    self.selected = Some(rows[moved(cur, rows.len())].id);
                    self.detail_scroll = 0;
                }
            }
            (Focus::Bottom, true) => {
                let max = self.detail_view.get().max_scroll;
                self.detail_scroll = moved(self.detail_scroll.into(), usize::from(max) + 1)
                    .try_into()
                    .unwrap_or(max);
            }
            (Focus::Bottom, false) => {
                self.feed_scroll = moved(self.feed_scroll, self.feed.len());
            }
        }
    }
}

/// "tcptrace-<cause>-<subject>-<last seen, UTC>.json", with anything but
/// letters, digits, '.' and '-' in the subject as '-'.
fn export_name(v: &Verdict, subject: &str) -> String {
    let mut slug = String::new();
    for c in subject.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            c.to_ascii_lowercase()
        } else {
            '-'
        };
        if !(c == '-' && slug.ends_with('-')) {
            slug.push(c);
        }
    }
    let t = time::OffsetDateTime::from(v.last_seen);
    format!(
        "tcptrace-{}-{}-{:04}{:02}{:02}T{:02}{:02}{:02}Z.json",
        v.cause.as_str(),
        slug.trim_matches('-'),
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Lowercase text of an event the filter matches against.
fn event_haystack(e: &Event) -> String {
    let mut s = format!("{} {} {}", e.kind.as_str(), e.src, e.dst);
    if let Some(p) = &e.pod {
        s.push_str(&format!(" {p}"));
    }
    let state = e.state.map(|x| x.as_str().to_string());
    let errno = e.errno.map(|x| x.to_string());
    let reason = e.reason.as_ref().map(ToString::to_string);
    for extra in [&e.netns_name, &e.comm, &errno, &reason, &state]
        .into_iter()
        .flatten()
    {
        s.push(' ');
        s.push_str(extra);
    }
    s.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tui::board::{BOARD_CAP, SPARK_SECS};
    use crate::{
        model::{Cause, Endpoint, EventKind},
        tui::testdata::{at, ep, event, header, pod},
    };

    /// A reset of pod `pod_name`'s connection to `port` at `ms`, and the
    /// unexplained verdict (first seen at `first`) that counts it as its
    /// `count`th occurrence.
    fn failure(app: &mut App, (ms, first): (u64, u64), pod_name: &str, port: u16, count: u64) {
        let ev = event(
            ms,
            EventKind::ResetReceived,
            Some(pod("ns", pod_name)),
            ep("10.0.0.1", 40000),
            ep("10.0.0.2", port),
        );
        app.handle(AppInput::Record(Record::Event(Box::new(ev))));
        let mut v = crate::tui::testdata::incident()
            .into_iter()
            .find_map(|r| match r {
                Record::Verdict(v) if v.cause == Cause::Unexplained => Some(v),
                _ => None,
            })
            .expect("the incident has an unexplained verdict");
        v.pod = Some(pod("ns", pod_name));
        v.src = ep("10.0.0.1", 40000);
        v.dst = ep("10.0.0.2", port);
        v.count = count;
        v.first_seen = at(first);
        v.last_seen = at(ms);
        v.time = at(ms);
        app.handle(AppInput::Record(Record::Verdict(v)));
    }

    fn press(app: &mut App, keys: &[Key]) {
        for &k in keys {
            app.handle(AppInput::Key(k));
        }
    }

    fn subjects(app: &App) -> Vec<String> {
        app.visible_rows()
            .iter()
            .map(|r| r.subject.clone())
            .collect()
    }

    fn selected(app: &App) -> Option<String> {
        let rows = app.visible_rows();
        app.selected_index(&rows).map(|i| rows[i].subject.clone())
    }

    #[test]
    fn a_replay_header_is_learned_from_the_stream_s_stats() {
        let stats = |node: Option<&str>, kernel: Option<&str>| {
            AppInput::Record(Record::Stats(crate::model::Stats {
                node: node.map(str::to_string),
                kernel: kernel.map(str::to_string),
                time: at(5_000),
                uptime_s: 5.0,
                seen: 0,
                lost: 0,
                malformed: 0,
                sink_dropped: 0,
                hooks: Vec::new(),
                unaccounted: crate::model::Unaccounted::default(),
                tick: None,
                r#final: false,
            }))
        };
        let mut replay = App::new(Header::default());
        replay.handle(stats(None, None));
        assert_eq!(
            (replay.header.node.as_str(), replay.header.kernel.as_str()),
            ("", "")
        );
        replay.handle(stats(Some("kind-worker"), Some("6.18.0")));
        replay.handle(stats(Some("kind-worker2"), Some("6.1.0")));
        assert_eq!(
            (replay.header.node.as_str(), replay.header.kernel.as_str()),
            ("kind-worker", "6.18.0")
        );
        // A live session's header is its own machine's.
        let mut live = App::new(header());
        let before = (live.header.node.clone(), live.header.kernel.clone());
        live.handle(stats(Some("kind-worker"), Some("6.18.0")));
        assert_eq!(
            (live.header.node.clone(), live.header.kernel.clone()),
            before
        );
    }

    /// a: 3 occurrences (oldest), b: 1 (newest).
    fn two_rows() -> App {
        let mut app = App::new(header());
        for (ms, count) in [(0, 1), (1, 2), (2, 3)] {
            failure(&mut app, (ms, 0), "a", 80, count);
        }
        failure(&mut app, (5_000, 5_000), "b", 443, 1);
        app
    }

    #[test]
    fn selection_moves_and_stays_on_its_row() {
        let mut app = two_rows();
        assert_eq!(selected(&app).as_deref(), Some("ns/b"));
        press(&mut app, &[Key::Char('j'), Key::Down, Key::Down]);
        assert_eq!(selected(&app).as_deref(), Some("ns/a"));
        // A newer occurrence moves row a to the top; the selection follows it.
        failure(&mut app, (9_000, 0), "a", 80, 4);
        assert_eq!(subjects(&app), ["ns/a", "ns/b"]);
        assert_eq!(selected(&app).as_deref(), Some("ns/a"));
        press(&mut app, &[Key::End, Key::Char('k'), Key::Up]);
        assert_eq!(selected(&app).as_deref(), Some("ns/a"));
    }

    #[test]
    fn sort_toggles_between_recency_and_count() {
        let mut app = two_rows();
        assert_eq!(subjects(&app), ["ns/b", "ns/a"]);
        press(&mut app, &[Key::Char('s')]);
        assert_eq!(app.sort, Sort::Count);
        assert_eq!(subjects(&app), ["ns/a", "ns/b"]);
        press(&mut app, &[Key::Char('s')]);
        assert_eq!(subjects(&app), ["ns/b", "ns/a"]);
    }

    #[test]
    fn filter_matches_pod_cause_and_port_and_esc_clears_it() {
        let mut app = two_rows();
        press(
            &mut app,
            &[
                Key::Char('/'),
                Key::Char('4'),
                Key::Char('4'),
                Key::Char('3'),
            ],
        );
        assert_eq!(app.mode, Mode::Filter);
        assert_eq!(subjects(&app), ["ns/b"]);
        // Typed q and j are text while filtering, not commands.
        press(
            &mut app,
            &[
                Key::Backspace,
                Key::Backspace,
                Key::Backspace,
                Key::Char('q'),
            ],
        );
        assert!(!app.should_quit());
        assert_eq!(app.filter, "q");
        assert!(subjects(&app).is_empty());
        press(&mut app, &[Key::Backspace]);
        for c in "unexplained rst in ns/a".chars() {
            press(&mut app, &[Key::Char(c)]);
        }
        press(&mut app, &[Key::Enter]);
        assert_eq!(app.mode, Mode::Normal);
        assert_eq!(subjects(&app), ["ns/a"]);
        press(&mut app, &[Key::Esc]);
        assert_eq!(app.filter, "");
        assert_eq!(subjects(&app).len(), 2);
    }

    #[test]
    fn pause_freezes_the_feed_but_not_the_counts() {
        let mut app = two_rows();
        press(&mut app, &[Key::Char('p')]);
        failure(&mut app, (6_000, 5_000), "b", 443, 2);
        assert_eq!(app.feed.len(), 4);
        assert_eq!(app.events(), 5);
        assert_eq!(app.visible_rows()[0].count, 2);
        press(&mut app, &[Key::Char('p')]);
        failure(&mut app, (7_000, 5_000), "b", 443, 3);
        assert_eq!(app.feed.len(), 5);
    }

    #[test]
    fn enter_tab_help_and_quit() {
        let mut app = App::new(header());
        press(&mut app, &[Key::Enter]);
        assert!(!app.detail_open, "nothing to show without rows");
        let mut app = two_rows();
        press(&mut app, &[Key::Enter]);
        assert!(app.detail_open);
        press(&mut app, &[Key::Tab]);
        assert_eq!(app.focus, Focus::Bottom);
        // As if drawn with 5 lines of a 12-line text.
        app.detail_view.set(DetailView {
            page: 5,
            max_scroll: 7,
        });
        press(&mut app, &[Key::Char('j'), Key::Char('j')]);
        assert_eq!(app.detail_scroll, 2);
        press(&mut app, &[Key::PageDown]);
        assert_eq!(app.detail_scroll, 7, "a page, up to the last line");
        press(&mut app, &[Key::WheelUp, Key::End]);
        assert_eq!(app.detail_scroll, 7);
        press(&mut app, &[Key::PageUp, Key::WheelUp]);
        assert_eq!(app.detail_scroll, 0);
        press(&mut app, &[Key::WheelDown]);
        assert_eq!(app.detail_scroll, 3);
        press(&mut app, &[Key::Home]);
        assert_eq!(app.detail_scroll, 0);
        press(&mut app, &[Key::Esc]);
        assert!(!app.detail_open);
        assert_eq!(app.focus, Focus::Board);
        press(&mut app, &[Key::Char('?')]);
        assert_eq!(app.mode, Mode::Help);
        press(&mut app, &[Key::Char('q')]);
        assert_eq!(app.mode, Mode::Normal, "any key closes help");
        assert!(!app.should_quit());
        press(&mut app, &[Key::Char('q')]);
        assert!(app.should_quit());
        let mut app = two_rows();
        press(&mut app, &[Key::Char('/'), Key::CtrlC]);
        assert!(app.should_quit(), "Ctrl-C quits even while filtering");
    }

    #[test]
    fn the_board_holds_verdicts_only_and_sums_their_aggregates() {
        let mut app = two_rows();
        let mut v = crate::tui::testdata::incident()
            .into_iter()
            .find_map(|r| match r {
                Record::Verdict(v) => Some(v),
                _ => None,
            })
            .expect("the incident has verdicts");
        v.pod = Some(pod("ns", "a"));
        v.src = ep("10.0.0.1", 40000);
        v.dst = ep("10.0.0.2", 80);
        v.count = 2;
        v.first_seen = at(0);
        v.last_seen = at(8_000);
        app.handle(AppInput::Record(Record::Verdict(v.clone())));
        // The same aggregate again: an update, not new occurrences.
        v.count = 3;
        app.handle(AppInput::Record(Record::Verdict(v.clone())));
        // A new aggregate adds up.
        v.first_seen = at(9_000);
        v.count = 1;
        app.handle(AppInput::Record(Record::Verdict(v)));
        let rows = app.visible_rows();
        let labels: Vec<_> = rows
            .iter()
            .map(|r| (r.subject.as_str(), r.label.name(), r.count))
            .collect();
        assert_eq!(
            labels,
            [
                ("ns/a", "idle_timeout".to_string(), 4),
                ("ns/b", "unexplained rst in".to_string(), 1),
                ("ns/a", "unexplained rst in".to_string(), 3),
            ]
        );
        assert_eq!(app.verdicts, 7);
        // The verdict's connection events are kept for the detail pane.
        assert_eq!(app.connection_events(rows[0]).len(), 3);
    }

    #[test]
    fn board_and_connections_stay_bounded() {
        let mut app = App::new(header());
        let n = BOARD_CAP as u64 + 10;
        let template = crate::tui::testdata::incident()
            .into_iter()
            .find_map(|r| match r {
                Record::Verdict(v) => Some(v),
                _ => None,
            })
            .expect("the incident has verdicts");
        for i in 0..n {
            let e = event(
                i,
                EventKind::Drop,
                None,
                Endpoint::new(IpAddr::from([10, 1, (i >> 8) as u8, i as u8]), 1),
                ep("10.0.0.2", 80),
            );
            app.handle(AppInput::Record(Record::Event(Box::new(e.clone()))));
            let mut v = template.clone();
            v.pod = None;
            v.netns = 7;
            v.dst = e.src;
            v.count = 1;
            v.first_seen = at(i);
            v.last_seen = at(i);
            v.time = at(i);
            app.handle(AppInput::Record(Record::Verdict(v)));
        }
        assert!(app.board_len() <= BOARD_CAP);
        assert!(app.conns.len() <= CONN_CAP);
        assert_eq!(app.feed.len(), FEED_CAP);
        assert_eq!(app.events(), n);
        // The newest row survived the eviction.
        assert_eq!(app.visible_rows()[0].last_seen, at(n - 1));
    }

    #[test]
    fn spark_buckets_roll_over_and_ignore_the_too_old() {
        let mut s = Spark::new();
        s.add(1_000, 2);
        s.add(1_000, 1);
        s.add(1_030, 5);
        assert_eq!(s.at(1_000), 3);
        s.add(1_061, 1);
        assert_eq!(s.at(1_000), 0, "older than 60 s");
        assert_eq!(s.at(1_030), 5);
        s.add(1_001, 7);
        assert_eq!(s.at(1_001), 0);
        let series = s.series(1_061);
        assert_eq!(series[SPARK_SECS - 1], 1);
        assert_eq!(series[SPARK_SECS - 1 - 31], 5);
        s.add(5_000, 1);
        assert_eq!(s.series(5_000).iter().sum::<u32>(), 1);
    }

    #[test]
    fn ticks_move_the_clock_forward_only() {
        let mut app = App::new(header());
        app.handle(AppInput::Tick(at(10_000)));
        app.handle(AppInput::Tick(at(5_000)));
        assert_eq!(app.now, at(10_000));
    }

    fn replayed(ndjson: &str) -> App {
        let mut app = App::new(header());
        crate::tui::replay_into_app(ndjson.as_bytes(), &mut app).expect("in-memory replay");
        app
    }

    fn select(app: &mut App, target: &str) {
        let rows = app.visible_rows();
        let i = rows
            .iter()
            .position(|r| r.target == target)
            .unwrap_or_else(|| panic!("a row to {target}"));
        press(app, &vec![Key::Down; i]);
    }

    #[test]
    fn w_writes_the_verdict_with_its_connection_events_and_c_copies_the_fix() {
        let mut app = replayed(&crate::tui::testdata::incident_ndjson());
        select(&mut app, "batch/object-store:443");
        press(&mut app, &[Key::Char('w')]);
        let Some(Effect::WriteFile { name, contents }) = app.take_effect() else {
            panic!("w asks for a file");
        };
        assert_eq!(app.take_effect(), None, "once");
        assert_eq!(
            name,
            "tcptrace-port_exhaustion-batch-report-exporter-58f6c9d7b-9wq7t-20250314T092652Z.json"
        );
        let doc: serde_json::Value = serde_json::from_str(&contents).expect("JSON");
        assert_eq!(doc["verdict"]["cause"], "port_exhaustion");
        assert_eq!(doc["verdict"]["count"], 40);
        assert_eq!(doc["verdict"]["evidence"]["time_wait"], 61);
        let events = doc["events"].as_array().expect("events");
        assert_eq!(events.len(), CONN_EVENTS);
        assert!(events.iter().all(|e| e["kind"] == "connect_error"
            && e["errno"] == "EADDRNOTAVAIL"
            && e["dst"]["ip"] == "10.96.120.5"));
        // The verdict round-trips.
        let back: Verdict = serde_json::from_value(doc["verdict"].clone()).expect("a verdict");
        assert_eq!(back.cause, Cause::PortExhaustion);
        press(&mut app, &[Key::Char('c')]);
        assert_eq!(
            app.take_effect(),
            Some(Effect::Clipboard(
                "reuse connections (HTTP keep-alive pool) or widen net.ipv4.ip_local_port_range in the pod netns, e.g. 10240 65535".into()
            ))
        );
        app.notice("wrote /tmp/x.json");
        assert_eq!(app.notice.as_deref(), Some("wrote /tmp/x.json"));
        press(&mut app, &[Key::Down]);
        assert_eq!(app.notice, None, "a key clears the notice");
        let mut empty = App::new(header());
        press(&mut empty, &[Key::Char('w'), Key::Char('c')]);
        assert_eq!(empty.take_effect(), None);
        assert_eq!(
            empty.notice.as_deref(),
            Some("no verdict selected: no fix to copy")
        );
    }

    #[test]
    fn rows_without_a_destination_say_what_they_are_about() {
        let app = replayed(crate::tui::testdata::LAB_NDJSON);
        let rows = app.visible_rows();
        let about = |cause: Cause| -> Vec<(&str, &str)> {
            let mut v: Vec<_> = rows
                .iter()
                .filter(|r| r.label.cause == cause && r.dst.is_unspecified())
                .map(|r| (r.subject.as_str(), r.target.as_str()))
                .collect();
            v.sort_unstable();
            v
        };
        assert_eq!(
            about(Cause::ConntrackTableFull),
            [(
                "netns tcptrace-lab-15542-11-node",
                "conntrack table of netns tcptrace-lab-15542-11-node"
            )]
        );
        assert_eq!(
            about(Cause::PortExhaustion),
            [("netns tcptrace-lab-15542-1-client", "bind() to 0.0.0.0:0")]
        );
        assert!(
            rows.iter()
                .all(|r| !r.target.contains("0.0.0.0:0") || r.target.starts_with("bind() to"))
        );
        // Neither has a connection: only their own namespace's events
        // without one are theirs (the bind error is not the table's).
        let events = |target: &str| -> Vec<(EventKind, u32)> {
            let row = rows.iter().find(|r| r.target == target).expect("the row");
            app.connection_events(row)
                .iter()
                .map(|e| (e.kind, e.netns))
                .collect()
        };
        assert_eq!(
            events("conntrack table of netns tcptrace-lab-15542-11-node"),
            []
        );
        assert_eq!(
            events("bind() to 0.0.0.0:0"),
            [(EventKind::BindError, 4_026_532_374)]
        );
    }

    #[test]
    fn pods_known_by_uid_only_are_rows_of_their_own() {
        let app = replayed(crate::tui::testdata::LAB_NDJSON);
        let uid_rows: Vec<&str> = app
            .visible_rows()
            .iter()
            .filter(|r| r.label.cause == Cause::NetfilterDrop)
            .map(|r| r.subject.as_str())
            .collect();
        assert_eq!(
            uid_rows,
            [
                "uid fcf0448e-2932-4984-9dac-e9680e4921d6",
                "uid 0c698ade-07fa-476b-b379-c73a2f894e9a",
                "uid 7918e77c-b715-420e-905d-fe58b02de366",
            ]
        );
    }
}
