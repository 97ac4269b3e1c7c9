//! qpai's integration tests: one binary, so the heavy crates link once.
//! They use the real models of the catalog (pulled into the models cache on
//! first use) and fixtures from the reference implementation
//! (scripts/reference/make_fixtures.py).

mod api;
mod auth_guard;
mod bad_input;
mod batch_cli;
mod batch_processes;
mod batches;
mod bench_serve;
mod budget_processes;
mod catalog;
mod common;
mod concurrency;
mod device_decoder;
mod drain;
mod embeddings;
mod eval_calibrate;
mod eval_cli;
mod eval_local;
mod experiments;
mod fake_upstream;
mod files;
mod fuzz_replay;
mod gateway;
mod isolation;
mod kv_cache;
mod ledger;
mod ledger_kill;
mod lora;
mod lora_api;
mod openai_client;
mod prompts;
mod rag;
mod rag_api;
#[cfg(feature = "s3")]
mod rag_s3;
mod rag_sources;
mod reference;
mod router;
mod router_serve;
mod router_upstream;
mod soak;
mod structured;
mod tenant_limits;
mod tokenizer;
