//! The weights of a safetensors checkpoint directory, memory-mapped for
//! the architectures that read them (llama, qwen2), with a LoRA adapter
//! merged on the way when asked.

use std::path::Path;
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::lora::Adapter;
use crate::lora::merge::MergingBackend;

/// Memory-maps every `*.safetensors` file of a checkpoint directory, with
/// `merge`'s adapter merged into the projections it targets.
pub fn checkpoint_vars(
    dir: &Path,
    dtype: DType,
    device: &Device,
    merge: Option<&Arc<Adapter>>,
) -> anyhow::Result<VarBuilder<'static>> {
    let tensors = checkpoint_tensors(dir)?;
    Ok(match merge {
        Some(adapter) => VarBuilder::from_backend(
            Box::new(MergingBackend::new(tensors, adapter.clone()).map_err(anyhow::Error::msg)?),
            dtype,
            device.clone(),
        ),
        None => VarBuilder::from_backend(Box::new(tensors), dtype, device.clone()),
    })
}

/// Every `*.safetensors` file of a checkpoint directory, memory-mapped, its
/// tensors in the types they are stored in.
pub fn checkpoint_tensors(dir: &Path) -> anyhow::Result<MmapedSafetensors> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "no .safetensors files in {}",
        dir.display()
    );
    // SAFETY: the files are memory-mapped read-only; qpai never writes them
    // while serving, and a model directory changed underneath a running
    // server is outside what any mmap-based loader can defend against.
    Ok(unsafe { MmapedSafetensors::multi(&files)? })
}
