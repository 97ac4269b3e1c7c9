//! The fuzzers' committed inputs, replayed on stable Rust: every seed of
//! `fuzz/corpus/NAME` and every input of `fuzz/regressions/NAME` (one that
//! once crashed or hung the target) goes through its target in
//! `qpai::fuzzing`, each within libFuzzer's time limit; and every target
//! has its libFuzzer binary and seeds. GGUF findings are also checked for
//! the loader's errors.

use std::panic::catch_unwind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qpai::fuzzing::TARGETS;
use qpai::models::loader::LoadOptions;
use qpai::models::{ModelSource, load_model};

/// libFuzzer's `-timeout` in scripts/fuzz.sh: a slower input is a finding.
const TIME_LIMIT: Duration = Duration::from_secs(1);

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files in `dir`, by name (none when it does not exist).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// The names of the directories in `dir`.
fn subdirectories(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn every_committed_fuzz_input_passes_its_target_in_time() {
    let fuzz = fuzz_dir();
    let known = |name: &str| TARGETS.iter().any(|(target, _)| *target == name);
    for place in ["corpus", "regressions"] {
        for name in subdirectories(&fuzz.join(place)) {
            assert!(
                known(&name),
                "fuzz/{place}/{name} names no target of qpai::fuzzing"
            );
        }
    }
    for file in inputs(&fuzz.join("fuzz_targets")) {
        let name = file.file_stem().unwrap().to_string_lossy();
        assert!(
            known(&name),
            "{} names no target of qpai::fuzzing",
            file.display()
        );
    }
    let mut failures = Vec::new();
    let mut replayed = 0;
    for &(name, target) in TARGETS {
        assert!(
            fuzz.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{name}.rs is missing"
        );
        let seeds = inputs(&fuzz.join("corpus").join(name));
        assert!(!seeds.is_empty(), "fuzz/corpus/{name} holds no seeds");
        let regressions = inputs(&fuzz.join("regressions").join(name));
        // Untimed: what a target builds once per process (tokenizer,
        // templates, grammar engine) is not the cost of an input.
        let _ = catch_unwind(|| target(&std::fs::read(&seeds[0]).unwrap()));
        for file in seeds.iter().chain(&regressions) {
            let bytes = std::fs::read(file).unwrap();
            let started = Instant::now();
            let outcome = catch_unwind(|| target(&bytes));
            let took = started.elapsed();
            replayed += 1;
            if outcome.is_err() {
                failures.push(format!("{name}: {} panicked", file.display()));
            } else if took > TIME_LIMIT {
                failures.push(format!("{name}: {} took {took:?}", file.display()));
            }
        }
    }
    println!(
        "replayed {replayed} inputs through {} fuzz targets",
        TARGETS.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The GGUF headers the fuzzer found sizing allocations from their counts
/// are refused by the loader, each with an error naming what is wrong, and
/// the seed it was made from still loads.
#[test]
fn gguf_headers_whose_counts_the_file_does_not_back_are_refused() {
    let dir = fuzz_dir().join("regressions").join("gguf");
    let load = |name: &str| {
        let source = ModelSource::from_path(&dir.join(name)).unwrap();
        load_model(&source, &LoadOptions::new(name))
    };
    for (name, expected) in [
        ("block_count_past_tensors.gguf", "2147483648 blocks"),
        ("head_count_zero.gguf", "0 heads"),
        ("context_length_u32_max.gguf", "--max-context"),
    ] {
        let error = match load(name) {
            Ok(_) => panic!("{name} loaded"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains(expected), "{name}: {error}");
    }
    // The accelerator path on the CPU sized its rotary table (positions x
    // head size, built on the host) before checking the KV slab fits.
    let mut tensor_ops = LoadOptions::new("tensor_ops");
    tensor_ops.tensor_ops = true;
    let source = ModelSource::from_path(&dir.join("context_length_u32_max.gguf")).unwrap();
    match load_model(&source, &tensor_ops) {
        Ok(_) => panic!("context_length_u32_max.gguf loaded on the accelerator path"),
        Err(error) => assert!(format!("{error:#}").contains("--max-context"), "{error:#}"),
    }
    let seed = fuzz_dir()
        .join("corpus")
        .join("gguf")
        .join("llama_q8_0.gguf");
    let source = ModelSource::from_path(&seed).unwrap();
    assert!(load_model(&source, &LoadOptions::new("seed")).is_ok());
}
