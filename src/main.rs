//! `lenet`: the command line. Parsing and printing only; the work is in the library.
//! How it writes (stdout, stderr, `--json`, a closed pipe) is in [`cli_output`].

mod cli_output;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use cli_output::{notice, Output};

use lenet::augment::MAX_AUGMENT_SHIFT;
use lenet::backend::{no_training_data, open_backend};
use lenet::checkpoint::load_checkpoint;
use lenet::data::{default_data_dir, find_split, load_mnist_test, load_split, Mnist, Split, SplitFiles};
use lenet::gpu::context::{choose_adapter, AdapterSummary};
use lenet::model::{Params, TrainState};
use lenet::optim::{Adam, Optimizer, OptimizerKind, Sgd};
use lenet::paths::{check_run_paths, InputPath, OutputKind, OutputPath};
use lenet::schedule::LrSchedule;
use lenet::signals::install_stop_handlers;
use lenet::train::{error_line, evaluate_logits, split_validation, Evaluation, StopReason, TrainConfig};

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
    Train(Box<TrainArgs>),
    /// Accuracy, loss and confusion matrix of a checkpoint on the MNIST test set.
    Eval(EvalArgs),
    /// Classify digit images (PNG or PGM, any size).
    Predict(PredictArgs),
    /// Time each layer's kernels at a given batch size.
    Bench(BenchArgs),
    /// List the GPU adapters and the one `--backend auto` would pick.
    Devices(DevicesArgs),
    /// Print a shell completion script (e.g. `source <(lenet completions bash)`).
    Completions(CompletionsArgs),
    /// Print the manual page, every subcommand and option in one page (`lenet man > lenet.1`).
    Man,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendChoice {
    /// The best GPU adapter; the CPU path when there is none, or only a software one.
    Auto,
    /// A GPU adapter, even a software one (lavapipe); an error when there is none.
    Gpu,
    /// The CPU path: pure Rust, threads and SIMD.
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
    /// Epochs to train (a resumed run's unfinished epoch counts as one) [default: 10; a resumed
    /// run with a cosine or onecycle schedule: to the schedule's end]
    #[arg(long)]
    epochs: Option<u64>,
    /// Stop after this many optimiser steps (overrides --epochs).
    #[arg(long)]
    steps: Option<u64>,
    /// Images per step [default: 256, or the resumed checkpoint's].
    #[arg(long)]
    batch: Option<usize>,
    /// Learning rate, the peak of --lr-schedule [default: 1e-3, or the resumed checkpoint's].
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// How the learning rate moves over the run, stepped after every step: as PyTorch's
    /// CosineAnnealingLR or OneCycleLR (which also cycles Adam's beta1 or SGD's momentum)
    /// [default: constant, or the resumed checkpoint's]
    #[arg(long, value_enum, value_name = "SCHEDULE")]
    lr_schedule: Option<LrSchedule>,
    /// The optimizer, as torch.optim's [default: adam, or the resumed checkpoint's]
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerChoice>,
    /// SGD's momentum [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    momentum: Option<f64>,
    /// SGD with Nesterov momentum (needs --momentum above 0).
    #[arg(long)]
    nesterov: bool,
    /// SGD's L2 penalty, added to the gradient as torch.optim.SGD does [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    weight_decay: Option<f64>,
    /// Move each training image by a random whole-pixel offset in [-P, P] on each axis,
    /// zero-filled, drawn from the seed (the same on the CPU and the GPU) [default: 0]
    #[arg(long, value_name = "P")]
    augment_shift: Option<u32>,
    /// Hold out the last N training images: evaluate on them after each epoch, and on the test
    /// set once at the end.
    #[arg(long, value_name = "N")]
    val: Option<usize>,
    /// Keep the checkpoint with the best validation accuracy here (atomically; needs --val).
    #[arg(long, value_name = "FILE")]
    save_best: Option<PathBuf>,
    /// Stop when the validation loss has not improved for N evaluations (needs --val).
    #[arg(long, value_name = "N")]
    patience: Option<u64>,
    /// Stop at the first evaluation (validation, or test without --val) reaching this accuracy:
    /// a percentage (99.2 or 99.2%) or a fraction (0.992).
    #[arg(long, value_name = "ACC", value_parser = parse_accuracy)]
    until: Option<f64>,
    /// Seed of the initialisation, the shuffling and the shifts [default: 0, or the resumed
    /// checkpoint's].
    #[arg(long)]
    seed: Option<u64>,
    /// Visit the training images in file order.
    #[arg(long)]
    no_shuffle: bool,
    /// Start from these weights (a checkpoint or a file with the ten model tensors).
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
    /// Continue the run saved in this checkpoint exactly (weights, optimizer state, position,
    /// schedule, validation record) with its settings.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Write the final checkpoint here (atomically; also on Ctrl-C, SIGTERM, SIGHUP, an error
    /// after the first step, and with --checkpoint-every). Only a LeNet-5 checkpoint is replaced.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Also save to --save every N steps.
    #[arg(long, default_value_t = 0, requires = "save")]
    checkpoint_every: u64,
    /// Evaluate every N epochs (0: only at the end), on the --val images or else the test set.
    #[arg(long, default_value_t = 1)]
    eval_every: u64,
    /// Write one CSV row per step and per evaluation here (columns: kind, step, epoch, seconds,
    /// lr, loss, accuracy; a resumed run continues it from the checkpoint's step).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Draw the training curves (loss, accuracy, learning rate) into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print the report as one JSON document on stdout (fields: see README); the epoch lines
    /// and the summary go to stderr.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OptimizerChoice {
    /// torch.optim.Adam (betas 0.9/0.999, eps 1e-8).
    Adam,
    /// torch.optim.SGD (--momentum, --nesterov, --weight-decay).
    Sgd,
}

/// `--until`: "99.2", "99.2%" (percent) or "0.992" (a fraction: values up to 1), as a fraction.
fn parse_accuracy(text: &str) -> Result<f64, String> {
    let (number, percent) = match text.strip_suffix('%') {
        Some(n) => (n, true),
        None => (text, false),
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("{text:?} is not a number"))?;
    let fraction = if percent || value > 1.0 { value / 100.0 } else { value };
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(format!("{text} is not an accuracy between 0 and 100%"));
    }
    Ok(fraction)
}

#[derive(Args)]
struct EvalArgs {
    /// The checkpoint to evaluate.
    #[arg(long)]
    weights: PathBuf,
    /// Directory with the MNIST test files, t10k-* (raw or .gz) [default: the shipped data/mnist]
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Print accuracy, loss and confusion matrix as one JSON document on stdout (fields: see
    /// README); the human lines go to stderr.
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
    /// Images per training step the kernels are timed at.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Timed calls per kernel (after warm-up).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Print the rows as one JSON document on stdout (fields: see README); the table goes to
    /// stderr.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DevicesArgs {
    /// Say which adapter `--adapter NAME` picks (case-insensitive part of its name); also
    /// LENET_ADAPTER.
    #[arg(long, env = "LENET_ADAPTER")]
    adapter: Option<String>,
    /// Print the adapters and the choice as one JSON document on stdout (fields: see README).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: CompletionShell,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CompletionShell {
    /// `source <(lenet completions bash)` in ~/.bashrc, or save as
    /// ~/.local/share/bash-completion/completions/lenet
    Bash,
    /// Save as `_lenet` in a directory of $fpath
    Zsh,
    /// Save as ~/.config/fish/completions/lenet.fish
    Fish,
    /// `eval (lenet completions elvish | slurp)` in ~/.config/elvish/rc.elv
    Elvish,
    /// `lenet completions powershell | Out-String | Invoke-Expression` in $PROFILE
    Powershell,
}

impl From<CompletionShell> for clap_complete::Shell {
    fn from(s: CompletionShell) -> Self {
        match s {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
            CompletionShell::Elvish => clap_complete::Shell::Elvish,
            CompletionShell::Powershell => clap_complete::Shell::PowerShell,
        }
    }
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
        Command::Train(args) => train(*args),
        Command::Eval(args) => eval(args),
        Command::Predict(args) => predict(args),
        Command::Bench(args) => bench(args),
        Command::Devices(args) => devices(args),
        Command::Completions(args) => completions(args),
        Command::Man => man(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            notice(format!("error: {}", error_line(&e)));
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
        ("--save-best", &args.save_best, OutputKind::BestCheckpoint),
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

/// The optimizer the options describe, on top of `base` (the default, or a resumed run's).
fn optimizer_from_args(args: &TrainArgs, base: Optimizer) -> Result<Optimizer> {
    let sgd_options = args.momentum.is_some() || args.nesterov || args.weight_decay.is_some();
    let choice = match (args.optimizer, base.kind) {
        (Some(choice), _) => choice,
        (None, OptimizerKind::Adam(_)) => OptimizerChoice::Adam,
        (None, OptimizerKind::Sgd(_)) => OptimizerChoice::Sgd,
    };
    let kind = match (choice, base.kind) {
        (OptimizerChoice::Adam, _) if sgd_options => {
            bail!("--momentum, --nesterov and --weight-decay are SGD's settings (lenet's Adam has none); use --optimizer sgd")
        }
        (OptimizerChoice::Adam, OptimizerKind::Adam(adam)) => OptimizerKind::Adam(adam),
        (OptimizerChoice::Adam, _) => OptimizerKind::Adam(Adam::default()),
        (OptimizerChoice::Sgd, base_kind) => {
            let base_sgd = match base_kind {
                OptimizerKind::Sgd(sgd) => sgd,
                OptimizerKind::Adam(_) => Sgd::default(),
            };
            OptimizerKind::Sgd(Sgd {
                momentum: args.momentum.unwrap_or(base_sgd.momentum),
                nesterov: args.nesterov || base_sgd.nesterov,
                weight_decay: args.weight_decay.unwrap_or(base_sgd.weight_decay),
            })
        }
    };
    if let OptimizerKind::Sgd(sgd) = kind {
        if !(sgd.momentum.is_finite() && sgd.momentum >= 0.0) {
            bail!("--momentum {} must be a finite number >= 0", sgd.momentum);
        }
        if !(sgd.weight_decay.is_finite() && sgd.weight_decay >= 0.0) {
            bail!("--weight-decay {} must be a finite number >= 0", sgd.weight_decay);
        }
        if sgd.nesterov && sgd.momentum <= 0.0 {
            bail!("--nesterov needs --momentum above 0 (as torch.optim.SGD)");
        }
    }
    let optimizer = Optimizer { kind, lr: args.lr.unwrap_or(base.lr) };
    optimizer.validate().map_err(|e| anyhow!("--lr: {e}"))?;
    Ok(optimizer)
}

/// The checks on the second round's options that need no data or checkpoint.
fn check_recipe_args(args: &TrainArgs) -> Result<()> {
    optimizer_from_args(args, Optimizer::default())?;
    if args.val == Some(0) {
        bail!("--val 0 holds nothing out; leave --val out to train on every image");
    }
    if let Some(p) = args.augment_shift.filter(|&p| p > MAX_AUGMENT_SHIFT) {
        bail!("--augment-shift {p} is more than a 28x28 image can move (at most {MAX_AUGMENT_SHIFT})");
    }
    if args.patience == Some(0) {
        bail!("--patience 0 would stop at the first evaluation; give at least 1");
    }
    if args.resume.is_none() && args.val.is_none() {
        if args.patience.is_some() {
            bail!("--patience needs --val N: early stopping watches the validation loss");
        }
        if args.save_best.is_some() {
            bail!("--save-best needs --val N: the best checkpoint is chosen on the validation set");
        }
    }
    Ok(())
}

fn train(args: TrainArgs) -> Result<ExitCode> {
    if args.epochs == Some(0) && args.steps.is_none() {
        bail!("--epochs 0 trains nothing; give at least 1 (or --steps N)");
    }
    if args.steps == Some(0) {
        bail!("--steps 0 trains nothing; give at least 1");
    }
    if args.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    check_recipe_args(&args)?;
    let dir = data_dir(args.data.as_deref());
    let (train_files, test_files) = (find_split(&dir, Split::Train)?, find_split(&dir, Split::Test)?);
    check_train_paths(&args, &train_files, &test_files)?;
    let mut mnist = Mnist { train: load_split(&train_files)?, test: load_split(&test_files)? };

    let mut state = match &args.resume {
        Some(path) => {
            let Some(mut state) = load_checkpoint(path)?.into_train_state() else {
                bail!(
                    "{}: holds weights only, no optimiser state to resume; use --init to start from it",
                    path.display()
                );
            };
            let optimizer = optimizer_from_args(&args, state.optimizer)?;
            let conflicts = [
                ("--seed", args.seed.is_some_and(|s| s != state.seed)),
                ("--batch", args.batch.is_some_and(|b| b != state.batch)),
                ("--no-shuffle", args.no_shuffle && state.shuffle),
                ("--lr-schedule", args.lr_schedule.is_some_and(|s| s != state.schedule)),
                ("--augment-shift", args.augment_shift.is_some_and(|p| p != state.augment_shift)),
                ("--val", args.val.is_some_and(|n| n != state.validation)),
                (
                    "--optimizer, --momentum, --nesterov or --weight-decay",
                    optimizer.kind != state.optimizer.kind,
                ),
            ];
            if let Some((flag, _)) = conflicts.iter().find(|(_, c)| *c) {
                bail!(
                    "{flag} differs from the run saved in {}; a resumed run keeps its settings",
                    path.display()
                );
            }
            // --lr may change on a resume, as it always could.
            state.optimizer = optimizer;
            state
        }
        None => {
            let seed = args.seed.unwrap_or(0);
            let params = match &args.init {
                Some(path) => load_checkpoint(path)?.params,
                None => Params::init(seed),
            };
            let optimizer = optimizer_from_args(&args, Optimizer::default())?;
            let mut state =
                TrainState::new(params, optimizer, seed, args.batch.unwrap_or(256), !args.no_shuffle);
            state.schedule = args.lr_schedule.unwrap_or_default();
            state.augment_shift = args.augment_shift.unwrap_or(0);
            state.validation = args.val.unwrap_or(0);
            state
        }
    };
    if (args.patience.is_some() || args.save_best.is_some()) && state.validation == 0 {
        bail!("--patience and --save-best need --val N, and the resumed run has no validation set");
    }
    let validation = match state.validation {
        0 => None,
        n => Some(split_validation(&mut mnist.train, n)?),
    };
    if state.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if state.batch > mnist.train.len() {
        let held = if state.validation > 0 { " after --val" } else { "" };
        bail!("--batch {} is larger than the training set ({} images{held})", state.batch, mnist.train.len());
    }
    // A resumed run with a schedule finishes it unless told otherwise.
    let steps = match (args.steps, args.epochs, &args.resume) {
        (None, None, Some(path)) if state.schedule != LrSchedule::Constant => {
            match state.schedule_steps.saturating_sub(state.step) {
                0 => bail!(
                    "{}: the run has finished its {} schedule ({} steps); nothing to resume",
                    path.display(),
                    state.schedule,
                    state.schedule_steps
                ),
                left => Some(left),
            }
        }
        (steps, _, _) => steps,
    };

    let mut backend = open_backend(args.device.backend.into(), args.device.adapter.as_deref(), &mnist.train)?;
    // Ctrl-C, SIGTERM and SIGHUP: finish the steps in flight, save, exit 128+signo.
    let stop = install_stop_handlers().context("cannot install the signal handlers")?;
    let cfg = TrainConfig {
        epochs: args.epochs.unwrap_or(10),
        steps,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        save: args.save.clone(),
        save_best: args.save_best.clone(),
        metrics: args.metrics.clone(),
        patience: args.patience,
        until: args.until,
        plain_progress: false,
    };
    let report =
        lenet::train::train(backend.as_mut(), &mut state, &mnist, validation.as_ref(), &cfg, &stop.flag)?;
    if let Some(path) = &args.plot {
        // The log covers a resumed run's earlier parts too; this invocation's history does not.
        let history = match &args.metrics {
            Some(metrics) if args.resume.is_some() => lenet::train::metrics::read_metrics(metrics)?,
            _ => report.history.clone(),
        };
        lenet::plot::write_training_svg(path, &history)?;
    }
    let mut out = Output::new(args.json);
    let verb = match report.stop_reason {
        Some(StopReason::Signal) => "interrupted after",
        Some(_) => "stopped early after",
        None => "trained",
    };
    out.line(format!(
        "{verb} {} steps ({:.2} epochs) in {:.2} s, {:.0} images/s, on {}",
        report.steps,
        report.epochs,
        report.train_seconds,
        report.images_per_s,
        on_device(&report.backend, &report.adapter),
    ));
    let test = match (report.test_accuracy, report.test_loss) {
        (Some(acc), Some(loss)) => format!("test accuracy {:.2}%, test loss {loss:.4}", 100.0 * acc),
        _ => "no evaluation (the test set is empty)".to_string(),
    };
    let saved = args.save.as_ref().map(|p| format!("; saved {}", p.display())).unwrap_or_default();
    out.line(format!("train loss {:.4}, {test}{saved}", report.train_loss));
    for line in report.outcome_lines(&cfg) {
        out.line(line);
    }
    if args.json {
        out.document(&report)?;
    }
    // A stop signal gives its code even when it came too late to cut the run short: the process
    // was asked to end, and whatever sent it looks for that code.
    let code = match (stop.exit_code(), report.stop_reason) {
        (Some(code), _) => ExitCode::from(code),
        (None, Some(StopReason::Signal)) => ExitCode::from(130),
        (None, _) => ExitCode::SUCCESS,
    };
    Ok(out.finish(code))
}

/// "cpu: 2 threads of 2 available, AVX-512", "gpu: NVIDIA H100": which path, and what it ran on.
fn on_device(backend: &str, adapter: &str) -> String {
    format!("{backend}: {adapter}")
}

/// `lenet eval --json`: where it ran, then the evaluation's fields.
#[derive(serde::Serialize)]
struct EvalReport<'a> {
    backend: &'a str,
    adapter: String,
    #[serde(flatten)]
    evaluation: &'a Evaluation,
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
    let mut out = Output::new(args.json);
    out.line(format!(
        "accuracy {:.2}% ({}/{}), loss {:.4}, on {}",
        100.0 * eval.accuracy,
        eval.correct,
        eval.count,
        eval.loss,
        on_device(backend.kind(), &backend.adapter()),
    ));
    out.line("confusion (rows: true digit, columns: predicted)");
    out.line(format!("     {}", (0..10).map(|c| format!("{c:>6}")).collect::<String>()));
    for (label, row) in eval.confusion.iter().enumerate() {
        out.line(format!("{label:>4} {}", row.iter().map(|n| format!("{n:>6}")).collect::<String>()));
    }
    if args.json {
        out.document(&EvalReport { backend: backend.kind(), adapter: backend.adapter(), evaluation: &eval })?;
    }
    Ok(out.finish(ExitCode::SUCCESS))
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
    let mut out = Output::new(args.json);
    let mut records = Vec::with_capacity(args.images.len());
    let mut failed = 0usize;
    for path in &args.images {
        let file = path.display().to_string();
        let record = match load_image(path) {
            Err(e) => {
                notice(format!("error: {e}"));
                failed += 1;
                json!({ "file": file, "digit": Value::Null, "probability": Value::Null,
                        "probabilities": Value::Null, "error": e.to_string() })
            }
            Ok(Prepared::NoInk) => {
                let warning = "no ink found: the image is blank or its marks are too faint";
                notice(format!("warning: {file}: {warning}"));
                out.line(format!("{file}: no digit"));
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
                    out.line(format!("{file}: {digit} ({:.1}%, low confidence)", 100.0 * p));
                    record["warning"] = json!(format!(
                        "low confidence: the top probability is below {:.0}%",
                        100.0 * LOW_CONFIDENCE
                    ));
                } else {
                    out.line(format!("{file}: {digit} ({:.1}%)", 100.0 * p));
                }
                record
            }
        };
        records.push(record);
    }
    if args.json {
        out.document(&Value::Array(records))?;
    }
    Ok(out.finish(if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }))
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
        // As `train` chooses: a software adapter (lavapipe, ~100x slower than the CPU path) only
        // when named (--adapter, LENET_ADAPTER) or with --backend gpu.
        BackendChoice::Auto => {
            let adapters = lenet::gpu::list_adapters();
            let chosen = lenet::gpu::context::choose_adapter(&adapters, adapter).map(|i| &adapters[i]);
            let software = chosen.is_some_and(|a| a.device_type == wgpu::DeviceType::Cpu);
            match chosen {
                None if adapters.is_empty() => {
                    notice("backend: cpu, because there is no GPU adapter");
                    None
                }
                None => {
                    notice(format!(
                        "backend: cpu, because no adapter's name contains {:?}",
                        adapter.unwrap_or("")
                    ));
                    None
                }
                Some(a) if software && adapter.is_none() => {
                    notice(format!(
                        "backend: cpu, because the only adapter, {}, is a software rasterizer, slower than \
                         the CPU path; --backend gpu or --adapter NAME benches it",
                        a.name
                    ));
                    None
                }
                Some(_) => match lenet::gpu::GpuContext::new(adapter) {
                    Ok(c) => {
                        notice(format!("backend: gpu on {}", c.adapter_info));
                        Some(c)
                    }
                    Err(e) => {
                        notice(format!("backend: cpu, because the GPU failed to start: {}", error_line(&e)));
                        None
                    }
                },
            }
        }
    };
    let mut cfg = lenet::bench::BenchConfig::new(args.batch, args.iters);
    // A slow adapter (lavapipe) stops each row after this much wall time (at least 3 samples).
    cfg.budget_s = 1.0;
    let report = lenet::bench::run(&cfg, ctx.as_ref())?;
    let mut out = Output::new(args.json);
    out.text(&report.table());
    if args.json {
        out.document(&report)?;
    }
    if report.any_failed() {
        notice("bench: validation FAILED for some rows (see the table)");
        return Ok(out.finish(ExitCode::FAILURE));
    }
    Ok(out.finish(ExitCode::SUCCESS))
}

/// `lenet devices --json`.
#[derive(serde::Serialize)]
struct DevicesReport {
    adapters: Vec<AdapterEntry>,
    /// The `--adapter`/LENET_ADAPTER name asked for, if any.
    wanted: Option<String>,
    auto: AutoChoice,
}

#[derive(serde::Serialize)]
struct AdapterEntry {
    index: usize,
    name: String,
    api: &'static str,
    device_type: &'static str,
    driver: String,
    driver_info: String,
}

/// What `--backend auto` does, and why.
#[derive(serde::Serialize)]
struct AutoChoice {
    /// "gpu" or "cpu".
    backend: &'static str,
    /// The index of the adapter it trains on (`null` on the CPU path).
    adapter: Option<usize>,
    reason: String,
}

/// What `--backend auto` makes of these adapters (the rules of `lenet::backend::open_backend`).
fn auto_choice(adapters: &[AdapterSummary], wanted: Option<&str>) -> AutoChoice {
    let cpu = |reason: String| AutoChoice { backend: "cpu", adapter: None, reason };
    match (choose_adapter(adapters, wanted), wanted) {
        (None, _) if adapters.is_empty() => {
            cpu("there is no GPU adapter (on Linux without a GPU, Mesa's lavapipe provides one: \
             apt-get install mesa-vulkan-drivers)"
                .into())
        }
        (None, w) => cpu(format!("no adapter's name contains {:?}", w.unwrap_or_default())),
        (Some(i), Some(w)) => {
            AutoChoice { backend: "gpu", adapter: Some(i), reason: format!("its name contains {w:?}") }
        }
        (Some(i), None) if adapters[i].device_type == wgpu::DeviceType::Cpu => cpu(format!(
            "the best adapter, {}, is a software rasterizer, slower than the CPU path; \
             --backend gpu or --adapter NAME uses it",
            adapters[i].name
        )),
        (Some(i), None) => AutoChoice {
            backend: "gpu",
            adapter: Some(i),
            reason: format!(
                "it is a {}, the best kind here: discrete, integrated, virtual GPU, then software; \
                 Vulkan, Metal and DX12 before GL",
                adapters[i].kind()
            ),
        },
    }
}

fn devices(args: DevicesArgs) -> Result<ExitCode> {
    let adapters = lenet::gpu::list_adapters();
    let wanted = args.adapter.filter(|w| !w.trim().is_empty());
    let auto = auto_choice(&adapters, wanted.as_deref());
    let mut out = Output::new(args.json);
    // `*` marks the adapter `auto` trains on: none when it takes the CPU path.
    for (i, a) in adapters.iter().enumerate() {
        let mark = if auto.adapter == Some(i) { "*" } else { " " };
        out.line(format!("{mark} {i}: {a}"));
    }
    match auto.adapter {
        Some(i) => out.line(format!("--backend auto uses {}: {}", adapters[i].name, auto.reason)),
        None => out.line(format!("--backend auto uses the CPU path: {}", auto.reason)),
    }
    if args.json {
        let entries = adapters
            .iter()
            .enumerate()
            .map(|(index, a)| AdapterEntry {
                index,
                name: a.name.clone(),
                api: a.api(),
                device_type: a.kind(),
                driver: a.driver.clone(),
                driver_info: a.driver_info.clone(),
            })
            .collect();
        out.document(&DevicesReport { adapters: entries, wanted, auto })?;
    }
    Ok(out.finish(ExitCode::SUCCESS))
}

fn completions(args: CompletionsArgs) -> Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(
        clap_complete::Shell::from(args.shell),
        &mut Cli::command(),
        "lenet",
        &mut script,
    );
    let mut out = Output::new(false);
    out.product(&script);
    Ok(out.finish(ExitCode::SUCCESS))
}

fn man() -> Result<ExitCode> {
    let page = man_page().context("cannot render the manual page")?;
    let mut out = Output::new(false);
    out.product(&page);
    Ok(out.finish(ExitCode::SUCCESS))
}

/// One roff page for `lenet` and all its subcommands: the top-level page (name, synopsis,
/// description, options), then a section per subcommand with its synopsis, description and
/// options (clap_mangen's sections, demoted to subsections), exit status and environment.
fn man_page() -> Result<Vec<u8>> {
    let mut cmd = Cli::command();
    cmd.build();
    let top = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    top.render_title(&mut page)?;
    top.render_name_section(&mut page)?;
    top.render_synopsis_section(&mut page)?;
    top.render_description_section(&mut page)?;
    top.render_options_section(&mut page)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        writeln!(page, ".SH \"LENET {}\"", sub.get_name().to_uppercase())?;
        let man = clap_mangen::Man::new(sub.clone());
        let mut sections = Vec::new();
        man.render_synopsis_section(&mut sections)?;
        man.render_description_section(&mut sections)?;
        man.render_options_section(&mut sections)?;
        for line in String::from_utf8(sections)?.lines() {
            match line.strip_prefix(".SH ") {
                Some(heading) => writeln!(page, ".SS {heading}")?,
                None => writeln!(page, "{line}")?,
            }
        }
    }
    page.extend_from_slice(MAN_TAIL.as_bytes());
    top.render_version_section(&mut page)?;
    // Each rendered piece starts with the same two-line preamble (a string definition): once
    // is enough.
    let text = String::from_utf8(page)?;
    let mut seen = std::collections::HashSet::new();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !(l.starts_with(".ie \\n(.g") || l.starts_with(".el .ds")) || seen.insert(*l))
        .collect();
    Ok((lines.join("\n") + "\n").into_bytes())
}

/// What the generated sections cannot know.
const MAN_TAIL: &str = r#".SH "EXIT STATUS"
.TP
0
success
.TP
1
an error, told in one line on stderr beginning with error:
.TP
2
a command line clap refuses (an unknown option or value)
.TP
129, 130, 143
train stopped by SIGHUP, Ctrl\-C (SIGINT) or SIGTERM, after saving to \-\-save
.SH ENVIRONMENT
.TP
LENET_ADAPTER
picks a GPU adapter by part of its name, as \-\-adapter does
.TP
LENET_KERNELS
picks the GPU kernels: auto (the default: mixed on a GPU, v2 on a software adapter), v1, v2,
mixed or v3
.TP
LENET_CPU_ISA
the CPU path's instruction set: auto (the default: the widest the CPU has), avx2 or avx512
.TP
RAYON_NUM_THREADS
the CPU path's threads (default: the cores this process may use)
.TP
WGPU_BACKEND
limits the graphics APIs wgpu looks at (vulkan, metal, dx12, gl)
.SH "SEE ALSO"
The README of lenet\-wgpu: the \-\-json fields, the \-\-metrics columns, the checkpoint format.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap's own checks: no two options share a name, defaults are valid values, ...
        Cli::command().debug_assert();
    }
}
