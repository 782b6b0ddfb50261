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
    app::{App, Focus, Mode, Sort, unix_secs},
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
    // The board takes what its rows need, up to half; the rest goes below.
    let body = frame.area().height.saturating_sub(HEADER_HEIGHT + 1);
    let wanted = u16::try_from(rows.len())
        .unwrap_or(u16::MAX)
        .saturating_add(3);
    let [header, board, bottom, footer] = Layout::vertical([
        Constraint::Length(HEADER_HEIGHT),
        Constraint::Length(wanted.clamp(5, (body / 2).max(5))),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    render_header(frame, header, app);
    render_board(frame, board, app, &rows, selected);
    match selected.filter(|_| app.detail_open) {
        Some(i) => render_detail(frame, bottom, app, rows[i]),
        None => render_feed(frame, bottom, app),
    }
    render_footer(frame, footer, app);
    if app.mode == Mode::Help {
        render_help(frame);
    }
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
                .block(block),
            area,
        );
        return;
    }
    let now = unix_secs(app.now);
    let table_rows = rows.iter().map(|r| {
        // Benign verdicts (an application's own aborts) are counted, dimmed.
        let (label_style, conf) = match (r.label.cause.severity(), r.confidence) {
            (Severity::Benign, _) | (_, None) => (
                Style::new().fg(Color::DarkGray),
                r.confidence
                    .map_or_else(|| Cell::from("-"), confidence_cell),
            ),
            (_, Some(c)) => (Style::new().bold(), confidence_cell(c)),
        };
        TableRow::new(vec![
            Cell::from(r.subject.clone()),
            Cell::from(Span::styled(r.label.name(), label_style)),
            Cell::from(short_destination(&r.dst)),
            Cell::from(Line::from(r.count.to_string()).alignment(Alignment::Right)),
            Cell::from(Span::styled(
                spark_text(&r.spark.series(now)),
                Style::new().fg(Color::Cyan),
            )),
            Cell::from(age(app.now, r.last_seen)),
            conf,
        ])
    });
    let header = TableRow::new(vec![
        "POD / NETNS",
        "CAUSE",
        "DESTINATION",
        " COUNT",
        "LAST 60s",
        "SEEN",
        "CONF",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let widths = [
        Constraint::Fill(5),
        Constraint::Length(20),
        Constraint::Fill(4),
        Constraint::Length(6),
        Constraint::Length(SPARK_WIDTH as u16),
        Constraint::Length(7),
        Constraint::Length(8),
    ];
    let table = Table::new(table_rows, widths)
        .header(header)
        .block(block)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("> ");
    let mut state = TableState::new().with_selected(selected);
    frame.render_stateful_widget(table, area, &mut state);
}

fn confidence_cell(c: Confidence) -> Cell<'static> {
    let style = match c {
        Confidence::Certain => Style::new().fg(Color::Red).bold(),
        Confidence::Likely => Style::new().fg(Color::Yellow),
        Confidence::Possible => Style::new(),
    };
    Cell::from(Span::styled(c.as_str(), style))
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
    for extra in [&state, &errno, &e.reason, &repeats].into_iter().flatten() {
        text.push(' ');
        text.push_str(extra);
    }
    let mut who = match (&e.pod, &e.netns_name) {
        (Some(p), _) => format!("  {}/{}", p.namespace, p.name),
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
            lines.push(Line::from(vec![
                key("confidence"),
                Span::raw(v.confidence.as_str()),
                Span::raw(format!(
                    "  count {}  first seen {}  last seen {}",
                    row.count,
                    clock(row.first_seen),
                    clock(row.last_seen)
                )),
            ]));
            lines.push(Line::from(vec![
                key("connection"),
                Span::raw(format!("{} -> {}", v.src, destination(&v.dst))),
            ]));
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
                destination(&row.dst)
            )));
            lines.push(Line::from(format!(
                "first seen {}  last seen {}",
                clock(row.first_seen),
                clock(row.last_seen)
            )));
        }
    }
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled(
        "last events of this connection",
        Style::new().bold(),
    )));
    let events = app.connection_events(row);
    if events.is_empty() {
        lines.push(Line::from("  none kept"));
    }
    lines.extend(events.into_iter().map(event_line));
    let scroll = app
        .detail_scroll
        .min(u16::try_from(lines.len().saturating_sub(1)).unwrap_or(u16::MAX));
    frame.render_widget(
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false })
            .scroll((scroll, 0)),
        area,
    );
}

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
    } else {
        Line::from(Span::styled(
            "q quit  j/k select  Enter details  / filter  s sort  p pause  Tab pane  ? help",
            Style::new().fg(Color::DarkGray),
        ))
    };
    frame.render_widget(Paragraph::new(line), area);
}

fn render_help(frame: &mut Frame) {
    let keys = [
        ("Up/Down j/k", "select a row, scroll the focused pane"),
        ("PgUp/PgDn Home/End", "move faster"),
        ("Enter", "open or close the details of the row"),
        ("/", "filter by namespace, pod, cause, port"),
        ("Esc", "close details, else clear the filter"),
        ("s", "sort by recency or count"),
        ("p", "pause the feed (counting goes on)"),
        ("Tab", "switch between board and feed/details"),
        ("?", "this help (any key closes it)"),
        ("q Ctrl-C", "quit"),
    ];
    let lines: Vec<Line> = keys
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!("{k:>20}  "), Style::new().bold()),
                Span::raw(*what),
            ])
        })
        .collect();
    let area = centered(frame.area(), 64, lines.len() as u16 + 2);
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

/// The service name when known: it says more than a ClusterIP.
fn short_destination(dst: &crate::model::Endpoint) -> String {
    match &dst.service {
        Some(s) => format!("{}/{}:{}", s.namespace, s.name, dst.port),
        None => dst.to_string(),
    }
}

fn destination(dst: &crate::model::Endpoint) -> String {
    match (&dst.service, &dst.pod) {
        (Some(s), _) => format!("{dst} ({}/{})", s.namespace, s.name),
        (None, Some(p)) => format!("{dst} ({}/{})", p.namespace, p.name),
        (None, None) => dst.to_string(),
    }
}

/// One character per SPARK_SECS / SPARK_WIDTH seconds, newest on the right,
/// scaled to the row's own peak.
fn spark_text(series: &[u32; SPARK_SECS]) -> String {
    const LEVELS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let cells: Vec<u64> = series
        .chunks(SPARK_SECS.div_ceil(SPARK_WIDTH))
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
            testdata::{at, header, incident_ndjson},
        },
    };

    fn draw(app: &App) -> Terminal<TestBackend> {
        let mut terminal = Terminal::new(TestBackend::new(120, 36)).expect("test terminal");
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
            time: at(5_000),
            uptime_s: 5.0,
            seen: 1_000,
            lost: 250,
            malformed: 0,
            sink_dropped: 0,
            hooks: Vec::new(),
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
        let text = spark_text(&series);
        assert_eq!(text.chars().count(), SPARK_WIDTH);
        assert_eq!(text.chars().last(), Some('█'));
        assert_eq!(text.chars().next(), Some('▂'));
    }
}
