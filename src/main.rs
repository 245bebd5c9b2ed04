use clap::Parser;

use candiff::cli::{self, Cli, Command};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).format_timestamp(None).init();
    let cli = Cli::parse();
    // A rank stuck in a collective after another failed must not keep the command alive.
    candiff::parallel::exit_when_stuck(true);
    let result = match &cli.command {
        Command::Inspect(a) => cli::inspect::run(a),
        Command::T2i(a) => cli::t2i::run(a),
        Command::T2v(a) => cli::t2v::run(a),
        Command::Compare(a) => cli::compare::run(a),
        Command::Models(a) => cli::models::run(a),
        Command::Doctor(a) => cli::doctor::run(a),
        Command::Bench(a) => cli::bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
