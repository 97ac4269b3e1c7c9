//! Loading a device decoder: a llama GGUF file (projections kept quantized
//! on the device) or a llama-family safetensors checkpoint (in the dtype
//! asked for), a merged adapter applied on the way; then the rotary tables
//! and the KV slab, sized to what the device can hold.

use std::io::{Read, Seek};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::quantized::{QMatMul, gguf_file};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::{DeviceDecoder, KvSlab, Layer, RopeLayout, Weight};
use crate::lora::{Adapter, HeadLayout, Projection};
use crate::models::checkpoint::checkpoint_vars;
use crate::models::cpu_decoder::gguf_name;
use crate::models::gguf_metadata;
use crate::models::kv_cache::{KvBudget, KvCacheConfig};

/// GiB kept free on an accelerator beside the weights and the KV slab, for
/// the activations of a forward pass and cuBLAS's workspace.
const WORKING_MEMORY: usize = 2 << 30;

/// The shape and numbers the rest of loading needs.
struct Dimensions {
    layers: usize,
    hidden: usize,
    heads: HeadLayout,
    eps: f32,
    theta: f32,
    context: usize,
}

/// What config.json says, under the names transformers writes.
#[derive(Deserialize)]
struct CheckpointConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    max_position_embeddings: usize,
    hidden_act: Option<String>,
    rope_theta: Option<f32>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    tie_word_embeddings: Option<bool>,
}

fn check_heads(heads: HeadLayout) -> anyhow::Result<()> {
    let HeadLayout {
        n_head,
        n_kv_head,
        head_dim,
    } = heads;
    anyhow::ensure!(
        n_head > 0 && n_kv_head > 0 && n_head.is_multiple_of(n_kv_head) && head_dim % 2 == 0,
        "unsupported head layout ({n_head} heads, {n_kv_head} KV heads, head dim {head_dim})"
    );
    Ok(())
}

impl DeviceDecoder {
    /// A llama GGUF file on `device`, `merge`'s adapter merged when given;
    /// serves at most `positions` positions.
    pub fn from_gguf<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        positions: usize,
        merge: Option<&Adapter>,
        kv_cache: KvCacheConfig,
    ) -> anyhow::Result<Self> {
        let number = |key: &str| -> anyhow::Result<usize> {
            Ok(gguf_metadata(ct, "llama", key)?.to_u32()? as usize)
        };
        let float = |key: &str, default: f32| {
            gguf_metadata(ct, "llama", key)
                .and_then(|v| v.to_f32())
                .unwrap_or(default)
        };
        anyhow::ensure!(
            float("rope.scaling.factor", 1.0) == 1.0,
            "GGUF files with rotary scaling are not supported"
        );
        let (n_head, hidden) = (number("attention.head_count")?, number("embedding_length")?);
        let heads = HeadLayout {
            n_head,
            n_kv_head: number("attention.head_count_kv")?,
            head_dim: number("attention.key_length").unwrap_or(hidden / n_head.max(1)),
        };
        check_heads(heads)?;
        let layers = number("block_count")?;
        anyhow::ensure!(
            layers > 0 && layers <= ct.tensor_infos.len(),
            "block_count {layers} does not match the file's tensors"
        );
        let dims = Dimensions {
            layers,
            hidden,
            heads,
            eps: gguf_metadata(ct, "llama", "attention.layer_norm_rms_epsilon")?.to_f32()?,
            theta: float("rope.freq_base", 10_000.0),
            context: positions,
        };
        let mut read = |name: &str, on: &Device| ct.tensor(reader, name, on);
        let embedding = read("token_embd.weight", device)?.dequantize(device)?;
        let output = match read("output.weight", device) {
            Ok(output) => output,
            Err(_) => read("token_embd.weight", device)?,
        };
        let mut blocks = Vec::with_capacity(layers);
        for i in 0..layers {
            let mut weight = |p: Projection| -> anyhow::Result<Weight> {
                let name = format!("blk.{i}.{}.weight", gguf_name(p));
                let delta = match merge {
                    Some(adapter) => crate::lora::merge::delta(adapter, i, p, Some(heads))?,
                    None => None,
                };
                // Merging runs on the CPU; the merged tensor then moves over.
                let q = match delta {
                    Some(delta) => moved_to(
                        crate::lora::merge::merge_qtensor(read(&name, &Device::Cpu)?, &delta)?,
                        device,
                    )?,
                    None => read(&name, device)?,
                };
                Ok(Weight::Quantized(QMatMul::from_qtensor(q)?))
            };
            let (q, k, v, o) = (
                weight(Projection::Q)?,
                weight(Projection::K)?,
                weight(Projection::V)?,
                weight(Projection::O)?,
            );
            let (gate, up, down) = (
                weight(Projection::Gate)?,
                weight(Projection::Up)?,
                weight(Projection::Down)?,
            );
            let mut vector =
                |suffix: &str| read(&format!("blk.{i}.{suffix}"), device)?.dequantize(device);
            blocks.push(Layer {
                attention_norm: vector("attn_norm.weight")?,
                q,
                k,
                v,
                o,
                ffn_norm: vector("ffn_norm.weight")?,
                gate,
                up,
                down,
            });
        }
        let norm = read("output_norm.weight", device)?.dequantize(device)?;
        let output = Weight::Quantized(QMatMul::from_qtensor(output)?);
        Self::assemble(
            dims,
            embedding,
            blocks,
            norm,
            output,
            RopeLayout::AdjacentPairs,
            DType::F32,
            device,
            kv_cache,
        )
    }

    /// A Llama / Mistral / Qwen2 checkpoint directory on `device` in `dtype`,
    /// `merge`'s adapter merged when given; at most `max_context` positions.
    pub fn from_checkpoint(
        dir: &Path,
        dtype: DType,
        device: &Device,
        merge: Option<&Arc<Adapter>>,
        max_context: Option<usize>,
        kv_cache: KvCacheConfig,
    ) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(dir.join("config.json"))?;
        let config: CheckpointConfig = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config.json is not a llama-family config: {e}"))?;
        let act = config.hidden_act.as_deref().unwrap_or("silu");
        anyhow::ensure!(
            act == "silu",
            "hidden_act `{act}` is not supported here (silu)"
        );
        let scaled = [&config.rope_scaling, &config.rope_parameters]
            .into_iter()
            .flatten()
            .any(|p| {
                p.get("rope_type")
                    .or_else(|| p.get("type"))
                    .and_then(|t| t.as_str())
                    .is_some_and(|t| t != "default")
            });
        anyhow::ensure!(
            !scaled,
            "rotary scaling is not supported on this device yet"
        );
        let context = max_context.map_or(config.max_position_embeddings, |m| {
            m.min(config.max_position_embeddings)
        });
        if let Some(window) = config.sliding_window
            && config.use_sliding_window != Some(false)
            && window < context
        {
            anyhow::bail!(
                "sliding-window attention (window {window}) is not supported on this device yet: serve at most {window} positions (--max-context)"
            );
        }
        let (hidden, n_head) = (config.hidden_size, config.num_attention_heads);
        let heads = HeadLayout {
            n_head,
            n_kv_head: config.num_key_value_heads.unwrap_or(n_head),
            head_dim: config.head_dim.unwrap_or(hidden / n_head.max(1)),
        };
        check_heads(heads)?;
        let theta = config
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta")?.as_f64())
            .map(|t| t as f32)
            .or(config.rope_theta)
            .unwrap_or(10_000.0);
        let vars = checkpoint_vars(dir, dtype, device, merge)?;
        let linear = |name: &str| -> anyhow::Result<Weight> {
            let weight = vars.get_unchecked(&format!("{name}.weight"))?;
            let bias_name = format!("{name}.bias");
            let bias = match vars.contains_tensor(&bias_name) {
                true => Some(vars.get_unchecked(&bias_name)?),
                false => None,
            };
            Ok(Weight::Dense(candle_nn::Linear::new(weight, bias)))
        };
        let vector = |name: &str| -> anyhow::Result<Tensor> {
            Ok(vars.get_unchecked(name)?.to_dtype(DType::F32)?)
        };
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let name = |suffix: &str| format!("model.layers.{i}.{suffix}");
            blocks.push(Layer {
                attention_norm: vector(&name("input_layernorm.weight"))?,
                q: linear(&name("self_attn.q_proj"))?,
                k: linear(&name("self_attn.k_proj"))?,
                v: linear(&name("self_attn.v_proj"))?,
                o: linear(&name("self_attn.o_proj"))?,
                ffn_norm: vector(&name("post_attention_layernorm.weight"))?,
                gate: linear(&name("mlp.gate_proj"))?,
                up: linear(&name("mlp.up_proj"))?,
                down: linear(&name("mlp.down_proj"))?,
            });
        }
        let embedding = vars.get_unchecked("model.embed_tokens.weight")?;
        let tied =
            config.tie_word_embeddings.unwrap_or(false) || !vars.contains_tensor("lm_head.weight");
        let output = match tied {
            true => Weight::Dense(candle_nn::Linear::new(embedding.clone(), None)),
            false => linear("lm_head")?,
        };
        let dims = Dimensions {
            layers: config.num_hidden_layers,
            hidden,
            heads,
            eps: config.rms_norm_eps as f32,
            theta,
            context,
        };
        let norm = vector("model.norm.weight")?;
        Self::assemble(
            dims,
            embedding,
            blocks,
            norm,
            output,
            RopeLayout::Halves,
            dtype,
            device,
            kv_cache,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        dims: Dimensions,
        embedding: Tensor,
        mut layers: Vec<Layer>,
        norm: Tensor,
        output: Weight,
        rope_layout: RopeLayout,
        dtype: DType,
        device: &Device,
        kv_cache: KvCacheConfig,
    ) -> anyhow::Result<Self> {
        let HeadLayout {
            n_head,
            n_kv_head,
            head_dim,
        } = dims.heads;
        let (vocab, hidden) = embedding.dims2()?;
        anyhow::ensure!(
            hidden == dims.hidden,
            "the embedding is {hidden} wide, not {}",
            dims.hidden
        );
        // Norm weights in the activations' type, as the norm kernel takes them.
        for layer in &mut layers {
            layer.attention_norm = layer.attention_norm.to_dtype(dtype)?;
            layer.ffn_norm = layer.ffn_norm.to_dtype(dtype)?;
        }
        let norm = norm.to_dtype(dtype)?;
        let context = dims.context.max(1);
        // The KV slab is sized (and refused when one sequence does not fit
        // the device, or this machine) before the rotary table, which is
        // smaller than one sequence's slot.
        let kv_width = n_kv_head * head_dim;
        let slot_bytes = [dims.layers, 2, context, kv_width, dtype.size_in_bytes()]
            .into_iter()
            .try_fold(1usize, usize::checked_mul)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "one sequence's KV cache at the served context ({context} positions) overflows: lower --max-context"
                )
            })?;
        let slots = kv_slots(kv_cache, slot_bytes, device)?;
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / dims.theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut angles = Vec::with_capacity(context * half);
        for p in 0..context {
            angles.extend(inv_freq.iter().map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (context, half), device)?;
        let (cos, sin) = (
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        );
        let slab = || Tensor::zeros((slots * context, kv_width), dtype, device);
        let kv = KvSlab {
            keys: (0..dims.layers).map(|_| slab()).collect::<Result<_, _>>()?,
            values: (0..dims.layers).map(|_| slab()).collect::<Result<_, _>>()?,
            free: Mutex::new((0..slots).rev().collect()),
            slots,
        };
        tracing::info!(
            slots,
            context,
            kv_mib = (slots * slot_bytes) >> 20,
            device = %crate::models::device_name(device),
            "KV slab allocated"
        );
        Ok(Self {
            embedding: embedding.to_dtype(dtype)?,
            layers,
            norm,
            output,
            vocab,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            eps: dims.eps,
            rope_layout,
            cos,
            sin,
            context,
            dtype,
            device: device.clone(),
            kv,
            budget: KvBudget::slots(context, slots),
        })
    }
}

/// A quantized tensor made on the CPU, moved to `device`.
fn moved_to(
    q: candle_core::quantized::QTensor,
    device: &Device,
) -> candle_core::Result<candle_core::quantized::QTensor> {
    if device.is_cpu() {
        return Ok(q);
    }
    let dtype = q.dtype();
    let shape = q.shape().clone();
    let data = q.data()?;
    let storage = candle_core::quantized::QStorage::from_data(data, device, dtype)?;
    candle_core::quantized::QTensor::new(storage, shape)
}

/// How many sequences' slots the KV slab gets: `--kv-cache-mb` worth, or the
/// configured number of sequences; on CUDA never more than the free memory
/// leaves after a working margin, elsewhere never more than this machine's
/// memory. Fails when not even one fits.
fn kv_slots(config: KvCacheConfig, slot_bytes: usize, device: &Device) -> anyhow::Result<usize> {
    let wanted = match config.megabytes {
        Some(mb) => (mb << 20) / slot_bytes.max(1),
        None => config.sequences.max(1),
    };
    let room = match free_device_memory(device)? {
        Some(free) => Some(free.saturating_sub(WORKING_MEMORY)),
        None => crate::models::kv_cache::physical_memory(),
    };
    let fits = room.map_or(wanted, |room| room / slot_bytes.max(1));
    let slots = wanted.min(fits);
    anyhow::ensure!(
        slots > 0,
        "the KV cache has no room for one sequence at the served context ({} MiB each): lower --max-context or raise --kv-cache-mb",
        slot_bytes >> 20
    );
    Ok(slots)
}

/// Free memory on a CUDA device (None elsewhere).
fn free_device_memory(device: &Device) -> anyhow::Result<Option<usize>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let stream = cuda.cuda_stream();
            stream
                .context()
                .bind_to_thread()
                .map_err(|e| anyhow::anyhow!("CUDA: {e:?}"))?;
            let (free, _total) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
                .map_err(|e| anyhow::anyhow!("CUDA memory info: {e:?}"))?;
            Ok(Some(free))
        }
        _ => Ok(None),
    }
}
