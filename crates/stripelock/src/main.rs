//! `stripelock`: one binary for servers, clients, debugging and benchmarks.

mod bench;
mod replay;
mod tokens;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "stripelock", version, about = "A clustered file store built around a distributed lock manager")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local cluster of N servers on 127.0.0.1 (not built yet: see README).
    Up {
        #[arg(long, default_value_t = 3)]
        servers: u32,
        #[arg(long, default_value = "stripelock-data")]
        data: PathBuf,
    },
    /// Tools for looking inside the lock engine.
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
    /// Fencing tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DebugCommand {
    /// Run lock scenario scripts through the engine and print one trace line per output.
    Replay {
        /// Scenario files (see crates/lockengine/tests/scenarios/ for the format).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Compare each trace with the script's `> ` expectations; exit 1 on any difference.
        #[arg(long, conflicts_with = "bless")]
        check: bool,
        /// Rewrite each script's expectations with the trace it produces now.
        #[arg(long)]
        bless: bool,
        /// Print each command before its trace.
        #[arg(long)]
        echo: bool,
        /// Print one JSON object per file.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Check a token's signature against the cluster secret and print what it grants.
    /// Exit 0 valid, 1 signature does not match, 2 not a token or no readable secret.
    Verify {
        /// The token (`slt1.…`); `-` reads it from standard input.
        token: String,
        /// The cluster secret file (64 hex digits).
        #[arg(long)]
        secret_file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Lock engine throughput, single-threaded, in memory.
    Engine {
        /// Seconds to spend on each case.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Up { servers, data } => {
            eprintln!(
                "stripelock up: the cluster is not built yet (it arrives with the replicated lock service).\n\
                 Asked for {servers} servers with data under {}.\n\
                 What works today: `stripelock debug replay FILE` runs lock scenarios through the engine,\n\
                 and `stripelock bench engine` measures it.",
                data.display()
            );
            ExitCode::SUCCESS
        }
        Command::Debug { command: DebugCommand::Replay { files, check, bless, echo, json } } => {
            replay::run(&files, replay::Mode { check, bless, echo, json })
        }
        Command::Token { command: TokenCommand::Verify { token, secret_file, json } } => {
            tokens::verify(&token, &secret_file, json)
        }
        Command::Bench { command: BenchCommand::Engine { seconds, json } } => {
            if !(seconds > 0.0 && seconds <= 60.0) {
                eprintln!("error: --seconds must be above 0 and at most 60, got {seconds}");
                return ExitCode::from(2);
            }
            bench::engine(std::time::Duration::from_secs_f64(seconds), json);
            ExitCode::SUCCESS
        }
    }
}
