//! LoRA adapters in Hugging Face PEFT's format (`adapter_config.json` +
//! `adapter_model.safetensors`): what qpai accepts, the low-rank factors per
//! layer and projection (checked before anything is applied), and the two
//! ways of applying them: merged into the base at load, or unmerged per
//! sequence on the CPU llama engine.

pub mod adapter;
pub mod bench;
pub mod config;
pub mod eval;
pub mod merge;
pub mod projection;
pub mod registry;
pub mod unmerged;

pub use adapter::{Adapter, LoraFactors};
pub use config::AdapterConfig;
pub use projection::Projection;
pub use unmerged::{HeadLayout, UnmergedAdapter};
