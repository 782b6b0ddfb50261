//! Diagnosis: pure rules from events, recent history and node facts
//! (read by `node`, passed in as data) to verdicts. No I/O.
pub mod audit;
mod causes;
mod judge;
mod ledger;
pub mod rules;
#[cfg(test)]
mod tests;
mod window;

pub use audit::{Finding, audit};
pub use rules::{Diagnosed, Diagnoser, DiagnoserConfig};
