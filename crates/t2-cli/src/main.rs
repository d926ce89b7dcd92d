//! `t2`: serve, generate with, decompose, inspect experts of, and benchmark a self-adaptive LLM.

mod adapt_cmd;
mod bench;
mod common;
mod decompose_bench;
mod experts_cmd;
mod generate_cmd;
mod gpu_svd;
mod selftest;
mod serve_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

// Candle allocates a fresh buffer for every op; glibc returns large ones to the OS each time, so every
// decode step paid page faults. mimalloc keeps them for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    // mimalloc's own, linked in with the allocator (libmimalloc-sys declares it only behind a feature).
    fn mi_collect(force: bool);
}

/// Hands memory freed so far on this thread (and abandoned by finished threads) back to the OS now, not
/// after mimalloc's purge delay, which a thread that stops allocating never reaches: loading frees the
/// dense copies that serving does not need.
pub(crate) fn return_freed_memory() {
    // SAFETY: a plain call into the allocator in use, no pointers passed.
    unsafe { mi_collect(true) }
}

#[derive(Parser)]
#[command(
    name = "t2",
    version,
    about = "Transformer² (self-adaptive LLM) inference server and toolkit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (chat and text completions, per-request experts)
    Serve(serve_cmd::ServeArgs),
    /// Generate a chat reply, streamed to stdout.
    Generate(generate_cmd::GenerateArgs),
    /// Decompose (SVD) the model's target matrices and cache the result beside the model.
    Decompose(common::DecomposeArgs),
    /// Time the SVD of one random matrix of each target shape of a model (CPU or GPU) and extrapolate.
    DecomposeBench(decompose_bench::DecomposeBenchArgs),
    /// List or inspect the experts of the model.
    #[command(subcommand)]
    Experts(experts_cmd::ExpertsCmd),
    /// Measure prefill and decode speed (base, merged mix, many mixes in one batch).
    Bench(bench::BenchArgs),
    /// Check this binary's device path against the CPU (run on the GPU machine: `--device cuda`).
    Selftest(selftest::SelftestArgs),
    /// Train an SVF expert on a task with REINFORCE (checkpoints, resume, log.csv and curve.svg).
    Train(train_cmd::TrainArgs),
    /// Accuracy with a 95% confidence interval: base, experts and mixes on task splits.
    Eval(train_cmd::EvalArgs),
    /// Few-shot adaptation: search expert weights on a few examples (CEM) and store them as a named mix.
    Adapt(adapt_cmd::AdaptArgs),
}

fn main() {
    // T2_LOG sets the filter (e.g. info); T2_LOG_FORMAT=json gives one JSON object per line for log shippers.
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("T2_LOG").unwrap_or_else(|_| "warn".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("T2_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let msg = e.to_string();
            let first = msg
                .lines()
                .next()
                .unwrap_or("bad arguments")
                .trim_start_matches("error: ");
            eprintln!("error: {first} (see --help)");
            std::process::exit(2);
        }
    };
    let result = match cli.command {
        Command::Serve(a) => serve_cmd::run(a),
        Command::Generate(a) => generate_cmd::run(a),
        Command::Decompose(a) => common::decompose(a),
        Command::DecomposeBench(a) => decompose_bench::run(a),
        Command::Experts(c) => experts_cmd::run(c),
        Command::Bench(a) => bench::run(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Train(a) => train_cmd::train(a),
        Command::Eval(a) => train_cmd::eval(a),
        Command::Adapt(a) => adapt_cmd::run(a),
    };
    if let Err(e) = result {
        // One line, the whole cause chain: the CLI's contract for bad input. (Some libraries append a
        // backtrace on later lines when RUST_BACKTRACE is set.)
        let msg = format!("{e:#}");
        eprintln!("error: {}", msg.lines().next().unwrap_or("unknown error"));
        std::process::exit(1);
    }
}
