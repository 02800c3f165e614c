//! retoucher: a production worker for the Agentic Retoucher (arXiv 2601.02046).
//!
//! Jobs arrive from RabbitMQ ([`broker`], [`worker`]), images come from S3 ([`storage`]), and
//! the perception → reasoning → action loop ([`pipeline`]) runs three ONNX Runtime-backed
//! agents ([`agents`]) whose sessions are shared across jobs through dynamic batchers
//! ([`engine::batcher`]). [`execute`] runs one job end to end for the worker, the local `run`
//! command ([`run`]) and `eval` ([`eval`], measured quality); [`app`] assembles the process for
//! every command of the command line ([`cli`]).

pub mod agents;
pub mod app;
pub mod bench;
pub mod broker;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod cputime;
pub mod diagnostics;
pub mod engine;
pub mod enqueue;
pub mod error;
pub mod eval;
pub mod execute;
pub(crate) mod faults;
pub(crate) mod imaging;
pub mod job;
pub(crate) mod metrics;
pub mod pipeline;
pub mod replay;
pub mod run;
pub mod storage;
pub mod worker;
