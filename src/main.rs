//! `lenet`: the command line. Parsing and printing only; the work is in the library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use lenet::backend::{no_training_data, open_backend};
use lenet::checkpoint::load_checkpoint;
use lenet::data::{default_data_dir, find_split, load_mnist_test, load_split, Mnist, Split, SplitFiles};
use lenet::gpu::context::{choose_adapter, ADAPTER_ENV};
use lenet::model::{Params, TrainState};
use lenet::optim::Optimizer;
use lenet::paths::{check_run_paths, InputPath, OutputKind, OutputPath};
use lenet::signals::install_stop_handlers;
use lenet::train::{error_line, evaluate_logits, TrainConfig};

#[derive(Parser)]
#[command(
    name = "lenet",
    version,
    about = "Train LeNet-5 on MNIST with WGSL compute shaders (wgpu) or on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train LeNet-5 on MNIST.
    Train(TrainArgs),
    /// Accuracy, loss and confusion matrix of a checkpoint on the MNIST test set.
    Eval(EvalArgs),
    /// Classify digit images (PNG or PGM, any size).
    Predict(PredictArgs),
    /// Time each layer's kernels at a given batch size.
    Bench(BenchArgs),
    /// List the GPU adapters and the one `--backend auto` would pick.
    Devices,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    /// The best GPU adapter; the CPU path when there is none.
    Auto,
    Gpu,
    Cpu,
}

impl From<BackendChoice> for lenet::backend::BackendChoice {
    fn from(c: BackendChoice) -> Self {
        match c {
            BackendChoice::Auto => lenet::backend::BackendChoice::Auto,
            BackendChoice::Gpu => lenet::backend::BackendChoice::Gpu,
            BackendChoice::Cpu => lenet::backend::BackendChoice::Cpu,
        }
    }
}

#[derive(Args)]
struct DeviceArgs {
    /// Where the arithmetic runs.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
    /// Pick the GPU adapter whose name contains this (case-insensitive); also LENET_ADAPTER.
    #[arg(long, env = "LENET_ADAPTER")]
    adapter: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// Directory with the four MNIST IDX files (raw or .gz) [default: the shipped data/mnist]
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Epochs to train (a resumed run's unfinished epoch counts as one).
    #[arg(long, default_value_t = 10)]
    epochs: u64,
    /// Stop after this many optimiser steps (overrides --epochs).
    #[arg(long)]
    steps: Option<u64>,
    /// Images per step [default: 256, or the resumed checkpoint's].
    #[arg(long)]
    batch: Option<usize>,
    /// Adam's learning rate [default: 1e-3, or the resumed checkpoint's].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Seed of the initialisation and of the shuffling [default: 0, or the resumed checkpoint's].
    #[arg(long)]
    seed: Option<u64>,
    /// Visit the training images in file order.
    #[arg(long)]
    no_shuffle: bool,
    /// Start from these weights (a checkpoint or a file with the ten model tensors).
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
    /// Continue the run saved in this checkpoint exactly (weights, Adam state, position).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Write the final checkpoint here (atomically; also on Ctrl-C, SIGTERM, SIGHUP, an error
    /// after the first step, and with --checkpoint-every). Only a LeNet-5 checkpoint is replaced.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Also save to --save every N steps.
    #[arg(long, default_value_t = 0, requires = "save")]
    checkpoint_every: u64,
    /// Evaluate on the test set every N epochs (0: only at the end).
    #[arg(long, default_value_t = 1)]
    eval_every: u64,
    /// Write one CSV row per step and per evaluation here (a resumed run continues it from the
    /// checkpoint's step).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Draw the training curves into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// The checkpoint to evaluate.
    #[arg(long)]
    weights: PathBuf,
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PredictArgs {
    /// The checkpoint to classify with.
    #[arg(long)]
    weights: PathBuf,
    /// Images of single digits: PNG, PGM, PPM or PBM, any size, either polarity (a FIFO or
    /// `<(command)` is read as a stream).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Print one JSON array on stdout, an object per image; the human lines go to stderr.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Timed calls per kernel (after warm-up).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // Mesa's Vulkan drivers load libwayland, which prints "error: XDG_RUNTIME_DIR is invalid or
    // not set" on headless machines. Give it a directory so our stderr holds only our own lines.
    // Set before any thread starts.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    // A bug is still reported as one line, not a backtrace (RUST_BACKTRACE=1 restores it).
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        std::panic::set_hook(Box::new(|info| {
            let msg = info.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
            // Not eprintln!: failing to print (a closed terminal) must not become a second panic.
            let _ = writeln!(std::io::stderr(), "error: internal error, please report it: {msg}");
        }));
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::Predict(args) => predict(args),
        Command::Bench(args) => bench(args),
        Command::Devices => devices(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn data_dir(dir: Option<&Path>) -> PathBuf {
    dir.map(Path::to_path_buf).unwrap_or_else(default_data_dir)
}

/// Every file the run reads and writes, checked before any work (see `lenet::paths`).
fn check_train_paths(args: &TrainArgs, train_files: &SplitFiles, test_files: &SplitFiles) -> Result<()> {
    let input = |what: &str, path: &Path| InputPath {
        what: what.to_string(),
        path: path.to_path_buf(),
        resumed_checkpoint: false,
    };
    let mut inputs = vec![
        input("--data's training images", &train_files.images),
        input("--data's training labels", &train_files.labels),
        input("--data's test images", &test_files.images),
        input("--data's test labels", &test_files.labels),
    ];
    if let Some(p) = &args.init {
        inputs.push(input("--init", p));
    }
    if let Some(p) = &args.resume {
        inputs.push(InputPath { resumed_checkpoint: true, ..input("--resume", p) });
    }
    let outputs: Vec<OutputPath> = [
        ("--save", &args.save, OutputKind::Checkpoint),
        ("--metrics", &args.metrics, OutputKind::Metrics),
        ("--plot", &args.plot, OutputKind::Plot),
    ]
    .into_iter()
    .filter_map(|(option, path, kind)| {
        path.as_ref().map(|p| OutputPath { option: option.to_string(), path: p.clone(), kind })
    })
    .collect();
    check_run_paths(&inputs, &outputs)?;
    Ok(())
}

fn train(args: TrainArgs) -> Result<ExitCode> {
    if args.epochs == 0 && args.steps.is_none() {
        bail!("--epochs 0 trains nothing; give at least 1 (or --steps N)");
    }
    if args.steps == Some(0) {
        bail!("--steps 0 trains nothing; give at least 1");
    }
    if args.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    if let Some(lr) = args.lr {
        Optimizer { lr: lr as f64, ..Optimizer::default() }.validate().map_err(|e| anyhow!("--lr: {e}"))?;
    }
    let dir = data_dir(args.data.as_deref());
    let (train_files, test_files) = (find_split(&dir, Split::Train)?, find_split(&dir, Split::Test)?);
    check_train_paths(&args, &train_files, &test_files)?;
    let mnist = Mnist { train: load_split(&train_files)?, test: load_split(&test_files)? };

    let mut state = match &args.resume {
        Some(path) => {
            let Some(state) = load_checkpoint(path)?.into_train_state() else {
                bail!(
                    "{}: holds weights only, no optimiser state to resume; use --init to start from it",
                    path.display()
                );
            };
            let conflicts = [
                ("--seed", args.seed.is_some_and(|s| s != state.seed)),
                ("--batch", args.batch.is_some_and(|b| b != state.batch)),
                ("--no-shuffle", args.no_shuffle && state.shuffle),
            ];
            if let Some((flag, _)) = conflicts.iter().find(|(_, c)| *c) {
                bail!(
                    "{flag} differs from the run saved in {}; a resumed run keeps its settings",
                    path.display()
                );
            }
            state
        }
        None => {
            let seed = args.seed.unwrap_or(0);
            let params = match &args.init {
                Some(path) => load_checkpoint(path)?.params,
                None => Params::init(seed),
            };
            TrainState::new(params, Optimizer::default(), seed, args.batch.unwrap_or(256), !args.no_shuffle)
        }
    };
    if let Some(lr) = args.lr {
        state.optimizer.lr = lr as f64;
    }
    if state.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if state.batch > mnist.train.len() {
        bail!("--batch {} is larger than the training set ({} images)", state.batch, mnist.train.len());
    }

    let mut backend = open_backend(args.device.backend.into(), args.device.adapter.as_deref(), &mnist.train)?;
    // Ctrl-C, SIGTERM and SIGHUP: finish the steps in flight, save, exit 128+signo.
    let stop = install_stop_handlers().context("cannot install the signal handlers")?;
    let cfg = TrainConfig {
        epochs: args.epochs,
        steps: args.steps,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        save: args.save.clone(),
        metrics: args.metrics.clone(),
        plain_progress: false,
    };
    let report = lenet::train::train(backend.as_mut(), &mut state, &mnist, &cfg, &stop.flag)?;
    if let Some(path) = &args.plot {
        lenet::plot::write_training_svg(path, &report.history)?;
    }
    let saved = args.save.as_ref().map(|p| format!("; saved {}", p.display())).unwrap_or_default();
    let test = match (report.test_accuracy, report.test_loss) {
        (Some(acc), Some(loss)) => format!("test accuracy {:.2}% (loss {loss:.4})", 100.0 * acc),
        _ => "no evaluation (the test set is empty)".to_string(),
    };
    println!(
        "{} {} steps ({:.2} epochs) in {:.2} s, {:.0} images/s on {} ({}); train loss {:.4}, {test}{saved}",
        if report.stopped_early { "interrupted after" } else { "trained" },
        report.steps,
        report.epochs,
        report.train_seconds,
        report.images_per_s,
        report.backend,
        report.adapter,
        report.train_loss,
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    // A stop signal gives its code even when it came too late to cut the run short: the process
    // was asked to end, and whatever sent it looks for that code.
    Ok(match (stop.exit_code(), report.stopped_early) {
        (Some(code), _) => ExitCode::from(code),
        (None, true) => ExitCode::from(130),
        (None, false) => ExitCode::SUCCESS,
    })
}

fn eval(args: EvalArgs) -> Result<ExitCode> {
    let checkpoint = load_checkpoint(&args.weights)?;
    // Only the test files: evaluating needs no training set.
    let test = load_mnist_test(&data_dir(args.data.as_deref()))?;
    if test.is_empty() {
        bail!("{}: the test set is empty; nothing to evaluate", data_dir(args.data.as_deref()).display());
    }
    let mut backend =
        open_backend(args.device.backend.into(), args.device.adapter.as_deref(), &no_training_data())?;
    let state = TrainState::new(checkpoint.params, Optimizer::default(), 0, 1, false);
    backend.load_state(&state)?;
    let eval = evaluate_logits(&backend.logits(&test)?, &test.labels);
    println!(
        "accuracy {:.2}% ({}/{}), loss {:.4} on {} ({})",
        100.0 * eval.accuracy,
        eval.correct,
        eval.count,
        eval.loss,
        backend.kind(),
        backend.adapter()
    );
    println!("confusion (rows: true digit, columns: predicted)");
    println!("     {}", (0..10).map(|c| format!("{c:>6}")).collect::<String>());
    for (label, row) in eval.confusion.iter().enumerate() {
        println!("{label:>4} {}", row.iter().map(|n| format!("{n:>6}")).collect::<String>());
    }
    if args.json {
        println!("{}", serde_json::to_string(&eval)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Below this top probability a prediction is flagged as low confidence.
const LOW_CONFIDENCE: f32 = 0.6;

/// Classifies every image, whatever happens to the others: an unreadable one gets an error line
/// (and an `error` field) and makes the exit status non-zero at the end; a blank one is "no digit"
/// with a warning, never a guess.
fn predict(args: PredictArgs) -> Result<ExitCode> {
    use lenet::image_input::{load_image, Prepared};
    use serde_json::{json, Value};
    let params = load_checkpoint(&args.weights)?.params;
    // With --json, stdout holds only the JSON document.
    let say = |line: String| if args.json { eprintln!("{line}") } else { println!("{line}") };
    let mut records = Vec::with_capacity(args.images.len());
    let mut failed = 0usize;
    for path in &args.images {
        let file = path.display().to_string();
        let record = match load_image(path) {
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
                json!({ "file": file, "digit": Value::Null, "probability": Value::Null,
                        "probabilities": Value::Null, "error": e.to_string() })
            }
            Ok(Prepared::NoInk) => {
                let warning = "no ink found: the image is blank or its marks are too faint";
                eprintln!("warning: {file}: {warning}");
                say(format!("{file}: no digit"));
                json!({ "file": file, "digit": Value::Null, "probability": Value::Null,
                        "probabilities": Value::Null, "warning": warning })
            }
            Ok(Prepared::Digit { pixels, .. }) => {
                let probs = probabilities(&params, &pixels[..])?;
                let digit = lenet::train::argmax(&probs);
                let p = probs[digit];
                let mut record =
                    json!({ "file": file, "digit": digit, "probability": p, "probabilities": probs });
                if p < LOW_CONFIDENCE {
                    say(format!("{file}: {digit} ({:.1}%, low confidence)", 100.0 * p));
                    record["warning"] = json!(format!(
                        "low confidence: the top probability is below {:.0}%",
                        100.0 * LOW_CONFIDENCE
                    ));
                } else {
                    say(format!("{file}: {digit} ({:.1}%)", 100.0 * p));
                }
                record
            }
        };
        records.push(record);
    }
    if args.json {
        println!("{}", Value::Array(records));
    }
    Ok(if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Softmax of the network's logits for one image (the CPU path: one image needs no GPU).
fn probabilities(params: &Params, pixels: &[u8]) -> Result<Vec<f32>> {
    Ok(lenet::cpu::probabilities(params, &[pixels])?.remove(0))
}

fn bench(args: BenchArgs) -> Result<ExitCode> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let adapter = args.device.adapter.as_deref();
    let ctx = match args.device.backend {
        BackendChoice::Cpu => None,
        BackendChoice::Gpu => Some(lenet::gpu::GpuContext::new(adapter).context("--backend gpu")?),
        // Unlike `train`, `auto` here takes a software adapter (lavapipe) too: a benchmark reports
        // what the adapter does, and the CPU figures are always beside it.
        BackendChoice::Auto => match lenet::gpu::GpuContext::new(adapter) {
            Ok(c) => {
                eprintln!("backend: gpu ({})", c.adapter_info);
                Some(c)
            }
            Err(e) => {
                eprintln!("backend: cpu (no usable GPU: {e:#})");
                None
            }
        },
    };
    let mut cfg = lenet::bench::BenchConfig::new(args.batch, args.iters);
    // A slow adapter (lavapipe) stops each row after this much wall time (at least 3 samples).
    cfg.budget_s = 1.0;
    let report = lenet::bench::run(&cfg, ctx.as_ref())?;
    print!("{}", report.table());
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if report.any_failed() {
        eprintln!("bench: validation FAILED for some rows (see the table)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn devices() -> Result<ExitCode> {
    let adapters = lenet::gpu::list_adapters();
    if adapters.is_empty() {
        println!("no GPU adapter found: --backend auto uses the CPU path");
        println!(
            "(on Linux without a GPU, Mesa's lavapipe provides one: apt-get install mesa-vulkan-drivers)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let wanted = std::env::var(ADAPTER_ENV).ok();
    let chosen = choose_adapter(&adapters, wanted.as_deref());
    // `*` marks the adapter `auto` trains on: none when it would take the CPU path instead.
    let software_only =
        chosen.is_some_and(|i| adapters[i].device_type == wgpu::DeviceType::Cpu) && wanted.is_none();
    for (i, a) in adapters.iter().enumerate() {
        let mark = if Some(i) == chosen && !software_only { "*" } else { " " };
        println!("{mark} {i}: {a}");
    }
    match (chosen, &wanted) {
        (Some(i), Some(w)) => {
            println!("--backend auto uses {}: its name contains {ADAPTER_ENV}={w:?}", adapters[i].name)
        }
        (Some(i), None) if adapters[i].device_type == wgpu::DeviceType::Cpu => println!(
            "--backend auto uses the CPU path: the best adapter, {}, is a software rasterizer, slower than the \
             CPU path (--backend gpu or --adapter NAME uses it)",
            adapters[i].name
        ),
        (Some(i), None) => println!(
            "--backend auto uses {}: the best device type ({:?}; discrete > integrated > virtual > software), \
             native API before GL",
            adapters[i].name, adapters[i].device_type
        ),
        (None, Some(w)) => println!("no adapter's name contains {ADAPTER_ENV}={w:?}: --backend auto uses the CPU path"),
        (None, None) => unreachable!("a non-empty list always has a best adapter"),
    }
    Ok(ExitCode::SUCCESS)
}
