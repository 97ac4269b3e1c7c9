//! LoRA adapters in Hugging Face PEFT's format (`adapter_config.json` +
//! `adapter_model.safetensors`): what qpai accepts, the low-rank factors per
//! layer and projection (checked before anything is applied), and the two
//! ways of applying them: merged into the base at load, or unmerged per
//! sequence on the CPU llama engine. The registry, eval and bench that use
//! them with models are `crate::adapters`.

pub mod adapter;
pub mod config;
pub mod merge;
pub mod projection;
pub mod unmerged;

pub use adapter::{Adapter, LoraFactors};
pub use config::AdapterConfig;
pub use projection::Projection;
pub use unmerged::{HeadLayout, UnmergedAdapter};

/// The longest adapter name.
pub const MAX_ADAPTER_NAME: usize = 64;

/// A name an adapter may not have.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid adapter name {0:?}: use 1-64 letters, digits, '.', '-' or '_', starting with a letter or digit"
)]
pub struct InvalidName(pub String);

/// Adapter names: ASCII letters, digits, '.', '-' and '_', starting with a
/// letter or digit (they become paths and `BASE:NAME` model names).
pub fn check_name(name: &str) -> Result<(), InvalidName> {
    let valid = !name.is_empty()
        && name.len() <= MAX_ADAPTER_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if valid {
        Ok(())
    } else {
        Err(InvalidName(name.to_string()))
    }
}
