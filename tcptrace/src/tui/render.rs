//! Draws an `App`. Reads state only; all counting happens in `App::handle`.
use std::time::SystemTime;

use ratatui::{
    Frame,
    layout::{Alignment, Constraint, Flex, Layout, Rect},
    style::{Color, Modifier, Style, Stylize},
    text::{Line, Span, Text},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row as TableRow, Table, TableState, Wrap},
};
use time::OffsetDateTime;

use crate::model::{Confidence, Event, Severity};

use super::{
    app::{App, DetailView, Focus, Mode, Sort, unix_secs},
    board::{Row, SPARK_SECS},
};

/// Cells of the board's sparkline; each sums SPARK_SECS / SPARK_WIDTH seconds.
const SPARK_WIDTH: usize = 15;
/// Counters, then status and probe tiers (wrapped on narrow terminals).
const HEADER_HEIGHT: u16 = 5;
/// Seconds the header's events/s is averaged over.
const RATE_SECS: u64 = 5;

pub fn render(frame: &mut Frame, app: &App) {
    let rows = app.visible_rows();
    let selected = app.selected_index(&rows);
    let detail = selected.filter(|_| app.detail_open);
    let [header, board, bottom, footer] = layout(frame.area(), app, rows.len(), detail.is_some());
    render_header(frame, header, app);
    render_board(frame, board, app, &rows, selected);
    match detail {
        Some(i) => render_detail(frame, bottom, app, rows[i]),
        None if bottom.height > 0 => render_feed(frame, bottom, app),
        None => {}
    }
    render_footer(frame, footer, app);
    if app.mode == Mode::Help {
        render_help(frame);
    }
    if !app.colors {
        // NO_COLOR: modifiers (bold, reversed) and marks stay.
        for cell in &mut frame.buffer_mut().content {
            cell.fg = Color::Reset;
            cell.bg = Color::Reset;
        }
    }
}

/// Header, board, feed or details, footer. The board takes what its rows
/// need, up to half of the body; with details open, up to a third. Below
/// `NARROW` columns the feed gives its height to the board unless it has
/// the focus (the details still get theirs).
fn layout(area: Rect, app: &App, rows: usize, detail: bool) -> [Rect; 4] {
    // A notice (the path of a written file) may take up to three lines.
    let footer = app.notice.as_ref().map_or(1, |n| {
        let lines = Paragraph::new(n.as_str())
            .wrap(Wrap { trim: false })
            .line_count(area.width);
        u16::try_from(lines).unwrap_or(3).clamp(1, 3)
    });
    let body = area.height.saturating_sub(HEADER_HEIGHT + footer);
    let wanted = u16::try_from(rows).unwrap_or(u16::MAX).saturating_add(3);
    let board = if detail {
        wanted.clamp(5, (body / 3).max(5))
    } else if area.width < NARROW && app.focus == Focus::Board {
        // A feed of less than three lines shows nothing useful.
        if body.saturating_sub(wanted) < 3 {
            body
        } else {
            wanted.max(5)
        }
    } else {
        wanted.clamp(5, (body / 2).max(5))
    };
    Layout::vertical([
        Constraint::Length(HEADER_HEIGHT),
        Constraint::Length(board.min(body)),
        Constraint::Fill(1),
        Constraint::Length(footer),
    ])
    .areas(area)
}

fn pane(title: String, focused: bool) -> Block<'static> {
    let style = if focused {
        Style::new().fg(Color::Yellow)
    } else {
        Style::new()
    };
    Block::new()
        .borders(Borders::ALL)
        .border_style(style)
        .title(title)
}

fn render_header(frame: &mut Frame, area: Rect, app: &App) {
    let or_unknown = |s: &str| {
        if s.is_empty() {
            "?".to_string()
        } else {
            s.to_string()
        }
    };
    let lost = app.stats.as_ref().map_or(0, |s| s.lost);
    let lost_style = if lost > 0 {
        Style::new().fg(Color::White).bg(Color::Red).bold()
    } else {
        Style::new()
    };
    let attributed = match app.events {
        0 => "-".to_string(),
        n => format!("{}%", app.events_with_pod * 100 / n),
    };
    // Mean of the last RATE_SECS complete seconds.
    let now = unix_secs(app.now);
    let recent: u64 = (1..=RATE_SECS)
        .map(|ago| u64::from(app.rate.at(now.saturating_sub(ago))))
        .sum();
    let per_sec = match recent / RATE_SECS {
        0..10 => format!("{:.1}", recent as f64 / RATE_SECS as f64),
        n => n.to_string(),
    };
    let mut first = vec![
        Span::raw(format!("{per_sec} ev/s")),
        Span::raw(format!(" | events {}", app.events)),
        Span::raw(format!(" | verdicts {}", app.verdicts)),
        Span::raw(" | "),
        Span::styled(format!("LOST {lost}"), lost_style),
        Span::raw(format!(" | attributed {attributed}")),
    ];
    let malformed = app.stats.as_ref().map_or(0, |s| s.malformed) + app.invalid;
    if malformed > 0 {
        first.push(Span::raw(" | "));
        first.push(Span::styled(
            format!("invalid {malformed}"),
            Style::new().fg(Color::Red),
        ));
    }
    let probes = if app.header.probes.is_empty() {
        "probes -".to_string()
    } else {
        let list: Vec<String> = app
            .header
            .probes
            .iter()
            .map(|(hook, tier)| format!("{hook}={tier}"))
            .collect();
        format!("probes {}", list.join(" "))
    };
    let mut second = Vec::new();
    if app.paused {
        second.push(Span::styled(
            "PAUSED",
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ));
        second.push(Span::raw(" | "));
    }
    if let Some(note) = &app.input_note {
        second.push(Span::styled(note.clone(), Style::new().fg(Color::Cyan)));
        second.push(Span::raw(" | "));
    }
    second.push(Span::raw(probes));
    let block = Block::new().borders(Borders::ALL).title(format!(
        " tcptrace | node {} | kernel {} | {} ",
        or_unknown(&app.header.node),
        or_unknown(&app.header.kernel),
        clock(app.now)
    ));
    frame.render_widget(
        Paragraph::new(vec![Line::from(first), Line::from(second)])
            .block(block)
            .wrap(Wrap { trim: false }),
        area,
    );
}

/// How the board's columns share its width; see `board_columns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Columns {
    subject: u16,
    cause: u16,
    target: u16,
    count: u16,
    /// Sparkline cells; 0 when it has no room.
    spark: u16,
    seen: bool,
    /// Confidence as a word ("certain"), else as one letter ("C").
    conf_word: bool,
}

/// Widths the board's text would like: the longest subject, cause and
/// target, and the digits of the largest count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Needs {
    subject: u16,
    cause: u16,
    target: u16,
    count_digits: u16,
}

impl Needs {
    fn of(rows: &[&Row]) -> Self {
        let width = |s: &str| u16::try_from(s.chars().count()).unwrap_or(u16::MAX);
        rows.iter().fold(
            Needs {
                subject: width("POD / NETNS"),
                cause: width("CAUSE"),
                target: width("DESTINATION"),
                count_digits: 1,
            },
            |n, r| Needs {
                subject: n.subject.max(width(&r.subject)),
                // The severity mark and a space come first.
                cause: n.cause.max(width(&r.label.name()) + 2),
                target: n.target.max(width(&r.target)),
                count_digits: n.count_digits.max(width(&r.count.to_string())),
            },
        )
    }
}

/// Below this many columns the board is narrowed and the feed gives way.
const NARROW: u16 = 100;
/// Subject and destination get at least this much (or what they need)
/// before the other columns give way.
const SUBJECT_MIN: u16 = 24;
const TARGET_MIN: u16 = 22;
/// The cause column gives way last, down to this (mark included).
const CAUSE_MIN: u16 = 18;
/// The narrowest sparkline worth drawing.
const SPARK_MIN: u16 = 6;
const SEEN_WIDTH: u16 = 7;
const CONF_WIDTH: u16 = 8;
/// Space between columns, and the selection mark ("> ") before them.
const SPACING: u16 = 1;
const HIGHLIGHT: u16 = 2;

/// Columns for a board `width` cells wide (borders included). The pod and
/// the destination matter most: the sparkline narrows, then goes, then
/// "seen" goes, then confidence becomes one letter, then long causes are
/// cut, until both get `SUBJECT_MIN` and `TARGET_MIN` (or what they need);
/// the rest is shared in proportion to what each still lacks.
fn board_columns(width: u16, needs: Needs) -> Columns {
    let avail = width.saturating_sub(2 + HIGHLIGHT);
    let cause = needs.cause.min(24);
    let count = needs.count_digits.max(5);
    let wanted = needs.subject.min(SUBJECT_MIN) + needs.target.min(TARGET_MIN);
    let mut c = Columns {
        subject: 0,
        cause,
        target: 0,
        count,
        spark: SPARK_WIDTH as u16,
        seen: true,
        conf_word: true,
    };
    // What subject and destination get with the other columns as in `c`.
    let free = |c: &Columns| {
        let mut used = c.cause + c.count + if c.conf_word { CONF_WIDTH } else { 1 };
        let mut columns = 5;
        if c.spark > 0 {
            used += c.spark;
            columns += 1;
        }
        if c.seen {
            used += SEEN_WIDTH;
            columns += 1;
        }
        avail.saturating_sub(used + SPACING * (columns - 1))
    };
    if free(&c) < wanted {
        let short = wanted - free(&c);
        c.spark = c.spark.saturating_sub(short);
        if c.spark < SPARK_MIN {
            c.spark = 0;
        }
    }
    if free(&c) < wanted {
        c.seen = false;
    }
    if free(&c) < wanted {
        // "C" for confidence and "#" for the count.
        c.conf_word = false;
        c.count = needs.count_digits.max(1);
    }
    if free(&c) < wanted {
        c.cause = c
            .cause
            .saturating_sub(wanted - free(&c))
            .max(CAUSE_MIN.min(cause));
    }
    let free = free(&c);
    let (min_s, min_t) = (needs.subject.min(SUBJECT_MIN), needs.target.min(TARGET_MIN));
    let ratio = |n: u16, of: u16, den: u16| {
        u16::try_from(u32::from(n) * u32::from(of) / u32::from(den.max(1))).unwrap_or(0)
    };
    c.target = if free >= needs.subject + needs.target {
        needs.target
    } else if free >= min_s + min_t {
        // Each its minimum, the rest in proportion to what each still lacks.
        let (lack_s, lack_t) = (needs.subject - min_s, needs.target - min_t);
        min_t + ratio(free - min_s - min_t, lack_t, lack_s + lack_t)
    } else {
        ratio(free, min_t, min_s + min_t)
    };
    // Room beyond both needs stays right of the table.
    c.subject = (free - c.target).min(needs.subject);
    c
}

/// `text` cut to `width` characters with "…" where it was cut: in the
/// middle, so that both a pod's deployment and its own suffix, or a
/// service's name and its port, stay visible.
fn ellipsize(text: &str, width: u16) -> String {
    let width = usize::from(width);
    let len = text.chars().count();
    if len <= width {
        return text.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let keep = width - 1;
    let tail = keep / 3;
    let head = keep - tail;
    let mut out: String = text.chars().take(head).collect();
    out.push('…');
    out.extend(text.chars().skip(len - tail));
    out
}

/// A mark and a colour per severity: the mark alone tells them apart in a
/// monochrome terminal.
fn severity_mark(s: Severity) -> (&'static str, Style) {
    match s {
        Severity::Failure => ("!", Style::new().fg(Color::Red).bold()),
        Severity::Degraded => ("~", Style::new().fg(Color::Yellow)),
        Severity::Benign => ("-", Style::new().fg(Color::DarkGray)),
    }
}

fn render_board(frame: &mut Frame, area: Rect, app: &App, rows: &[&Row], selected: Option<usize>) {
    let sort = match app.sort {
        Sort::Recency => "recency",
        Sort::Count => "count",
    };
    let mut title = format!(" causes {} | sort: {sort} ", rows.len());
    if !app.filter.is_empty() {
        title.push_str(&format!("| filter: {} ", app.filter));
    }
    let block = pane(title, app.focus == Focus::Board);
    if rows.is_empty() {
        let text = if app.filter.is_empty() {
            "No failures seen yet: waiting for events."
        } else {
            "No row matches the filter (Esc clears it)."
        };
        frame.render_widget(
            Paragraph::new(text)
                .alignment(Alignment::Center)
                .wrap(Wrap { trim: true })
                .block(block),
            area,
        );
        return;
    }
    let cols = board_columns(area.width, Needs::of(rows));
    let now = unix_secs(app.now);
    let table_rows = rows.iter().map(|r| {
        let (mark, style) = severity_mark(r.label.cause.severity());
        let mut cells = vec![
            Cell::from(ellipsize(&r.subject, cols.subject)),
            Cell::from(Span::styled(
                ellipsize(&format!("{mark} {}", r.label.name()), cols.cause),
                style,
            )),
            Cell::from(ellipsize(&r.target, cols.target)),
            Cell::from(Line::from(r.count.to_string()).alignment(Alignment::Right)),
        ];
        if cols.spark > 0 {
            cells.push(Cell::from(Span::styled(
                spark_text(&r.spark.series(now), usize::from(cols.spark)),
                Style::new().fg(Color::Cyan),
            )));
        }
        if cols.seen {
            cells.push(Cell::from(age(app.now, r.last_seen)));
        }
        cells.push(match r.confidence {
            Some(c) => confidence_cell(c, cols.conf_word),
            None => Cell::from("-"),
        });
        TableRow::new(cells)
    });
    let count = if cols.conf_word { "COUNT" } else { "#" };
    let mut header = vec!["POD / NETNS", "CAUSE", "DESTINATION", count];
    let mut widths = vec![
        Constraint::Length(cols.subject),
        Constraint::Length(cols.cause),
        Constraint::Length(cols.target),
        Constraint::Length(cols.count),
    ];
    if cols.spark > 0 {
        header.push(if cols.spark >= 8 { "LAST 60s" } else { "60s" });
        widths.push(Constraint::Length(cols.spark));
    }
    if cols.seen {
        header.push("SEEN");
        widths.push(Constraint::Length(SEEN_WIDTH));
    }
    if cols.conf_word {
        header.push("CONF");
        widths.push(Constraint::Length(CONF_WIDTH));
    } else {
        header.push("C");
        widths.push(Constraint::Length(1));
    }
    let header = TableRow::new(header)
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let table = Table::new(table_rows, widths)
        .header(header)
        .block(block)
        .column_spacing(SPACING)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("> ");
    let mut state = TableState::new().with_selected(selected);
    frame.render_stateful_widget(table, area, &mut state);
}

/// Confidence in words, or its first letter when the board is narrow;
/// `certain` in bold.
fn confidence_cell(c: Confidence, word: bool) -> Cell<'static> {
    let style = match c {
        Confidence::Certain => Style::new().bold(),
        Confidence::Likely | Confidence::Possible => Style::new(),
    };
    let text = if word {
        c.as_str().to_string()
    } else {
        c.as_str()[..1].to_uppercase()
    };
    Cell::from(Span::styled(text, style))
}

fn render_feed(frame: &mut Frame, area: Rect, app: &App) {
    let events = app.visible_feed();
    let mut title = format!(" events (last {}) ", events.len());
    if app.paused {
        title.push_str("| PAUSED ");
    }
    let block = pane(title, app.focus == Focus::Bottom);
    let inner_height = usize::from(area.height.saturating_sub(2));
    let skip = app
        .feed_scroll
        .min(events.len().saturating_sub(inner_height.max(1)));
    let lines: Vec<Line> = events
        .iter()
        .skip(skip)
        .take(inner_height)
        .map(|e| event_line(e))
        .collect();
    let body = if lines.is_empty() {
        Text::from("No events yet.")
    } else {
        Text::from(lines)
    };
    frame.render_widget(Paragraph::new(body).block(block), area);
}

fn event_line(e: &Event) -> Line<'static> {
    let mut text = format!(
        "{} {:<17} {} -> {}",
        clock_ms(e.time),
        e.kind.as_str(),
        e.src,
        e.dst
    );
    let state = e.state.map(|x| x.as_str().to_string());
    let errno = e.errno.map(|x| x.to_string());
    let repeats = e.count.map(|n| format!("x{n}"));
    let reason = e.reason.as_ref().map(ToString::to_string);
    for extra in [&state, &errno, &reason, &repeats].into_iter().flatten() {
        text.push(' ');
        text.push_str(extra);
    }
    let mut who = match (&e.pod, &e.netns_name) {
        (Some(p), _) => format!("  {p}"),
        (None, Some(n)) => format!("  netns {n}"),
        (None, None) => format!("  netns {}", e.netns),
    };
    if let (None, Some(comm)) = (&e.pod, &e.comm) {
        who.push_str(&format!(" {comm}"));
    }
    Line::from(vec![
        Span::raw(text),
        Span::styled(who, Style::new().fg(Color::Cyan)),
    ])
}

fn render_detail(frame: &mut Frame, area: Rect, app: &App, row: &Row) {
    let title = format!(" details: {} | {} ", row.label.name(), row.subject);
    let block = pane(title, app.focus == Focus::Bottom);
    let key = |k: &str| Span::styled(format!("{k}: "), Style::new().bold());
    let mut lines: Vec<Line> = Vec::new();
    match &row.verdict {
        Some(v) => {
            lines.push(Line::from(v.summary.clone()));
            let (mark, style) = severity_mark(v.severity);
            lines.push(Line::from(vec![
                key("severity"),
                Span::styled(format!("{mark} {}", v.severity.as_str()), style),
                Span::raw("  "),
                key("confidence"),
                Span::raw(v.confidence.as_str()),
            ]));
            lines.push(Line::from(format!(
                "count {}  first seen {}  last seen {}",
                row.count,
                clock(row.first_seen),
                clock(row.last_seen)
            )));
            if v.dst.is_unspecified() {
                lines.push(Line::from(vec![
                    key("about"),
                    Span::raw(row.target.clone()),
                ]));
            } else {
                lines.push(Line::from(vec![
                    key("connection"),
                    Span::raw(format!("{} -> {}", v.src, destination(&v.dst))),
                ]));
            }
            if let Some(comm) = &v.comm {
                let pid = v.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                lines.push(Line::from(vec![
                    key("process"),
                    Span::raw(format!("{comm}{pid}")),
                ]));
            }
            lines.push(Line::from(Span::styled("evidence", Style::new().bold())));
            for (k, value) in &v.evidence {
                let value = match value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                lines.push(Line::from(format!("  {k}: {value}")));
            }
            lines.push(Line::from(vec![
                Span::styled("fix: ", Style::new().bold().fg(Color::Green)),
                Span::styled(v.fix.clone(), Style::new().fg(Color::Green)),
            ]));
        }
        None => {
            lines.push(Line::from(format!(
                "{} {} event(s) to {}; no verdict explains them yet.",
                row.count,
                row.label.name(),
                row.target
            )));
            lines.push(Line::from(format!(
                "first seen {}  last seen {}",
                clock(row.first_seen),
                clock(row.last_seen)
            )));
        }
    }
    lines.push(Line::from(""));
    let heading = if row.dst.is_unspecified() {
        "last events like it in this namespace"
    } else {
        "last events of this connection"
    };
    lines.push(Line::from(Span::styled(heading, Style::new().bold())));
    let events = app.connection_events(row);
    if events.is_empty() {
        lines.push(Line::from("  none kept"));
    }
    lines.extend(events.into_iter().map(event_line));
    let text = Paragraph::new(lines).wrap(Wrap { trim: false });
    let inner = block.inner(area);
    let total = u16::try_from(text.line_count(inner.width)).unwrap_or(u16::MAX);
    let page = inner.height;
    let max_scroll = total.saturating_sub(page);
    app.detail_view.set(DetailView { page, max_scroll });
    let scroll = app.detail_scroll.min(max_scroll);
    let block = if max_scroll > 0 {
        let last = scroll.saturating_add(page).min(total);
        block.title_bottom(
            Line::from(format!(
                " lines {}-{last} of {total}, PgUp/PgDn ",
                scroll + 1
            ))
            .right_aligned(),
        )
    } else {
        block
    };
    frame.render_widget(text.block(block).scroll((scroll, 0)), area);
}

/// Key hints, as many as fit, always ending with help.
const HINTS: [(&str, &str); 9] = [
    ("q", "quit"),
    ("j/k", "select"),
    ("Enter", "details"),
    ("/", "filter"),
    ("w", "write"),
    ("c", "copy fix"),
    ("s", "sort"),
    ("p", "pause"),
    ("Tab", "pane"),
];

fn render_footer(frame: &mut Frame, area: Rect, app: &App) {
    let line = if app.mode == Mode::Filter {
        Line::from(vec![
            Span::styled("/", Style::new().fg(Color::Yellow)),
            Span::raw(format!("{}_", app.filter)),
            Span::styled(
                "  (namespace, pod, cause, port; Enter keeps, Esc clears)",
                Style::new().fg(Color::DarkGray),
            ),
        ])
    } else if let Some(note) = &app.notice {
        Line::from(Span::styled(
            note.clone(),
            Style::new().fg(Color::Cyan).bold(),
        ))
    } else {
        let help = "? help";
        let room = usize::from(area.width).saturating_sub(help.len());
        let mut text = String::new();
        for (k, what) in HINTS {
            let hint = format!("{k} {what}  ");
            if text.len() + hint.len() > room {
                break;
            }
            text.push_str(&hint);
        }
        text.push_str(help);
        Line::from(Span::styled(text, Style::new().fg(Color::DarkGray)))
    };
    frame.render_widget(Paragraph::new(line).wrap(Wrap { trim: false }), area);
}

fn render_help(frame: &mut Frame) {
    let keys = [
        ("Up/Down j/k", "select a row, scroll the focused pane"),
        ("PgUp/PgDn wheel", "scroll the details; else move faster"),
        ("Home/End", "first or last row"),
        ("Enter", "open or close the details of the row"),
        ("w", "write the verdict and its events to a JSON file"),
        ("c", "copy the fix to the clipboard (OSC 52)"),
        ("/", "filter by namespace, pod, cause, port"),
        ("Esc", "close details, else clear the filter"),
        ("s", "sort by recency or count"),
        ("p", "pause the feed (counting goes on)"),
        ("Tab", "switch between board and feed/details"),
        ("?", "this help (any key closes it)"),
        ("q Ctrl-C", "quit"),
    ];
    let mut lines: Vec<Line> = keys
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!("{k:>16}  "), Style::new().bold()),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::from(""));
    for severity in [Severity::Failure, Severity::Degraded, Severity::Benign] {
        let (mark, style) = severity_mark(severity);
        lines.push(Line::from(vec![
            Span::styled(format!("{mark:>16}  "), style),
            Span::raw(severity.as_str()),
        ]));
    }
    let area = centered(frame.area(), 68, lines.len() as u16 + 2);
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" keys ")),
        area,
    );
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let [area] = Layout::horizontal([Constraint::Length(width)])
        .flex(Flex::Center)
        .areas(area);
    let [area] = Layout::vertical([Constraint::Length(height)])
        .flex(Flex::Center)
        .areas(area);
    area
}

fn destination(dst: &crate::model::Endpoint) -> String {
    match (&dst.service, &dst.pod) {
        (Some(s), _) => format!("{dst} ({}/{})", s.namespace, s.name),
        (None, Some(p)) => format!("{dst} ({p})"),
        (None, None) => dst.to_string(),
    }
}

/// At most `width` characters, each summing SPARK_SECS / `width` seconds
/// (rounded up), newest on the right, scaled to the row's own peak.
fn spark_text(series: &[u32; SPARK_SECS], width: usize) -> String {
    const LEVELS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let cells: Vec<u64> = series
        .chunks(SPARK_SECS.div_ceil(width.max(1)))
        .map(|c| c.iter().map(|&n| u64::from(n)).sum())
        .collect();
    let peak = cells.iter().copied().max().unwrap_or(0).max(1);
    cells
        .iter()
        .map(|&n| LEVELS[(n * 8).div_ceil(peak) as usize])
        .collect()
}

fn age(now: SystemTime, then: SystemTime) -> String {
    let s = now.duration_since(then).map_or(0, |d| d.as_secs());
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// UTC wall-clock time, "09:26:03"; dashes before the first record.
fn clock(t: SystemTime) -> String {
    if t == std::time::UNIX_EPOCH {
        return "--:--:--".into();
    }
    let t = OffsetDateTime::from(t);
    format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
}

fn clock_ms(t: SystemTime) -> String {
    let d = OffsetDateTime::from(t);
    format!("{}.{:03}", clock(t), d.millisecond())
}

#[cfg(test)]
mod tests {
    use insta::assert_snapshot;
    use ratatui::{Terminal, backend::TestBackend, style::Color};

    use super::*;
    use crate::{
        model::Record,
        tui::{
            AppInput, Key, replay_into_app,
            testdata::{LAB_NDJSON, at, header, incident_ndjson},
        },
    };

    fn draw(app: &App) -> Terminal<TestBackend> {
        draw_at(app, 120, 36)
    }

    fn draw_at(app: &App, width: u16, height: u16) -> Terminal<TestBackend> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test terminal");
        terminal
            .draw(|frame| render(frame, app))
            .expect("draw to a test backend");
        terminal
    }

    fn incident_app() -> App {
        let mut app = App::new(header());
        replay_into_app(incident_ndjson().as_bytes(), &mut app).expect("in-memory replay");
        app
    }

    fn keys(app: &mut App, keys: &[Key]) {
        for &k in keys {
            app.handle(AppInput::Key(k));
        }
    }

    fn type_text(app: &mut App, text: &str) {
        for c in text.chars() {
            app.handle(AppInput::Key(Key::Char(c)));
        }
    }

    #[test]
    fn board_with_several_verdicts() {
        assert_snapshot!(draw(&incident_app()).backend());
    }

    #[test]
    fn board_sorted_by_count() {
        let mut app = incident_app();
        keys(&mut app, &[Key::Char('s')]);
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn detail_pane_of_the_selected_row() {
        let mut app = incident_app();
        // Second row by recency: the nodeport collision of the host netns.
        keys(&mut app, &[Key::Char('j'), Key::Char('j'), Key::Enter]);
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn detail_pane_of_a_verdict_with_its_connection_events() {
        let mut app = incident_app();
        keys(&mut app, &[Key::Enter]);
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn filter_applied() {
        let mut app = incident_app();
        keys(&mut app, &[Key::Char('/')]);
        type_text(&mut app, "payments");
        keys(&mut app, &[Key::Enter]);
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn filter_being_typed_with_no_match() {
        let mut app = incident_app();
        keys(&mut app, &[Key::Char('/')]);
        type_text(&mut app, "nosuchpod");
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn empty_state() {
        assert_snapshot!(draw(&App::new(header())).backend());
    }

    #[test]
    fn help_overlay() {
        let mut app = incident_app();
        keys(&mut app, &[Key::Char('?')]);
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn lost_events_are_shown_in_red() {
        let mut app = App::new(header());
        app.handle(AppInput::Record(Record::Stats(crate::model::Stats {
            node: None,
            kernel: None,
            time: at(5_000),
            uptime_s: 5.0,
            seen: 1_000,
            lost: 250,
            malformed: 0,
            sink_dropped: 0,
            hooks: Vec::new(),
            unaccounted: crate::model::Unaccounted::default(),
            r#final: false,
            tick: None,
        })));
        let terminal = draw(&app);
        assert_snapshot!(terminal.backend());
        let buffer = terminal.backend().buffer();
        let lost_cells: Vec<_> = (0..buffer.area.width)
            .map(|x| &buffer[(x, 1)])
            .filter(|cell| cell.bg == Color::Red)
            .map(|cell| cell.symbol().to_string())
            .collect();
        assert_eq!(lost_cells.concat(), "LOST 250");
    }

    #[test]
    fn no_lost_events_are_not_red() {
        let terminal = draw(&incident_app_without_losses());
        let buffer = terminal.backend().buffer();
        assert!((0..buffer.area.width).all(|x| buffer[(x, 1)].bg != Color::Red));
    }

    fn incident_app_without_losses() -> App {
        let mut app = App::new(header());
        let text: String = incident_ndjson()
            .lines()
            .filter(|l| !l.contains("\"lost\":17"))
            .map(|l| format!("{l}\n"))
            .collect();
        replay_into_app(text.as_bytes(), &mut app).expect("in-memory replay");
        app
    }

    #[test]
    fn sparkline_scales_to_the_peak_and_keeps_newest_right() {
        let mut series = [0; SPARK_SECS];
        series[SPARK_SECS - 1] = 4;
        series[0] = 1;
        let text = spark_text(&series, SPARK_WIDTH);
        assert_eq!(text.chars().count(), SPARK_WIDTH);
        assert_eq!(text.chars().last(), Some('█'));
        assert_eq!(text.chars().next(), Some('▂'));
    }

    /// The four terminal sizes the board must read well at.
    const SIZES: [(u16, u16); 4] = [(80, 24), (100, 30), (120, 40), (200, 50)];

    fn lab_app() -> App {
        let mut app = App::new(header());
        replay_into_app(LAB_NDJSON.as_bytes(), &mut app).expect("in-memory replay");
        app
    }

    /// Moves the selection down to the first row whose destination starts
    /// with `target`.
    fn select_target(app: &mut App, target: &str) {
        let rows = app.visible_rows();
        let i = rows
            .iter()
            .position(|r| r.target.starts_with(target))
            .unwrap_or_else(|| panic!("a row about {target}"));
        keys(app, &vec![Key::Down; i]);
    }

    /// The screen's lines as text.
    fn lines(terminal: &Terminal<TestBackend>) -> Vec<String> {
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect()
            })
            .collect()
    }

    fn selected_line(terminal: &Terminal<TestBackend>) -> String {
        lines(terminal)
            .into_iter()
            .find(|l| l.starts_with("│> "))
            .expect("a selected row on screen")
    }

    #[test]
    fn recorded_lab_board_at_four_sizes() {
        let mut app = lab_app();
        // The verdict from the namespace's counters: no destination.
        select_target(&mut app, "conntrack table of");
        for (w, h) in SIZES {
            let terminal = draw_at(&app, w, h);
            assert_snapshot!(format!("lab_board_{w}x{h}"), terminal.backend());
            let line = selected_line(&terminal);
            assert!(line.contains("! conntrack_table_full"), "{w}x{h}: {line}");
            assert!(line.contains("netns tcptrace-l"), "{w}x{h}: {line}");
            assert!(line.contains("conntrack tab"), "{w}x{h}: {line}");
        }
    }

    #[test]
    fn incident_board_at_four_sizes() {
        let mut app = incident_app();
        select_target(&mut app, "batch/object-store:443");
        for (w, h) in SIZES {
            let terminal = draw_at(&app, w, h);
            assert_snapshot!(format!("incident_board_{w}x{h}"), terminal.backend());
        }
    }

    #[test]
    fn the_selected_row_shows_pod_and_destination_at_every_width() {
        for mut app in [incident_app(), lab_app()] {
            // The row with the longest subject and destination.
            let rows = app.visible_rows();
            let needs = Needs::of(&rows);
            let longest = rows
                .iter()
                .max_by_key(|r| r.subject.len() + r.target.len())
                .map(|r| r.id);
            let i = rows.iter().position(|r| Some(r.id) == longest);
            keys(&mut app, &vec![Key::Down; i.unwrap_or(0)]);
            let rows = app.visible_rows();
            let row = rows[app.selected_index(&rows).expect("a selection")];
            for width in 80..=220 {
                let cols = board_columns(width, needs);
                assert!(
                    cols.subject >= needs.subject.min(SUBJECT_MIN)
                        && cols.target >= needs.target.min(TARGET_MIN),
                    "{width}: {cols:?} for {needs:?}"
                );
                let line = selected_line(&draw_at(&app, width, 30));
                let subject = ellipsize(&row.subject, cols.subject);
                let target = ellipsize(&row.target, cols.target);
                assert!(line.contains(&subject), "{width}: {subject} in {line}");
                assert!(line.contains(&target), "{width}: {target} in {line}");
                // Cut only with a visible ellipsis.
                assert!(subject == row.subject || subject.contains('…'));
                assert!(target == row.target || target.contains('…'));
            }
        }
    }

    #[test]
    fn columns_give_way_in_order_of_value() {
        let needs = Needs {
            subject: 37,
            cause: 20,
            target: 40,
            count_digits: 3,
        };
        let at = |w| {
            let c = board_columns(w, needs);
            (c.spark, c.seen, c.conf_word)
        };
        // With every column, subject and destination get 46 from 111 up.
        assert_eq!(at(200), (15, true, true));
        assert_eq!(at(111), (15, true, true));
        assert_eq!(at(108), (12, true, true), "the sparkline narrows first");
        assert_eq!(at(102), (6, true, true));
        assert_eq!(at(101), (0, true, true), "then goes");
        assert_eq!(at(94), (0, false, true), "then seen goes");
        assert_eq!(at(86), (0, false, false), "then confidence is one letter");
        assert_eq!(
            board_columns(86, needs).count,
            3,
            "and the count's header #"
        );
        assert_eq!(at(80), (0, false, false));
        let c = board_columns(200, needs);
        assert_eq!((c.subject, c.target), (37, 40));
        let c = board_columns(80, needs);
        assert_eq!(c.subject + c.target, 80 - 4 - 20 - 3 - 1 - 4);
        // 48: each its minimum, 2 more shared as 13 : 18 lacking (rounded).
        assert_eq!((c.subject, c.target), (25, 23));
    }

    #[test]
    fn ellipsis_in_the_middle() {
        assert_eq!(ellipsize("shop/postgres:5432", 18), "shop/postgres:5432");
        assert_eq!(
            ellipsize("batch/report-exporter-58f6c9d7b-9wq7t", 16),
            "batch/repo…9wq7t"
        );
        assert_eq!(ellipsize("abc", 1), "…");
        assert_eq!(ellipsize("abc", 0), "");
    }

    #[test]
    fn details_scroll_at_80x24() {
        let mut app = lab_app();
        select_target(&mut app, "10.96.0.30:80");
        keys(&mut app, &[Key::Enter]);
        let first = draw_at(&app, 80, 24);
        assert_snapshot!("lab_details_80x24_top", first.backend());
        let view = app.detail_view.get();
        assert!(view.max_scroll > 0, "the details do not fit: {view:?}");
        keys(&mut app, &[Key::PageDown]);
        assert_eq!(app.detail_scroll, view.page.min(view.max_scroll));
        keys(&mut app, &[Key::PageDown, Key::PageDown, Key::PageDown]);
        assert_eq!(app.detail_scroll, view.max_scroll);
        let last = draw_at(&app, 80, 24);
        assert_snapshot!("lab_details_80x24_bottom", last.backend());
        assert!(
            lines(&last)
                .iter()
                .any(|l| l.contains("last events of this connection")),
            "the end of the details is reachable"
        );
    }

    #[test]
    fn severities_differ_in_mark_and_colour_and_no_color_keeps_the_marks() {
        let mut app = lab_app();
        let terminal = draw_at(&app, 120, 40);
        let text = lines(&terminal).join("\n");
        assert!(text.contains("! conntrack_table_full"));
        assert!(text.contains("- application_abort"));
        let colour_of = |terminal: &Terminal<TestBackend>, mark: &str| {
            let buffer = terminal.backend().buffer();
            let (y, line) = lines(terminal)
                .into_iter()
                .enumerate()
                .find(|(_, l)| l.contains(mark))
                .expect("the mark on screen");
            let x = line
                .chars()
                .take_while(|_| true)
                .collect::<Vec<_>>()
                .windows(mark.chars().count())
                .position(|w| w.iter().collect::<String>() == mark)
                .expect("the mark's column");
            buffer[(x as u16, y as u16)].fg
        };
        assert_eq!(colour_of(&terminal, "! netfilter_drop"), Color::Red);
        assert_eq!(colour_of(&terminal, "- application_abort"), Color::DarkGray);
        app.set_colors(false);
        let plain = draw_at(&app, 120, 40);
        assert_eq!(
            lines(&plain),
            lines(&terminal),
            "the same text without colour"
        );
        let buffer = plain.backend().buffer();
        assert!(
            buffer
                .content
                .iter()
                .all(|c| c.fg == Color::Reset && c.bg == Color::Reset)
        );
        assert_eq!(colour_of(&plain, "! netfilter_drop"), Color::Reset);
    }

    #[test]
    fn a_long_notice_wraps_in_the_footer() {
        let mut app = incident_app();
        let path = "/home/someone/incidents/tcptrace-port_exhaustion-batch-report-exporter-58f6c9d7b-9wq7t-20250314T092652Z.json";
        app.notice(format!("wrote {path}"));
        let screen = lines(&draw_at(&app, 80, 24));
        let footer: Vec<&str> = screen[21..].iter().map(|l| l.trim_end()).collect();
        assert_eq!(footer.concat(), format!("wrote{path}"), "{footer:?}");
        assert!(screen[20].starts_with('└'), "the feed ends above it");
    }
}
