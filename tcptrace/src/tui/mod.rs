//! Live incident TUI (ratatui).
