//! How long the diagnoser waits, correlates and remembers, and how much.
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct DiagnoserConfig {
    /// A verdict key is emitted at most once per interval.
    pub reemit_interval: Duration,
    /// Sockets with history kept; the least recently seen are evicted.
    pub max_socks: usize,
    /// Aggregated verdict keys kept; the least recently seen are evicted.
    pub max_keys: usize,
    /// Data retransmits of one connection within `storm_window` that make a storm.
    pub storm_retransmits: usize,
    pub storm_window: Duration,
    /// How far apart a reset pair, a packet drop and a counter rise may be.
    pub correlation_window: Duration,
    /// Socket history and verdict keys unseen for this long are forgotten.
    pub state_ttl: Duration,
    /// How long a reset or error may wait for a cause before it is
    /// reported as unexplained (the other side's reset, a counter rise).
    pub settle: Duration,
    /// Aggregated counts go to the live sinks (board, metrics) at most
    /// this often per verdict key.
    pub live_interval: Duration,
}

impl Default for DiagnoserConfig {
    fn default() -> Self {
        Self {
            reemit_interval: Duration::from_secs(10),
            max_socks: 16384,
            max_keys: 4096,
            storm_retransmits: 5,
            storm_window: Duration::from_secs(10),
            correlation_window: Duration::from_secs(30),
            state_ttl: Duration::from_secs(15 * 60),
            settle: Duration::from_secs(10),
            live_interval: Duration::from_millis(250),
        }
    }
}
