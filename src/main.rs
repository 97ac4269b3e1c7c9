use clap::{CommandFactory, FromArgMatches};

use qpai::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches)?;
    qpai::telemetry::init_logging(cli.global.log_format);
    if let (Command::Serve(args), Some(sub)) =
        (&mut cli.command, matches.subcommand_matches("serve"))
    {
        args.apply_file(sub)?;
    }
    let threads = match &cli.command {
        Command::Serve(args) => args.threads,
        Command::Bench(args) => args.threads,
        Command::Models { .. } => None,
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
    }
}
