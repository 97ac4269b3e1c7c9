//! Merging an adapter into its base at load: `W' = W + scale * B A`, so the
//! merged model runs at the base's speed. Safetensors checkpoints merge in
//! f32 through a `VarBuilder` backend; GGUF matrices are de-quantized, merged
//! and quantized again (to Q8_0 when their own type is coarser).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::adapter::Adapter;
use super::projection::Projection;
use super::unmerged::{HeadLayout, gguf_row_source};

/// `scale * B A` (`[out, in]`, f32) for one projection, rows in GGUF order
/// for q and k when `gguf_heads` is given.
pub fn delta(
    adapter: &Adapter,
    layer: usize,
    projection: Projection,
    gguf_heads: Option<HeadLayout>,
) -> candle_core::Result<Option<Tensor>> {
    let Some(factors) = adapter.factors.get(&(layer, projection)) else {
        return Ok(None);
    };
    let mut b = factors.b.clone();
    if let Some(heads) = gguf_heads {
        let order = match projection {
            Projection::Q => Some(gguf_row_source(heads.n_head, heads.head_dim)),
            Projection::K => Some(gguf_row_source(heads.n_kv_head, heads.head_dim)),
            _ => None,
        };
        if let Some(order) = order {
            let order: Vec<u32> = order.into_iter().map(|r| r as u32).collect();
            let index = Tensor::new(order.as_slice(), b.device())?;
            b = b.index_select(&index, 0)?;
        }
    }
    Ok(Some((b.matmul(&factors.a)? * adapter.scale)?))
}

/// The type a merged GGUF matrix is stored in: its own when that has 8 bits
/// or more per weight; Q8_0 otherwise, because a LoRA update is mostly
/// smaller than a 4- to 6-bit type's rounding step and would be lost in it.
pub fn merged_dtype(dtype: GgmlDType) -> GgmlDType {
    match dtype {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::Q8_0 => dtype,
        _ => GgmlDType::Q8_0,
    }
}

/// A GGUF matrix with `delta` merged, quantized to [`merged_dtype`].
pub fn merge_qtensor(tensor: QTensor, delta: &Tensor) -> candle_core::Result<QTensor> {
    let dtype = merged_dtype(tensor.dtype());
    let merged = (tensor.dequantize(&Device::Cpu)? + delta)?;
    QTensor::quantize(&merged, dtype)
}

/// Matrices stacked into one product must share a type: when merging left
/// them mixed, the others are stored as Q8_0 too.
pub fn same_type(parts: Vec<QTensor>) -> candle_core::Result<Vec<QTensor>> {
    let first = parts[0].dtype();
    if parts.iter().all(|p| p.dtype() == first) {
        return Ok(parts);
    }
    parts
        .into_iter()
        .map(|p| match p.dtype() {
            GgmlDType::Q8_0 => Ok(p),
            _ => QTensor::quantize(&p.dequantize(&Device::Cpu)?, GgmlDType::Q8_0),
        })
        .collect()
}

/// `model.layers.{i}.{self_attn|mlp}.{proj}.weight` -> (i, proj).
fn projection_of(name: &str) -> Option<(usize, Projection)> {
    let rest = name.strip_suffix(".weight")?;
    let (rest, projection) = rest.rsplit_once('.')?;
    let projection = Projection::from_name(projection)?;
    let (rest, block) = rest.rsplit_once('.')?;
    (block == "self_attn" || block == "mlp").then_some(())?;
    let (rest, layer) = rest.rsplit_once('.')?;
    rest.ends_with("layers").then_some(())?;
    Some((layer.parse().ok()?, projection))
}

/// Safetensors tensors with one adapter merged into the projections it targets.
pub struct MergingBackend {
    inner: MmapedSafetensors,
    adapter: std::sync::Arc<Adapter>,
}

impl MergingBackend {
    /// Checks that every projection the adapter changes exists in the
    /// checkpoint with the adapter's shape.
    pub fn new(inner: MmapedSafetensors, adapter: std::sync::Arc<Adapter>) -> Result<Self, String> {
        for (&(layer, projection), factors) in &adapter.factors {
            let block = match projection {
                Projection::Gate | Projection::Up | Projection::Down => "mlp",
                _ => "self_attn",
            };
            let name = format!("model.layers.{layer}.{block}.{}.weight", projection.name());
            let view = inner
                .get(&name)
                .map_err(|_| format!("the base has no {name} for the adapter's layer {layer} {} (an adapter for another base?)", projection.name()))?;
            let expected = [factors.b.dims()[0], factors.a.dims()[1]];
            if view.shape() != expected {
                return Err(format!(
                    "{name} is {:?}; the adapter's update is {expected:?} (an adapter for another base?)",
                    view.shape()
                ));
            }
        }
        Ok(Self { inner, adapter })
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let mut tensor = self.inner.load(name, device)?;
        if let Some((layer, projection)) = projection_of(name)
            && let Some(delta) = delta(&self.adapter, layer, projection, None)?
        {
            tensor = (tensor.to_dtype(DType::F32)? + delta.to_device(device)?)?;
        }
        tensor.to_dtype(dtype)
    }
}

impl SimpleBackend for MergingBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, device)?;
        if tensor.shape() != &shape {
            candle_core::bail!(
                "shape mismatch for {name}: expected {shape:?}, got {:?}",
                tensor.shape()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.get(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_map_to_projections() {
        assert_eq!(
            projection_of("model.layers.3.self_attn.k_proj.weight"),
            Some((3, Projection::K))
        );
        assert_eq!(
            projection_of("model.layers.0.mlp.down_proj.weight"),
            Some((0, Projection::Down))
        );
        assert_eq!(projection_of("model.embed_tokens.weight"), None);
        assert_eq!(projection_of("lm_head.weight"), None);
    }
}
