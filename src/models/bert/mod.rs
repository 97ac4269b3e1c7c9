//! qpai's own BERT encoder for sentence embeddings on the CPU, in f32 (the
//! exact checkpoint, no quantization).
//!
//! A batch is packed, not padded: the tokens of every text sit one after the
//! other in one `[tokens, hidden]` matrix, as varlen attention does on GPUs.
//! The linear layers are one large matrix product each (Q, K and V fused,
//! weights packed at load: `packed_gemm`),
//! and attention runs per text and head over that text's own tokens, so no
//! work is spent on padding and no mask is needed. Layer norm, GELU and the
//! softmax are fused loops on the rayon pool; the products use the `gemm`
//! crate that candle's CPU backend uses.

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;

use super::packed_gemm::{self, PackedKernel, PackedLinear, Panels};

use super::embedding::mean_unit;

/// Tokens in one packed pass. Passes of 2,048 keep the largest buffer
/// ([tokens, 1536] f32 for MiniLM) at 12 MB, which the allocator reuses; at
/// 8,192 each pass mapped fresh pages (11% slower).
const PASS_TOKENS: usize = 2048;

/// Loads one linear layer, or several side by side (Q, K and V as one).
fn linear(
    vb: &VarBuilder,
    names: &[&str],
    inputs: usize,
    outputs: usize,
) -> anyhow::Result<PackedLinear> {
    let mut weight = Vec::with_capacity(inputs * outputs * names.len());
    let mut bias = Vec::with_capacity(outputs * names.len());
    for name in names {
        let vb = vb.pp(*name);
        weight.extend(
            vb.get((outputs, inputs), "weight")?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
        bias.extend(vb.get(outputs, "bias")?.to_vec1::<f32>()?);
    }
    Ok(PackedLinear::new(
        weight,
        bias,
        inputs,
        outputs * names.len(),
    ))
}

struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> anyhow::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?.to_vec1::<f32>()?,
            bias: vb.get(size, "bias")?.to_vec1::<f32>()?,
            eps: eps as f32,
        })
    }

    /// `x = norm(x + residual)`, row by row, in place.
    fn add_forward(&self, x: &mut [f32], residual: &[f32]) {
        let width = self.weight.len();
        x.par_chunks_mut(width * 16)
            .zip(residual.par_chunks(width * 16))
            .for_each(|(rows, residual_rows)| {
                for (row, res) in rows.chunks_mut(width).zip(residual_rows.chunks(width)) {
                    row.iter_mut().zip(res).for_each(|(x, r)| *x += r);
                    self.normalize(row);
                }
            });
    }

    fn normalize(&self, row: &mut [f32]) {
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let variance = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n;
        let scale = 1.0 / (variance + self.eps).sqrt();
        for ((x, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
            *x = (*x - mean) * scale * w + b;
        }
    }
}

struct Layer {
    qkv: PackedLinear,
    attention_out: PackedLinear,
    attention_norm: LayerNorm,
    intermediate: PackedLinear,
    output: PackedLinear,
    output_norm: LayerNorm,
}

/// Where one text's tokens sit in a packed batch.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
}

pub struct BertEncoder {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    vocab: usize,
    max_positions: usize,
}

impl BertEncoder {
    /// Loads a sentence-transformers BERT checkpoint (with or without the
    /// `bert.` prefix). GELU must be the exact (erf) one, as in BERT.
    pub fn load(dir: &std::path::Path, config: &Config) -> anyhow::Result<Self> {
        anyhow::ensure!(
            matches!(config.hidden_act, HiddenAct::Gelu),
            "the packed BERT encoder runs exact GELU only, not {:?}",
            config.hidden_act
        );
        let vb = super::checkpoint::checkpoint_vars(dir, DType::F32, &Device::Cpu, None)?;
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let hidden = config.hidden_size;
        let inner = config.intermediate_size;
        let eps = config.layer_norm_eps;
        let table = |name: &str, rows: usize| -> anyhow::Result<Vec<f32>> {
            Ok(vb
                .pp("embeddings")
                .get((rows, hidden), name)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attention = vb.pp("attention");
                Ok(Layer {
                    qkv: linear(
                        &attention.pp("self"),
                        &["query", "key", "value"],
                        hidden,
                        hidden,
                    )?,
                    attention_out: linear(&attention.pp("output"), &["dense"], hidden, hidden)?,
                    attention_norm: LayerNorm::load(attention.pp("output.LayerNorm"), hidden, eps)?,
                    intermediate: linear(&vb.pp("intermediate"), &["dense"], hidden, inner)?,
                    output: linear(&vb.pp("output"), &["dense"], inner, hidden)?,
                    output_norm: LayerNorm::load(vb.pp("output.LayerNorm"), hidden, eps)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            word: table("word_embeddings.weight", config.vocab_size)?,
            position: table("position_embeddings.weight", config.max_position_embeddings)?,
            token_type: table("token_type_embeddings.weight", config.type_vocab_size)?,
            embedding_norm: LayerNorm::load(vb.pp("embeddings.LayerNorm"), hidden, eps)?,
            layers,
            hidden,
            heads: config.num_attention_heads,
            vocab: config.vocab_size,
            max_positions: config.max_position_embeddings,
        })
    }

    /// Mean-pooled, unit-length embeddings of tokenized texts, in their
    /// order, in packed passes of up to `PASS_TOKENS` tokens.
    pub fn embed(&self, texts: &[Vec<u32>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        let mut start = 0;
        while start < texts.len() {
            let mut end = start + 1;
            let mut tokens = texts[start].len();
            while end < texts.len() && tokens + texts[end].len() <= PASS_TOKENS {
                tokens += texts[end].len();
                end += 1;
            }
            out.extend(self.pass(&texts[start..end])?);
            start = end;
        }
        Ok(out)
    }

    /// One packed pass. Every text must have 1..=max_positions tokens.
    fn pass(&self, texts: &[Vec<u32>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let mut spans = Vec::with_capacity(texts.len());
        let mut start = 0;
        for ids in texts {
            anyhow::ensure!(
                !ids.is_empty() && ids.len() <= self.max_positions,
                "a text of {} tokens (the encoder takes 1 to {})",
                ids.len(),
                self.max_positions
            );
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
                anyhow::bail!("token id {bad} is outside the vocabulary of {}", self.vocab);
            }
            spans.push(Span {
                start,
                len: ids.len(),
            });
            start += ids.len();
        }
        let mut x = self.embeddings(texts);
        for layer in &self.layers {
            x = self.layer(layer, x, &spans);
        }
        Ok(spans
            .iter()
            .map(|span| {
                let states = &x[span.start * self.hidden..][..span.len * self.hidden];
                mean_unit(states.chunks(self.hidden), self.hidden)
            })
            .collect())
    }

    fn embeddings(&self, texts: &[Vec<u32>]) -> Vec<f32> {
        let h = self.hidden;
        let total: usize = texts.iter().map(Vec::len).sum();
        let mut x = vec![0f32; total * h];
        let mut rows = x.chunks_mut(h);
        for ids in texts {
            for (position, &id) in ids.iter().enumerate() {
                let row = rows.next().expect("one row per token");
                let word = &self.word[id as usize * h..][..h];
                let position = &self.position[position * h..][..h];
                for (((out, w), p), t) in row
                    .iter_mut()
                    .zip(word)
                    .zip(position)
                    .zip(&self.token_type[..h])
                {
                    *out = w + p + t;
                }
            }
        }
        x.par_chunks_mut(h * 16).for_each(|rows| {
            rows.chunks_mut(h)
                .for_each(|row| self.embedding_norm.normalize(row))
        });
        x
    }

    fn layer(&self, layer: &Layer, x: Vec<f32>, spans: &[Span]) -> Vec<f32> {
        let qkv = layer.qkv.forward(&x);
        let context = self.attention(&qkv, spans);
        let mut attended = layer.attention_out.forward(&context);
        layer.attention_norm.add_forward(&mut attended, &x);
        let mut inner = layer.intermediate.forward(&attended);
        inner.par_chunks_mut(4096).for_each(|chunk| {
            chunk.iter_mut().for_each(|v| *v = gelu(*v));
        });
        let mut out = layer.output.forward(&inner);
        layer.output_norm.add_forward(&mut out, &attended);
        out
    }

    /// Scaled dot-product attention of every text and head over its own
    /// tokens. `qkv` is `[tokens, 3 × hidden]`; returns `[tokens, hidden]`.
    fn attention(&self, qkv: &[f32], spans: &[Span]) -> Vec<f32> {
        let h = self.hidden;
        let d = h / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let total: usize = spans.iter().map(|s| s.len).sum();
        // Each (text, head) writes its own block; the blocks are scattered
        // into the token-major layout afterwards.
        let blocks: Vec<(Span, usize, Vec<f32>)> = spans
            .par_iter()
            .flat_map_iter(|&span| (0..self.heads).map(move |head| (span, head)))
            .map(|(span, head)| {
                if let Some(kernel) = packed_gemm::packed_kernel() {
                    return (
                        span,
                        head,
                        Self::head_packed(kernel, qkv, span, head, h, d, scale),
                    );
                }
                let mut scores = vec![0f32; span.len * span.len];
                let mut out = vec![0f32; span.len * d];
                let base = span.start * 3 * h + head * d;
                let stride = 3 * h as isize;
                // SAFETY: q, k and v of this head are the d-wide column blocks
                // at offsets 0, h and 2h of rows start..start+len of qkv; with
                // the row stride 3h every read stays inside qkv. scores and out
                // are dense buffers of len × len and len × d.
                unsafe {
                    let q = qkv.as_ptr().add(base);
                    let k = qkv.as_ptr().add(base + h);
                    let v = qkv.as_ptr().add(base + 2 * h);
                    // scores = q kᵀ · scale
                    gemm::gemm(
                        span.len,
                        span.len,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        span.len as isize,
                        false,
                        q,
                        1,
                        stride,
                        k,
                        stride,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    scores.chunks_mut(span.len).for_each(softmax);
                    // out = scores v
                    gemm::gemm(
                        span.len,
                        d,
                        span.len,
                        out.as_mut_ptr(),
                        1,
                        d as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        span.len as isize,
                        v,
                        1,
                        stride,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                (span, head, out)
            })
            .collect();
        let mut context = vec![0f32; total * h];
        for (span, head, out) in blocks {
            for (t, row) in out.chunks(d).enumerate() {
                context[(span.start + t) * h + head * d..][..d].copy_from_slice(row);
            }
        }
        context
    }

    /// One text's head through the packed kernel: K and V are
    /// packed as right-hand matrices, Q is scaled on the way in.
    fn head_packed(
        kernel: PackedKernel,
        qkv: &[f32],
        span: Span,
        head: usize,
        h: usize,
        d: usize,
        scale: f32,
    ) -> Vec<f32> {
        let at = |token: usize, part: usize, c: usize| {
            qkv[(span.start + token) * 3 * h + part * h + head * d + c]
        };
        let q: Vec<f32> = (0..span.len)
            .flat_map(|t| (0..d).map(move |c| at(t, 0, c) * scale))
            .collect();
        let keys = Panels::pack(kernel, span.len, d, |j, c| at(j, 1, c));
        let mut scores = vec![0f32; span.len * span.len];
        keys.multiply(&q, None, &mut scores, false);
        scores.chunks_mut(span.len).for_each(softmax);
        let values = Panels::pack(kernel, d, span.len, |c, j| at(j, 2, c));
        let mut out = vec![0f32; span.len * d];
        values.multiply(&scores, None, &mut out, false);
        out
    }
}

fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|v| *v = exp_nonpositive(*v - max));
    let sum: f32 = row.iter().sum();
    let inverse = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inverse);
}

/// e^x for x ≤ 0 to about 2e-7 relative, branch-free so softmax
/// vectorizes: x = n·ln2 + r with |r| ≤ ln2/2, e^r by its Taylor series to
/// r⁶, 2ⁿ built in the exponent bits. Below -87 (where f32 turns
/// subnormal) it returns e^-87, which a softmax sum cannot tell from 0.
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HIGH: f32 = 0.693_145_75;
    const LN2_LOW: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// Exact GELU, `x · Φ(x)`, BERT's `gelu` (erf) activation.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf in f32 to about 1e-7: the rational approximation Eigen and XLA use
/// (beyond ±4, erf is ±1 in f32). Branch-free, so the loop vectorizes.
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    for a in [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ] {
        p = p.mul_add(x2, a);
    }
    let mut q = -1.456_607_2e-5_f32;
    for b in [
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329e-3,
        -1.426_473_9e-2,
    ] {
        q = q.mul_add(x2, b);
    }
    x * p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_the_f64_reference() {
        let worst = (-6000..=6000)
            .map(|i| i as f32 / 1000.0)
            .map(|x| (f64::from(erf(x)) - candle_core::cpu::erf::erf_f64(f64::from(x))).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "worst erf error {worst}");
    }

    #[test]
    fn exp_matches_the_standard_library() {
        let worst = (0..=87_000)
            .map(|i| -(i as f32) / 1000.0)
            .map(|x| ((exp_nonpositive(x) - x.exp()) / x.exp()).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-6, "worst relative exp error {worst}");
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut row = vec![1.0, 3.0, -2.0, 3.0];
        softmax(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(row[1] > row[0] && row[0] > row[2] && row[1] == row[3]);
    }
}
