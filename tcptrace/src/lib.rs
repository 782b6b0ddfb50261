//! tcptrace: explains TCP connection failures on Kubernetes nodes.
//!
//! Data flows one way: `bpf` (kernel records) -> `model` events ->
//! attribution -> `diagnosis` -> sinks (`output`).
#![deny(unsafe_code)]

pub mod attribution;
pub mod bpf;
pub mod cli;
pub mod diagnosis;
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod metrics;
pub mod model;
pub mod node;
pub mod output;
pub mod pipeline;
pub mod run;
#[cfg(test)]
mod testing;
pub mod tui;
