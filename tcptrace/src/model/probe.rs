//! Which kernel hooks are live, and how.
use serde::{Deserialize, Serialize};

/// How a hook is attached on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Fexit,
    Kprobe,
    Tracepoint,
    RawTracepoint,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Fexit => "fexit",
            Tier::Kprobe => "kprobe",
            Tier::Tracepoint => "tracepoint",
            Tier::RawTracepoint => "raw_tracepoint",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum ProbeState {
    Attached,
    Disabled(String),
    Unavailable(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbeStatus {
    pub hook: &'static str,
    pub tracepoint: String,
    pub tier: Tier,
    #[serde(flatten)]
    pub state: ProbeState,
}

/// The kernel's tick rate (HZ), which turns jiffies into milliseconds, and
/// where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickRate {
    pub hz: u32,
    pub source: TickSource,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum TickSource {
    /// The kernel's jiffies (a BPF program run) against CLOCK_MONOTONIC.
    Measured,
    /// CONFIG_HZ from this kernel's configuration file.
    Config(String),
    /// Neither was available: the common distribution value, with why.
    Assumed(String),
}

impl TickRate {
    /// "250 Hz (measured: ...)", for people.
    pub fn describe(&self) -> String {
        match &self.source {
            TickSource::Measured => format!(
                "{} Hz (measured: the kernel's jiffies against CLOCK_MONOTONIC)",
                self.hz
            ),
            TickSource::Config(path) => format!("{} Hz (CONFIG_HZ in {path})", self.hz),
            TickSource::Assumed(why) => format!("{} Hz (ASSUMED: {why})", self.hz),
        }
    }
}
