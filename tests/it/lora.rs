//! PEFT adapters as PEFT writes them (tests/fixtures/lora, made by
//! scripts/reference/make_lora_fixtures.py) load whole and fit their base.

use qpai::lora::{Adapter, Projection};
use serde_json::Value;

use crate::common::{fixture, fixtures_dir};

/// (in, out) of each projection of the tiny Llama base, from its config.json.
fn base_shape(config: &Value) -> impl Fn(Projection) -> (usize, usize) {
    let get = |key: &str| config[key].as_u64().unwrap() as usize;
    let (hidden, inter, heads, kv, head) = (
        get("hidden_size"),
        get("intermediate_size"),
        get("num_attention_heads"),
        get("num_key_value_heads"),
        get("head_dim"),
    );
    move |projection| match projection {
        Projection::Q => (hidden, heads * head),
        Projection::K | Projection::V => (hidden, kv * head),
        Projection::O => (heads * head, hidden),
        Projection::Gate | Projection::Up => (hidden, inter),
        Projection::Down => (inter, hidden),
    }
}

#[test]
fn peft_adapters_load_whole_and_fit_their_base() {
    let config = fixture("tiny/llama-bf16/config.json");
    let layers = config["num_hidden_layers"].as_u64().unwrap() as usize;
    for (name, rank, scale, projections) in [
        ("r4-all", 4, 2.0, 7),
        ("r8-rslora", 8, 16.0 / 8f64.sqrt(), 3),
    ] {
        let adapter = Adapter::load(&fixtures_dir().join("lora").join(name)).unwrap();
        assert_eq!(adapter.config.r, rank, "{name}");
        assert!(
            (adapter.scale - scale).abs() < 1e-12,
            "{name}: {}",
            adapter.scale
        );
        assert_eq!(adapter.factors.len(), layers * projections, "{name}");
        adapter.check_base(layers, base_shape(&config)).unwrap();
        // Another base's shapes are caught.
        let error = adapter.check_base(layers, |_| (32, 32)).unwrap_err();
        assert!(error.contains("another base"), "{error}");
    }
}

#[test]
fn a_corrupt_adapter_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let source = fixtures_dir().join("lora/r4-all");
    std::fs::copy(
        source.join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    let error = Adapter::load(tmp.path()).unwrap_err();
    assert!(
        error.contains("adapter_model.safetensors is missing"),
        "{error}"
    );
    let mut bytes = std::fs::read(source.join("adapter_model.safetensors")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(tmp.path().join("adapter_model.safetensors"), bytes).unwrap();
    let error = Adapter::load(tmp.path()).unwrap_err();
    assert!(error.contains("not a readable safetensors file"), "{error}");
}
