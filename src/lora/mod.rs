//! LoRA adapters in Hugging Face PEFT's format (`adapter_config.json` +
//! `adapter_model.safetensors`): what qpai accepts, and the low-rank factors
//! per layer and projection, checked before anything is applied.

pub mod adapter;
pub mod config;

pub use adapter::{Adapter, LoraFactors, Projection};
pub use config::AdapterConfig;
