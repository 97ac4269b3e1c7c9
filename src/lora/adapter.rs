//! `adapter_model.safetensors`: the low-rank factors A (r x in) and B
//! (out x r) of every targeted projection of every layer, loaded in f32 and
//! checked whole (names, pairs, rank, finiteness) before use.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::config::AdapterConfig;
use super::projection::Projection;

/// The factors of one projection: the update is `scale * B (A x)`.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// r x in.
    pub a: Tensor,
    /// out x r.
    pub b: Tensor,
}

#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub scale: f64,
    pub factors: BTreeMap<(usize, Projection), LoraFactors>,
    /// Bytes the factors take in memory (f32).
    pub bytes: usize,
}

/// `...layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight` -> (i, proj, is_a).
pub fn parse_key(key: &str) -> Option<(usize, Projection, bool)> {
    let rest = key.strip_suffix(".weight")?;
    let (rest, is_a) = match rest.rsplit_once('.')? {
        (rest, "lora_A") => (rest, true),
        (rest, "lora_B") => (rest, false),
        _ => return None,
    };
    let (rest, projection) = rest.rsplit_once('.')?;
    let projection = Projection::from_name(projection)?;
    let (rest, block) = rest.rsplit_once('.')?;
    if block != "self_attn" && block != "mlp" {
        return None;
    }
    let (rest, layer) = rest.rsplit_once('.')?;
    rest.ends_with("layers").then_some(())?;
    Some((layer.parse().ok()?, projection, is_a))
}

impl Adapter {
    /// Loads and checks a PEFT adapter directory.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let config = AdapterConfig::parse(&text)?;
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() {
            return Err(format!("{} is missing", weights_path.display()));
        }
        let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| {
            format!(
                "{}: not a readable safetensors file: {e}",
                weights_path.display()
            )
        })?;
        Self::from_tensors(config, tensors)
    }

    pub fn from_tensors(
        config: AdapterConfig,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Result<Self, String> {
        let targets = config.targets()?;
        let mut halves: BTreeMap<(usize, Projection), (Option<Tensor>, Option<Tensor>)> =
            BTreeMap::new();
        for (key, tensor) in tensors {
            let (layer, projection, is_a) = parse_key(&key)
                .ok_or_else(|| format!("unexpected tensor {key:?} in the adapter"))?;
            if !targets.contains(&projection) {
                return Err(format!(
                    "tensor {key:?} is for {}, which target_modules does not list",
                    projection.name()
                ));
            }
            let tensor = tensor
                .to_dtype(DType::F32)
                .map_err(|e| format!("{key}: {e}"))?;
            let finite = tensor
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| format!("{key}: {e}"))?
                .iter()
                .all(|x| x.is_finite());
            if !finite {
                return Err(format!("{key} holds NaN or infinite values"));
            }
            let entry = halves.entry((layer, projection)).or_default();
            if is_a {
                entry.0 = Some(tensor)
            } else {
                entry.1 = Some(tensor)
            }
        }
        if halves.is_empty() {
            return Err("the adapter holds no LoRA tensors".to_string());
        }
        let mut factors = BTreeMap::new();
        let mut bytes = 0;
        for ((layer, projection), pair) in halves {
            let name = format!("layer {layer} {}", projection.name());
            let (Some(a), Some(b)) = pair else {
                return Err(format!("{name} lacks its lora_A or lora_B"));
            };
            let (a_dims, b_dims) = (a.dims().to_vec(), b.dims().to_vec());
            let ok = a_dims.len() == 2
                && b_dims.len() == 2
                && a_dims[0] == config.r
                && b_dims[1] == config.r;
            if !ok {
                return Err(format!(
                    "{name}: lora_A is {a_dims:?} and lora_B {b_dims:?}; rank r = {} needs [r, in] and [out, r]",
                    config.r
                ));
            }
            bytes += (a.elem_count() + b.elem_count()) * 4;
            factors.insert((layer, projection), LoraFactors { a, b });
        }
        Ok(Self {
            scale: config.scale(),
            config,
            factors,
            bytes,
        })
    }

    /// Checks the adapter fits a base of `layers` layers whose projections
    /// map `in -> out` as `shape` says.
    pub fn check_base(
        &self,
        layers: usize,
        shape: impl Fn(Projection) -> (usize, usize),
    ) -> Result<(), String> {
        for (&(layer, projection), factors) in &self.factors {
            if layer >= layers {
                return Err(format!(
                    "the adapter has layer {layer}; the base has {layers} layers"
                ));
            }
            let (inputs, outputs) = shape(projection);
            let (a_in, b_out) = (factors.a.dims()[1], factors.b.dims()[0]);
            if (a_in, b_out) != (inputs, outputs) {
                return Err(format!(
                    "layer {layer} {}: the adapter maps {a_in} -> {b_out}, the base {inputs} -> {outputs} (an adapter for another base?)",
                    projection.name()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(targets: &str) -> AdapterConfig {
        AdapterConfig::parse(&format!(
            r#"{{"r": 2, "lora_alpha": 4, "target_modules": {targets}}}"#
        ))
        .unwrap()
    }

    fn key(layer: usize, block: &str, projection: &str, half: &str) -> String {
        format!("base_model.model.model.layers.{layer}.{block}.{projection}.lora_{half}.weight")
    }

    fn pair(
        layer: usize,
        block: &str,
        projection: &str,
        inputs: usize,
        outputs: usize,
    ) -> Vec<(String, Tensor)> {
        let a = Tensor::ones((2, inputs), DType::BF16, &Device::Cpu).unwrap();
        let b = Tensor::ones((outputs, 2), DType::BF16, &Device::Cpu).unwrap();
        vec![
            (key(layer, block, projection, "A"), a),
            (key(layer, block, projection, "B"), b),
        ]
    }

    #[test]
    fn loads_pairs_and_checks_the_base() {
        let mut tensors = pair(0, "self_attn", "q_proj", 8, 8);
        tensors.extend(pair(1, "mlp", "down_proj", 16, 8));
        let adapter = Adapter::from_tensors(config(r#"["q_proj", "down_proj"]"#), tensors).unwrap();
        assert_eq!(adapter.factors.len(), 2);
        assert_eq!(adapter.scale, 2.0);
        assert_eq!(adapter.bytes, (2 * 8 + 8 * 2 + 2 * 16 + 8 * 2) * 4);
        assert_eq!(
            adapter.factors[&(1, Projection::Down)].a.dtype(),
            DType::F32
        );
        let shape = |p| {
            if p == Projection::Down {
                (16, 8)
            } else {
                (8, 8)
            }
        };
        adapter.check_base(2, shape).unwrap();
        assert!(adapter.check_base(1, shape).unwrap_err().contains("layers"));
        assert!(
            adapter
                .check_base(2, |_| (8, 8))
                .unwrap_err()
                .contains("another base")
        );
    }

    #[test]
    fn bad_tensors_are_refused() {
        let only_a = vec![pair(0, "self_attn", "q_proj", 8, 8).remove(0)];
        let error = Adapter::from_tensors(config(r#"["q_proj"]"#), only_a).unwrap_err();
        assert!(error.contains("lacks"), "{error}");
        let untargeted = pair(0, "self_attn", "v_proj", 8, 8);
        let error = Adapter::from_tensors(config(r#"["q_proj"]"#), untargeted).unwrap_err();
        assert!(error.contains("target_modules"), "{error}");
        let head = vec![(
            "base_model.model.lm_head.weight".to_string(),
            Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap(),
        )];
        let error = Adapter::from_tensors(config(r#"["q_proj"]"#), head).unwrap_err();
        assert!(error.contains("unexpected tensor"), "{error}");
        let mut wrong_rank = pair(0, "self_attn", "q_proj", 8, 8);
        wrong_rank[0].1 = Tensor::ones((3, 8), DType::F32, &Device::Cpu).unwrap();
        let error = Adapter::from_tensors(config(r#"["q_proj"]"#), wrong_rank).unwrap_err();
        assert!(error.contains("rank"), "{error}");
        let mut nan = pair(0, "self_attn", "q_proj", 8, 8);
        nan[1].1 = (nan[1].1.to_dtype(DType::F32).unwrap() * f64::NAN).unwrap();
        let error = Adapter::from_tensors(config(r#"["q_proj"]"#), nan).unwrap_err();
        assert!(error.contains("NaN"), "{error}");
        let error = Adapter::load(Path::new("/no/such/adapter")).unwrap_err();
        assert!(error.contains("adapter_config.json"), "{error}");
    }
}
