//! Logs (tracing, text or JSON) and metrics (the `metrics` facade with a
//! Prometheus recorder; every name starts with `qpai_`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Without RUST_LOG: qpai at info; lance and datafusion (which log every
/// query plan and commit at info) at warn.
const DEFAULT_FILTER: &str = "info,lance=warn,lance_core=warn,lance_index=warn,lance_io=warn,lance_file=warn,lance_table=warn,lance_encoding=warn,lancedb=warn,datafusion=warn";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Error values carry no backtraces unless `RUST_LIB_BACKTRACE` asks for
/// them. With `RUST_BACKTRACE=1` alone (meant for panics), candle and
/// anyhow capture one in every error and render it into the message: a
/// stack trace in the API error a client reads, milliseconds to symbolize
/// per failed request, and a symbol cache growing with each new frame.
/// Panics still print theirs.
pub fn keep_backtraces_out_of_errors() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called first thing in `main`, before any other thread
        // exists to read the environment.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter.
pub fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// Latency buckets (seconds) for time to first token and request durations.
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Buckets for time per output token.
const TOKEN_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
];

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics_handle() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("time_per_output_token_seconds".into()),
                &TOKEN_BUCKETS,
            )
            .and_then(|b| b.set_buckets(&LATENCY_BUCKETS))
            .expect("static bucket lists are non-empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (embedding applications);
        // the handle still renders what this recorder sees.
        let _ = metrics::set_global_recorder(recorder);
        // Histogram samples queue up until they are folded into their
        // buckets, which a scrape does: without scrapes they would grow
        // without bound (the soak found ~400 bytes a request).
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("qpai-metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "no metrics upkeep thread: histograms drain on scrape only");
        }
        handle
    })
}

pub fn render_metrics() -> String {
    metrics_handle().render()
}
