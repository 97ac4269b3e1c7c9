//! `qpai bench-serve`: a load generator over the OpenAI completions API, as
//! users see a server. Prompts are random token ids (optionally after one
//! shared prefix), lengths drawn uniformly around a mean from a fixed seed,
//! outputs forced to their drawn length with `ignore_eos`. At each
//! concurrency level it keeps that many streams in flight and reports TTFT,
//! TPOT, inter-token latency and end-to-end latency (mean, median, p99) and
//! the aggregate throughput, in the layout of vLLM's serving benchmark.
//! Any server that speaks the API and `ignore_eos` (qpai, llama.cpp's
//! llama-server, vLLM) is measured the same way.

use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};

use crate::config::BenchServeArgs;

/// One request of the workload.
#[derive(Debug, Clone)]
struct Workload {
    prompt: Vec<u32>,
    output_tokens: usize,
}

/// What one streamed request measured.
#[derive(Debug, Clone, Default)]
struct Measured {
    ok: bool,
    error: Option<String>,
    prompt_tokens: usize,
    output_tokens: usize,
    ttft: f64,
    e2e: f64,
    /// Gaps between content chunks after the first.
    itl: Vec<f64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub mean_ms: f64,
    pub median_ms: f64,
    pub p99_ms: f64,
}

/// One concurrency level's results.
#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    pub concurrency: usize,
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft: Summary,
    pub tpot: Summary,
    pub itl: Summary,
    pub e2el: Summary,
    /// The mid-run long prompt's time to its one token (ms), when sent.
    pub interrupt_ttft_ms: Option<f64>,
}

fn summarize(mut seconds: Vec<f64>) -> Summary {
    if seconds.is_empty() {
        return Summary::default();
    }
    seconds.sort_by(f64::total_cmp);
    let at = |q: f64| seconds[((seconds.len() - 1) as f64 * q).round() as usize] * 1e3;
    Summary {
        mean_ms: seconds.iter().sum::<f64>() / seconds.len() as f64 * 1e3,
        median_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

/// A length drawn uniformly from `mean * (1 ± spread)`, at least 1.
fn draw(rng: &mut StdRng, mean: usize, spread: f64) -> usize {
    let low = (mean as f64 * (1.0 - spread)).round().max(1.0) as usize;
    let high = (mean as f64 * (1.0 + spread)).round().max(low as f64) as usize;
    rng.random_range(low..=high)
}

/// `count` random token ids of the workload's range.
fn random_ids(args: &BenchServeArgs, count: usize, rng: &mut StdRng) -> Vec<u32> {
    (0..count)
        .map(|_| rng.random_range(args.min_token_id..args.max_token_id))
        .collect()
}

/// `count` requests whose prompts start with `shared`.
fn workload(
    args: &BenchServeArgs,
    shared: &[u32],
    count: usize,
    rng: &mut StdRng,
) -> Vec<Workload> {
    (0..count)
        .map(|_| {
            let length = draw(rng, args.prompt_tokens, args.prompt_spread);
            let mut prompt = shared.to_vec();
            prompt.extend(random_ids(args, length, rng));
            Workload {
                prompt,
                output_tokens: draw(rng, args.output_tokens, args.output_spread),
            }
        })
        .collect()
}

/// Sends one streamed completion and times its chunks.
async fn measure(client: &reqwest::Client, args: &BenchServeArgs, work: &Workload) -> Measured {
    let mut measured = Measured {
        prompt_tokens: work.prompt.len(),
        ..Measured::default()
    };
    let body = json!({
        "model": args.model,
        "prompt": work.prompt,
        "max_tokens": work.output_tokens,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    });
    let started = Instant::now();
    let mut request = client
        .post(format!("{}/completions", args.url.trim_end_matches('/')))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if let Some(key) = &args.key {
        request = request.bearer_auth(key);
    }
    let response = match request.send().await {
        Ok(response) if response.status().is_success() => response,
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            measured.error = Some(format!(
                "{status}: {}",
                text.chars().take(200).collect::<String>()
            ));
            return measured;
        }
        Err(error) => {
            measured.error = Some(error.to_string());
            return measured;
        }
    };
    let mut chunks = 0usize;
    let mut last: Option<Instant> = None;
    let mut usage_tokens = None;
    let mut buffer = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(bytes) = stream.next().await {
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(error) => {
                measured.error = Some(error.to_string());
                return measured;
            }
        };
        buffer.extend(bytes.iter().filter(|&&b| b != b'\r'));
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let now = Instant::now();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
                    usage_tokens = Some(tokens as usize);
                }
                let has_text = chunk["choices"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["text"].as_str().is_some_and(|t| !t.is_empty()))
                });
                if has_text {
                    match last {
                        None => measured.ttft = (now - started).as_secs_f64(),
                        Some(previous) => measured.itl.push((now - previous).as_secs_f64()),
                    }
                    last = Some(now);
                    chunks += 1;
                }
            }
        }
    }
    measured.e2e = started.elapsed().as_secs_f64();
    measured.output_tokens = usage_tokens.unwrap_or(chunks);
    measured.ok = chunks > 0;
    if !measured.ok {
        measured.error = Some("no tokens streamed".into());
    }
    measured
}

/// Runs `work` with `concurrency` streams in flight; `interrupt`, when
/// given, is sent `--interrupt-after-s` into the run and not counted.
async fn run_level(
    client: &reqwest::Client,
    args: &BenchServeArgs,
    concurrency: usize,
    work: &[Workload],
    interrupt: Option<Workload>,
) -> LevelResult {
    let started = Instant::now();
    let measured = async {
        let results = futures::stream::iter(work)
            .map(|w| measure(client, args, w))
            .buffer_unordered(concurrency)
            .collect::<Vec<Measured>>()
            .await;
        (results, started.elapsed().as_secs_f64())
    };
    let interrupt = async {
        let long = interrupt?;
        tokio::time::sleep(Duration::from_secs_f64(args.interrupt_after_s)).await;
        let result = measure(client, args, &long).await;
        result.ok.then_some(result.ttft * 1e3)
    };
    let ((results, duration), interrupt_ttft_ms) = futures::join!(measured, interrupt);
    let ok: Vec<&Measured> = results.iter().filter(|m| m.ok).collect();
    if let Some(error) = results.iter().find_map(|m| m.error.as_ref()) {
        tracing::warn!(concurrency, %error, "a request failed");
    }
    let input: usize = ok.iter().map(|m| m.prompt_tokens).sum();
    let output: usize = ok.iter().map(|m| m.output_tokens).sum();
    LevelResult {
        concurrency,
        completed: ok.len(),
        failed: results.len() - ok.len(),
        duration_s: duration,
        total_input_tokens: input,
        total_output_tokens: output,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: output as f64 / duration,
        total_token_throughput: (input + output) as f64 / duration,
        ttft: summarize(ok.iter().map(|m| m.ttft).collect()),
        tpot: summarize(
            ok.iter()
                .filter(|m| m.output_tokens > 1)
                .map(|m| (m.e2e - m.ttft) / (m.output_tokens - 1) as f64)
                .collect(),
        ),
        itl: summarize(ok.iter().flat_map(|m| m.itl.iter().copied()).collect()),
        e2el: summarize(ok.iter().map(|m| m.e2e).collect()),
        interrupt_ttft_ms,
    }
}

/// vLLM's serving benchmark layout.
fn report(label: &str, level: &LevelResult) -> String {
    let mut out = String::new();
    let mut line = |name: &str, value: String| out.push_str(&format!("{name:<40} {value}\n"));
    let section = |title: &str| format!("{title:-^50}\n");
    let mut text = format!("{:=^50}\n", " Serving Benchmark Result ");
    line("Server:", label.to_string());
    line(
        "Maximum request concurrency:",
        level.concurrency.to_string(),
    );
    line("Successful requests:", level.completed.to_string());
    line("Failed requests:", level.failed.to_string());
    line(
        "Benchmark duration (s):",
        format!("{:.2}", level.duration_s),
    );
    line("Total input tokens:", level.total_input_tokens.to_string());
    line(
        "Total generated tokens:",
        level.total_output_tokens.to_string(),
    );
    line(
        "Request throughput (req/s):",
        format!("{:.2}", level.request_throughput),
    );
    line(
        "Output token throughput (tok/s):",
        format!("{:.2}", level.output_throughput),
    );
    line(
        "Total Token throughput (tok/s):",
        format!("{:.2}", level.total_token_throughput),
    );
    if let Some(ttft) = level.interrupt_ttft_ms {
        line("Mid-run long prompt TTFT (ms):", format!("{ttft:.2}"));
    }
    text.push_str(&out);
    for (title, short, summary) in [
        ("Time to First Token", "TTFT", level.ttft),
        (
            "Time per Output Token (excl. 1st token)",
            "TPOT",
            level.tpot,
        ),
        ("Inter-token Latency", "ITL", level.itl),
        ("End-to-end Latency", "E2EL", level.e2el),
    ] {
        text.push_str(&section(title));
        for (name, value) in [
            ("Mean", summary.mean_ms),
            ("Median", summary.median_ms),
            ("P99", summary.p99_ms),
        ] {
            text.push_str(&format!(
                "{:<40} {value:.2}\n",
                format!("{name} {short} (ms):")
            ));
        }
    }
    text.push_str(&"=".repeat(50));
    text.push('\n');
    text
}

pub async fn run(args: BenchServeArgs) -> anyhow::Result<Vec<LevelResult>> {
    anyhow::ensure!(
        args.min_token_id < args.max_token_id,
        "--min-token-id must be below --max-token-id"
    );
    // A connection per request: servers that close idle keep-alive
    // connections (llama-server) would otherwise fail the next request sent on one.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_s))
        .pool_max_idle_per_host(0)
        .build()?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    // One shared prefix for the whole run, warm-up included.
    let shared = random_ids(&args, args.shared_prefix_tokens, &mut rng);
    let label = args.label.clone().unwrap_or_else(|| args.url.clone());
    if args.warmup > 0 {
        let mut warm_rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
        let warm = workload(&args, &shared, args.warmup, &mut warm_rng);
        run_level(&client, &args, args.warmup, &warm, None).await;
    }
    let mut results = Vec::new();
    for &concurrency in &args.concurrency {
        let count = args.requests.unwrap_or((concurrency * 4).max(16));
        let work = workload(&args, &shared, count, &mut rng);
        // A long prompt of its own per level: never a prefix-cache hit.
        let interrupt = (args.interrupt_prompt_tokens > 0).then(|| Workload {
            prompt: random_ids(&args, args.interrupt_prompt_tokens, &mut rng),
            output_tokens: 1,
        });
        let level = run_level(&client, &args, concurrency.max(1), &work, interrupt).await;
        print!("{}", report(&label, &level));
        results.push(level);
    }
    if let Some(path) = &args.json {
        let value = json!({"label": label, "levels": results});
        std::fs::write(path, serde_json::to_string_pretty(&value)?)?;
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_drawn_within_their_spread_from_a_fixed_seed() {
        let draws = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..200)
                .map(|_| draw(&mut rng, 100, 0.25))
                .collect::<Vec<_>>()
        };
        let first = draws(7);
        assert_eq!(first, draws(7));
        assert!(first.iter().all(|&n| (75..=125).contains(&n)));
        assert!(first.iter().any(|&n| n < 90) && first.iter().any(|&n| n > 110));
        assert_eq!(draw(&mut StdRng::seed_from_u64(1), 10, 0.0), 10);
    }

    #[test]
    fn summaries_take_the_median_and_the_99th_percentile() {
        let values: Vec<f64> = (1..=100).map(|i| i as f64 / 1e3).collect();
        let summary = summarize(values);
        assert!((summary.mean_ms - 50.5).abs() < 1e-9);
        assert!((summary.median_ms - 51.0).abs() < 1e-9);
        assert!((summary.p99_ms - 99.0).abs() < 1e-9);
    }
}
