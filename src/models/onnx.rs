//! A BERT-style encoder run by ONNX Runtime through `ort`, with the runtime
//! library loaded at run time from the model directory (the catalog's fetch
//! step takes `libonnxruntime.so.*` from the `onnxruntime` wheel) or from
//! `ORT_DYLIB_PATH`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::Context;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;

/// ONNX Runtime is loaded once per process; later models reuse it.
static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment(dir: &Path) -> anyhow::Result<&'static ort::environment::Environment> {
    ENVIRONMENT
        .get_or_init(|| {
            let library = runtime_library(dir).map_err(|e| format!("{e:#}"))?;
            tracing::info!(library = %library.display(), "loading ONNX Runtime");
            ort::init_from(&library)
                .map_err(|e| format!("loading {}: {e}", library.display()))?
                .with_name("qpai")
                .build()
                .map_err(|e| format!("starting ONNX Runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `ORT_DYLIB_PATH`, else the `libonnxruntime.so*` in the model directory.
fn runtime_library(dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(path));
    }
    std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so") || n == "onnxruntime.dll")
        })
        .with_context(|| {
            format!(
                "no libonnxruntime in {} and ORT_DYLIB_PATH is not set",
                dir.display()
            )
        })
}

pub struct OnnxEncoder {
    session: Mutex<Session>,
    pub dimensions: usize,
    wants_token_type_ids: bool,
}

impl OnnxEncoder {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let env = environment(dir)?;
        let threads = rayon::current_num_threads();
        let session = Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_intra_threads(threads)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .commit_from_file(dir.join("model.onnx"))
            .with_context(|| format!("loading {}", dir.join("model.onnx").display()))?;
        let wants_token_type_ids = session
            .inputs()
            .iter()
            .any(|i| i.name() == "token_type_ids");
        let dimensions = session
            .outputs()
            .first()
            .and_then(|o| o.dtype().tensor_shape().and_then(|s| s.last().copied()))
            .filter(|&d| d > 0)
            .context("the ONNX model's first output has no fixed hidden size")?
            as usize;
        Ok(Self {
            session: Mutex::new(session),
            dimensions,
            wants_token_type_ids,
        })
    }

    /// Hidden states `[rows, width, dimensions]`, flattened.
    pub fn forward(
        &self,
        ids: &[u32],
        mask: &[u32],
        rows: usize,
        width: usize,
    ) -> anyhow::Result<Vec<f32>> {
        let shape = [rows, width];
        let as_i64 = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>();
        let ids = Tensor::from_array((shape, as_i64(ids)))?;
        let mask = Tensor::from_array((shape, as_i64(mask)))?;
        let mut session = self
            .session
            .lock()
            .map_err(|_| anyhow::anyhow!("ONNX session poisoned"))?;
        let outputs = if self.wants_token_type_ids {
            let types = Tensor::from_array((shape, vec![0i64; rows * width]))?;
            session.run(ort::inputs![
                "input_ids" => ids,
                "attention_mask" => mask,
                "token_type_ids" => types
            ])?
        } else {
            session.run(ort::inputs!["input_ids" => ids, "attention_mask" => mask])?
        };
        let (_, hidden) = outputs[0].try_extract_tensor::<f32>()?;
        Ok(hidden.to_vec())
    }
}
