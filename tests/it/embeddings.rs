//! Sentence embeddings against sentence-transformers
//! (tests/fixtures/embeddings_minilm.json, made by
//! scripts/reference/make_embedding_fixtures.py), and `/v1/embeddings`.

use std::sync::{Arc, OnceLock};

use axum::http::StatusCode;
use qpai::catalog::Catalog;
use qpai::catalog::fetch::ModelStore;
use qpai::catalog::resolve::load_embedding_model;
use qpai::models::embedding::EmbeddingModel;
use qpai::{EmbeddingSlot, Gateway, HttpConfig};
use serde_json::{Value, json};

use crate::common::*;

const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";
/// The bar for the f32 model (qpai's packed CPU encoder) against sentence-transformers.
const MIN_COSINE: f32 = 0.9999;

/// The int8 ONNX model run by ONNX Runtime.
const ONNX_MODEL: &str = "all-minilm-l6-v2-int8";
/// The bar for int8 against sentence-transformers' f32.
const MIN_COSINE_INT8: f32 = 0.999;

pub fn load_embedding(id: &str) -> anyhow::Result<EmbeddingModel> {
    let catalog = Catalog::load(None)?;
    let store = ModelStore::new(models_dir()).with_progress(false);
    load_embedding_model(id, &catalog, &store)
}

fn load() -> anyhow::Result<EmbeddingModel> {
    load_embedding(EMBEDDING_MODEL)
}

/// all-MiniLM-L6-v2 (f32), loaded once for the whole test binary.
pub fn model() -> &'static Arc<EmbeddingModel> {
    static MODEL: OnceLock<Arc<EmbeddingModel>> = OnceLock::new();
    MODEL.get_or_init(|| Arc::new(load().unwrap()))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn embeddings_match_sentence_transformers_batched_and_single() {
    let fixture = fixture("embeddings_minilm.json");
    let cases = fixture["cases"].as_array().unwrap();
    let model = model();
    let ids: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| model.tokenize(c["text"].as_str().unwrap()).unwrap())
        .collect();
    for (case, ids) in cases.iter().zip(&ids) {
        let expected: Vec<u32> = serde_json::from_value(case["token_ids"].clone()).unwrap();
        assert_eq!(ids, &expected, "token ids of {:?}", case["text"]);
    }
    let batched = model.embed(&ids).unwrap();
    let mut worst = 1f32;
    for ((case, ids), vector) in cases.iter().zip(&ids).zip(&batched) {
        let reference: Vec<f32> = serde_json::from_value(case["embedding"].clone()).unwrap();
        let similarity = cosine(vector, &reference);
        worst = worst.min(similarity);
        assert!(
            similarity >= MIN_COSINE,
            "{:?}: cosine {similarity}",
            case["text"]
        );
        let single = model.embed(std::slice::from_ref(ids)).unwrap();
        assert!(
            cosine(&single[0], vector) > 0.999_999,
            "batched != single for {:?}",
            case["text"]
        );
    }
    eprintln!(
        "embeddings: worst cosine vs sentence-transformers = {worst:.7} over {} texts",
        cases.len()
    );
}

/// The int8 model against sentence-transformers' f32 vectors and against
/// Python ONNX Runtime on the same file (tests/fixtures/embeddings_minilm_int8_ort.json,
/// made by scripts/reference/make_onnx_fixtures.py). The int8 model itself
/// moves very short texts below 0.999 (Python ORT gives the same), so the
/// issue's 0.999 bar is checked on the mean, and each text against what the
/// int8 model gives in Python.
#[test]
fn int8_onnx_embeddings_match_python_onnxruntime_and_sentence_transformers() {
    let st_fixture = fixture("embeddings_minilm.json");
    let ort_fixture = fixture("embeddings_minilm_int8_ort.json");
    let cases = st_fixture["cases"].as_array().unwrap();
    let ort_cases = ort_fixture["cases"].as_array().unwrap();
    let onnx = load_embedding(ONNX_MODEL).unwrap();
    assert_eq!(onnx.backend(), "onnx");
    assert_eq!(onnx.dimensions, 384);
    let ids: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| onnx.tokenize(c["text"].as_str().unwrap()).unwrap())
        .collect();
    let batched = onnx.embed(&ids).unwrap();
    let (mut worst, mut sum, mut worst_vs_ort) = (1f32, 0f32, 1f32);
    for (((case, ort_case), ids), vector) in cases.iter().zip(ort_cases).zip(&ids).zip(&batched) {
        assert_eq!(case["text"], ort_case["text"]);
        let reference: Vec<f32> = serde_json::from_value(case["embedding"].clone()).unwrap();
        let python: Vec<f32> = serde_json::from_value(ort_case["embedding"].clone()).unwrap();
        let similarity = cosine(vector, &reference);
        let python_similarity = ort_case["cosine_to_sentence_transformers"]
            .as_f64()
            .unwrap() as f32;
        let vs_ort = cosine(vector, &python);
        worst = worst.min(similarity);
        worst_vs_ort = worst_vs_ort.min(vs_ort);
        sum += similarity;
        assert!(
            vs_ort >= 0.99999,
            "{:?}: cosine to Python ORT {vs_ort}",
            case["text"]
        );
        assert!(
            similarity >= python_similarity - 1e-4,
            "{:?}: {similarity} < Python's {python_similarity}",
            case["text"]
        );
        let single = onnx.embed(std::slice::from_ref(ids)).unwrap();
        assert!(
            cosine(&single[0], vector) > 0.99999,
            "batched != single for {:?}",
            case["text"]
        );
    }
    let mean = sum / cases.len() as f32;
    assert!(mean >= MIN_COSINE_INT8, "mean cosine {mean}");
    eprintln!(
        "int8 ONNX embeddings: vs sentence-transformers mean {mean:.5}, worst {worst:.5}; vs Python ORT worst {worst_vs_ort:.6}"
    );
}

fn embedding_app() -> axum::Router {
    let gateway = Gateway::builder()
        .embedding(EmbeddingSlot::new(EMBEDDING_MODEL, 256, load))
        .build()
        .unwrap();
    qpai::app(gateway, HttpConfig::default())
}

/// Callers that ask at the same time share the queue's passes, and each
/// gets exactly the vectors it would get alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_passes_and_get_their_own_vectors() {
    // A model of its own, so the pass count is this test's.
    let model = Arc::new(load().unwrap());
    let fixture = fixture("embeddings_minilm.json");
    let texts: Vec<String> = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .cycle()
        .take(48)
        .collect();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenize(t).unwrap()).collect();
    let alone: Vec<Vec<f32>> = ids
        .iter()
        .map(|one| model.embed(std::slice::from_ref(one)).unwrap().remove(0))
        .collect();
    // Every request is queued before any is answered.
    let answers = futures::future::join_all(
        ids.iter()
            .map(|one| model.embed_queued(vec![one.clone(), one.clone()])),
    )
    .await;
    let passes = model.queue_passes();
    for ((answer, expected), text) in answers.into_iter().zip(&alone).zip(&texts) {
        let vectors = answer.unwrap();
        assert_eq!(vectors.len(), 2, "{text:?}");
        for vector in &vectors {
            let diff = vector
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-6, "{text:?}: differs by {diff} when batched");
        }
    }
    assert!(
        passes < 12,
        "48 requests queued together took {passes} passes"
    );
    assert!(passes >= 1);
    assert!(model.embed_queued(Vec::new()).await.unwrap().is_empty());
}

#[tokio::test]
async fn embeddings_endpoint_speaks_openai() {
    let app = embedding_app();
    let body = json!({"model": EMBEDDING_MODEL, "input": ["The cat sits on the mat.", "A cat is sitting on a mat."]});
    let (status, value) = send_json(&app, post_json("/v1/embeddings", &body)).await;
    assert_eq!(status, StatusCode::OK, "{value}");
    assert_eq!(value["object"], "list");
    let data = value["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let vector =
        |i: usize| -> Vec<f32> { serde_json::from_value(data[i]["embedding"].clone()).unwrap() };
    assert_eq!(vector(0).len(), 384);
    assert!(cosine(&vector(0), &vector(1)) > 0.9);
    assert_eq!(data[1]["index"], 1);
    let tokens: usize = ["The cat sits on the mat.", "A cat is sitting on a mat."]
        .iter()
        .map(|t| model().tokenize(t).unwrap().len())
        .sum();
    assert_eq!(value["usage"]["prompt_tokens"], tokens);
    assert_eq!(value["usage"]["total_tokens"], tokens);

    // base64: little-endian f32 of the same vector.
    let body = json!({"model": EMBEDDING_MODEL, "input": "The cat sits on the mat.", "encoding_format": "base64"});
    let (_, encoded) = send_json(&app, post_json("/v1/embeddings", &body)).await;
    let text = encoded["data"][0]["embedding"].as_str().unwrap();
    // 384 f32 = 1536 bytes = 2048 base64 characters.
    assert_eq!(text.len(), 2048);

    let bad = |input: Value, extra: Value| {
        let mut body = json!({"model": EMBEDDING_MODEL, "input": input});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (body, status, param) in [
        (
            bad(json!("hi"), json!({"dimensions": 128})),
            400,
            "dimensions",
        ),
        (bad(json!(""), json!({})), 400, "input"),
        (bad(json!([]), json!({})), 400, "input"),
        (bad(json!([999_999]), json!({})), 400, "input"),
        (
            bad(json!("hi"), json!({"encoding_format": "int8"})),
            400,
            "encoding_format",
        ),
        (json!({"model": "nope", "input": "hi"}), 404, "model"),
    ] {
        let (got, value) = send_json(&app, post_json("/v1/embeddings", &body)).await;
        assert_eq!(got.as_u16(), status, "{body}: {value}");
        assert_eq!(value["error"]["param"], param, "{body}: {value}");
    }
    let (status, list) = send_json(
        &app,
        axum::http::Request::get("/v1/models")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"][0]["kind"], "embedding");
}
