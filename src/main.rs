use clap::{CommandFactory, FromArgMatches};

use qpai::config::{BatchCommand, Cli, Command, EvalCommand};

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
}

fn main() -> anyhow::Result<()> {
    qpai::telemetry::keep_backtraces_out_of_errors();
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches)?;
    qpai::telemetry::init_logging(cli.global.log_format);
    if let Some(device) = &cli.global.device {
        qpai::models::choose_device(device)?;
    }
    if let (Command::Serve(args), Some(sub)) =
        (&mut cli.command, matches.subcommand_matches("serve"))
    {
        args.apply_file(sub)?;
    }
    let threads = match &cli.command {
        Command::Serve(args) => args.threads,
        Command::Bench(args) => args.threads,
        Command::BenchEmbeddings(args) => args.threads,
        Command::BenchLora(args) => args.threads,
        Command::BenchStructured(args) => args.threads,
        Command::Ingest(args) => args.embedding.threads,
        Command::BenchSearch(args) => args.embedding.threads,
        Command::Search(args) => args.embedding.threads,
        Command::Eval {
            command: EvalCommand::Run(args),
        } => args.threads,
        Command::Models { .. }
        | Command::Sites { .. }
        | Command::Keys { .. }
        | Command::Usage(_)
        | Command::BenchUpstream(_)
        | Command::BenchRouter(_)
        | Command::BenchServe(_)
        | Command::Logits(_)
        | Command::Prompts { .. } => None,
        Command::Batch {
            command: BatchCommand::Run(args),
        } => args.threads,
        Command::Batch { .. } | Command::Eval { .. } => None,
    };
    if let Some(threads) = threads {
        // SAFETY: still single-threaded here; candle reads this when its
        // thread pool starts.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    match cli.command {
        Command::Serve(args) => {
            tokio::runtime::Runtime::new()?.block_on(qpai::server::serve(args, cli.global))
        }
        Command::Models { command } => qpai::commands::models(command, &cli.global),
        Command::Bench(args) => qpai::bench::run(args, &cli.global).map(|_| ()),
        Command::BenchEmbeddings(args) => qpai::bench::embeddings(args, &cli.global),
        Command::Logits(args) => qpai::bench::logits::run(args, &cli.global),
        Command::BenchLora(args) => qpai::adapters::bench::run(args, &cli.global),
        Command::BenchStructured(args) => {
            runtime()?.block_on(qpai::structured::bench::run(args, &cli.global))
        }
        Command::Ingest(args) => runtime()?.block_on(qpai::rag::cli::ingest(args, &cli.global)),
        Command::BenchSearch(args) => {
            runtime()?.block_on(qpai::rag::cli::bench_search(args, &cli.global))
        }
        Command::Search(args) => runtime()?.block_on(qpai::rag::cli::search(args, &cli.global)),
        Command::Eval {
            command: EvalCommand::Run(args),
        } => runtime()?.block_on(qpai::eval::cli::run(*args, &cli.global)),
        Command::Eval {
            command: EvalCommand::Calibrate(args),
        } => qpai::eval::calibrate::run(args),
        Command::Sites { command } => {
            runtime()?.block_on(qpai::rag::cli::sites(command, &cli.global))
        }
        Command::Keys { command } => {
            runtime()?.block_on(qpai::tenancy::cli::keys(command, &cli.global))
        }
        Command::Usage(args) => runtime()?.block_on(qpai::tenancy::cli::usage(args, &cli.global)),
        Command::BenchUpstream(args) => runtime()?.block_on(qpai::router::bench::upstream(args)),
        Command::BenchRouter(args) => runtime()?.block_on(qpai::router::bench::load(args)),
        Command::BenchServe(args) => runtime()?
            .block_on(qpai::bench::serve::run(args))
            .map(|_| ()),
        Command::Prompts { command } => qpai::prompts::cli::run(command, &cli.global),
        Command::Batch { command } => {
            runtime()?.block_on(qpai::batches::cli::run(command, &cli.global))
        }
    }
}
