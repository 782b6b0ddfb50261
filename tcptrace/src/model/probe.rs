//! Which kernel hooks are live, and how.
use serde::Serialize;

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
