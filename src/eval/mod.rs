//! The eval harness: `qpai eval run SUITE.toml` runs a dataset through
//! variants (prompts × models × adapters × settings, or the modes of a
//! site search) and checks every answer with weighted, negatable
//! assertions. Every call goes through the gateway, billed to the tenant
//! that runs the suite and tagged with the run in the ledger; answers are
//! cached by what was asked; results stream to JSONL, then sum up into
//! results.json, summary.md and report.html.

pub mod assertions;
pub mod cache;
pub mod calibrate;
pub mod call;
pub mod check;
pub mod cli;
pub mod html;
pub mod judged;
pub mod output;
pub mod rag_checks;
pub mod report;
pub mod run;
pub mod similarity;
pub mod suite;
pub mod summary;
