//! Diagnosis: pure rules from events, recent history and node facts to
//! verdicts. No I/O in here except `collect`, which reads the node facts
//! the rules take as plain data.

pub mod audit;
mod causes;
pub mod collect;
pub mod facts;
pub mod rules;
#[cfg(test)]
mod tests;

pub use audit::{Finding, audit, render_table};
pub use collect::collect_netns;
pub use facts::{ConntrackFacts, ConntrackStats, NetnsFacts, NodeFacts};
pub use rules::{Diagnoser, DiagnoserConfig};
