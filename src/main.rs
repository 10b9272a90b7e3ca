//! `lenet`: the command line. Parsing and printing only; the work is in the library.
//! How it writes (stdout, stderr, `--json`, a closed pipe) is in [`cli_output`].

mod cli;
mod cli_output;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum, ValueHint};

use cli_output::{notice, Output};

use cli::resolve_data_dir;
use lenet::augment::MAX_AUGMENT_SHIFT;
use lenet::backend::no_training_data;
use lenet::checkpoint::load_checkpoint;
use lenet::choice::{auto_choice, bench_context, open_backend};
use lenet::data::{find_split, load_split, Mnist, Split, SplitFiles};
use lenet::gpu::context::wanted_adapter;
use lenet::model::{Monitor, Params, TrainState};
use lenet::optim::{self, Optimizer};
use lenet::paths::{check_run_paths, lock_outputs, InputPath, OutputKind, OutputPath};
use lenet::schedule::LrSchedule;
use lenet::signals::install_stop_handlers;
use lenet::train::eval::{evaluate_probabilities, mean_probabilities, softmax_rows};
use lenet::train::progress::ProgressDisplay;
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
    /// Get the MNIST data (`lenet data fetch`).
    Data(cli::fetch::DataArgs),
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

impl From<BackendChoice> for lenet::choice::BackendChoice {
    fn from(c: BackendChoice) -> Self {
        match c {
            BackendChoice::Auto => lenet::choice::BackendChoice::Auto,
            BackendChoice::Gpu => lenet::choice::BackendChoice::Gpu,
            BackendChoice::Cpu => lenet::choice::BackendChoice::Cpu,
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
    /// Compile the GPU kernels with naga's loop bounding (on) or without it (off: our loops all
    /// have fixed bounds; a counter per loop less). For measuring the difference.
    #[arg(long, value_enum, value_name = "ON|OFF", default_value = "on")]
    shader_loop_bounds: ShaderLoopBounds,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ShaderLoopBounds {
    On,
    Off,
}

/// The GPU options of `train` and `bench`: `--shader-loop-bounds` and the hidden `--kernels`
/// (an unknown name is refused here, before any work).
fn gpu_options(device: &DeviceArgs, kernels: Option<&str>) -> Result<lenet::choice::GpuOptions> {
    let kernels = kernels.map(|name| name.parse::<lenet::gpu::Variant>().context("--kernels")).transpose()?;
    Ok(lenet::choice::GpuOptions { loop_bounds: device.shader_loop_bounds.into(), kernels })
}

impl From<ShaderLoopBounds> for lenet::choice::LoopBounds {
    fn from(b: ShaderLoopBounds) -> Self {
        match b {
            ShaderLoopBounds::On => lenet::choice::LoopBounds::Bounded,
            ShaderLoopBounds::Off => lenet::choice::LoopBounds::Unbounded,
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    /// Directory with the four MNIST IDX files (raw or .gz) [default: LENET_DATA, else the user
    /// cache's (`lenet data fetch`), else the source tree's data/mnist]
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    data: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    /// The GPU kernels by name (v1, mixed, v3), for timing them against each other; hidden.
    #[arg(long, value_name = "NAME", hide = true)]
    kernels: Option<String>,
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
    /// The optimizer, as torch.optim's: adam (Adam, betas 0.9/0.999, eps 1e-8), sgd (SGD),
    /// adamw (AdamW, betas 0.9/0.999, eps 1e-8), rmsprop (RMSprop, eps 1e-8) [default: adam, or
    /// the resumed checkpoint's]
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(optim::RULES.iter().map(|d| d.name)))]
    optimizer: Option<String>,
    /// The momentum of sgd and rmsprop [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    momentum: Option<f64>,
    /// sgd with Nesterov momentum (needs --momentum above 0).
    #[arg(long)]
    nesterov: bool,
    /// Weight decay: sgd's and rmsprop's L2 penalty, added to the gradient; adamw's decoupled
    /// decay, p *= 1 - lr*W [default: 0; adamw 1e-2]
    #[arg(long, allow_negative_numbers = true)]
    weight_decay: Option<f64>,
    /// rmsprop's smoothing constant, the weight of the old mean of squares [default: 0.99]
    #[arg(long, allow_negative_numbers = true)]
    alpha: Option<f64>,
    /// rmsprop divides by the gradients' variance (their mean of squares less their mean
    /// squared) instead of their mean of squares.
    #[arg(long)]
    centered: bool,
    /// Move each training image by a random whole-pixel offset in [-P, P] on each axis,
    /// zero-filled, drawn from the seed (the same on the CPU and the GPU) [default: 0]
    #[arg(long, value_name = "P")]
    augment_shift: Option<u32>,
    /// Hold out the last N training images: evaluate on them after each epoch, and on the test
    /// set once at the end.
    #[arg(long, value_name = "N")]
    val: Option<usize>,
    /// Keep the checkpoint with the best validation figure here (--monitor; default: the
    /// accuracy), atomically; needs --val. The final test evaluation and --save then use the best
    /// checkpoint's weights, as Keras's restore_best_weights.
    #[arg(long, value_name = "FILE")]
    save_best: Option<PathBuf>,
    /// Stop when the validation figure (--monitor; default: the loss) has not improved for N
    /// evaluations (needs --val).
    #[arg(long, value_name = "N")]
    patience: Option<u64>,
    /// The validation figure --patience and --save-best watch [default: val_loss for
    /// --patience, val_accuracy for --save-best]
    #[arg(long, value_name = "FIGURE")]
    monitor: Option<MonitorArg>,
    /// The least change of the watched figure that counts as an improvement (a loss, or an
    /// accuracy as a fraction: 0.001 is 0.1 points) [default: 0]
    #[arg(long, value_name = "D")]
    min_delta: Option<f64>,
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
    /// The checkpoint to evaluate (a LeNet-5 checkpoint of any optimizer, or the ten model
    /// tensors). Give it several times for an ensemble: each model's softmax, then their mean.
    #[arg(long, value_name = "FILE", required = true, value_hint = ValueHint::FilePath)]
    weights: Vec<PathBuf>,
    /// Directory with the MNIST test files, t10k-* (raw or .gz) [default: LENET_DATA, else the
    /// user cache's (`lenet data fetch`), else the source tree's data/mnist]
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
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
    /// The checkpoint to classify with. Give it several times for an ensemble: each model's
    /// softmax, then their mean.
    #[arg(long, value_name = "FILE", required = true, value_hint = ValueHint::FilePath)]
    weights: Vec<PathBuf>,
    /// Images of single digits: PNG, JPEG, PGM, PPM or PBM, any size, either polarity (a FIFO or
    /// `<(command)` is read as a stream).
    #[arg(required = true, value_name = "IMAGE", value_hint = ValueHint::FilePath)]
    images: Vec<PathBuf>,
    /// Write the 28x28 image the network saw for each input into DIR, as PGM named after the
    /// input (digit.png -> DIR/digit.pgm); an existing file there is never replaced.
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    save_prepared: Option<PathBuf>,
    /// Print one JSON array on stdout, an object per image; the human lines go to stderr.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// The GPU kernels by name (v1, mixed, v3), for timing them against each other; hidden.
    #[arg(long, value_name = "NAME", hide = true)]
    kernels: Option<String>,
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
    // The library reads no environment: the instruction set of the CPU path is chosen here.
    lenet::cpu::isa::select(std::env::var(lenet::cpu::isa::ISA_ENV).ok().as_deref());
    let result = match cli.command {
        Command::Train(args) => train(*args),
        Command::Eval(args) => eval(args),
        Command::Predict(args) => predict(args),
        Command::Bench(args) => bench(args),
        Command::Devices(args) => devices(args),
        Command::Completions(args) => completions(args),
        Command::Man => man(),
        Command::Data(args) => cli::fetch::data(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            notice(format!("error: {}", error_line(&e)));
            ExitCode::FAILURE
        }
    }
}

/// Every file the run reads and writes, checked before any work (see `lenet::paths`); the
/// outputs, checked.
fn check_train_paths(
    args: &TrainArgs,
    train_files: &SplitFiles,
    test_files: &SplitFiles,
) -> Result<Vec<OutputPath>> {
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
    Ok(outputs)
}

/// The run's recipe, for `train --json`'s `config`: what another run needs to be this one. The
/// optimizer's settings are as its checkpoint metadata writes them (f64s in the shortest decimal
/// that reads back to the same bits).
fn run_config(state: &TrainState, cfg: &TrainConfig, data: &Path) -> serde_json::Value {
    use serde_json::{json, Value};
    // Each optimizer has its own settings: a list of them, so the document's shape is the same
    // whichever optimizer ran.
    let settings: Vec<Value> = state
        .optimizer
        .metadata()
        .into_iter()
        .filter(|(k, _)| !matches!(*k, "optimizer" | "lr"))
        .map(|(k, v)| json!({ "name": k, "value": v }))
        .collect();
    json!({
        "data": data.display().to_string(),
        "seed": state.seed,
        "batch": state.batch,
        "shuffle": state.shuffle,
        "optimizer": state.optimizer.descriptor().name,
        "lr": state.optimizer.lr,
        "optimizer_settings": settings,
        "lr_schedule": state.schedule.name(),
        "augment_shift": state.augment_shift,
        "val": state.validation,
        "epochs": cfg.epochs,
        "steps": cfg.steps,
        "patience": cfg.patience,
        "monitor": cfg.monitor.map(Monitor::name),
        "min_delta": cfg.min_delta,
        "until": cfg.until,
    })
}

/// `--monitor`'s values, as Keras names them.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum MonitorArg {
    #[value(name = "val_loss")]
    ValLoss,
    #[value(name = "val_accuracy")]
    ValAccuracy,
}

impl From<MonitorArg> for Monitor {
    fn from(m: MonitorArg) -> Self {
        match m {
            MonitorArg::ValLoss => Monitor::ValLoss,
            MonitorArg::ValAccuracy => Monitor::ValAccuracy,
        }
    }
}

/// `resumed from FILE at step S (epoch E, K of N steps)`: where a resumed run picks up, with the
/// epoch counted from 1 and its steps as this run's batch and training set give them.
fn resumed_line(path: &Path, state: &TrainState, train_images: usize) -> String {
    let per_epoch = (train_images / state.batch.max(1)) as u64;
    // Earlier versions wrote an epoch's last step as unfinished: it is the next one's start.
    let (epoch, done) = match state.step_in_epoch {
        k if k >= per_epoch && per_epoch > 0 => (state.epoch + 1, 0),
        k => (state.epoch, k),
    };
    format!(
        "resumed from {} at step {} (epoch {}, {done} of {per_epoch} steps)",
        path.display(),
        state.step,
        epoch.saturating_add(1)
    )
}

/// The optimizer options given on the command line.
fn optim_flags(args: &TrainArgs) -> optim::Flags {
    optim::Flags {
        momentum: args.momentum,
        nesterov: args.nesterov,
        weight_decay: args.weight_decay,
        alpha: args.alpha,
        centered: args.centered,
    }
}

/// The optimizer the options describe, on top of `base` (the default, or a resumed run's).
fn optimizer_from_args(args: &TrainArgs, base: Optimizer) -> Result<Optimizer> {
    let flags = optim_flags(args);
    let mut optimizer = Optimizer::from_flags(args.optimizer.as_deref(), &flags, base)?;
    optimizer.lr = args.lr.unwrap_or(base.lr);
    optimizer.validate_as(optim::Naming::Flags)?;
    Ok(optimizer)
}

/// The checks on the second round's options that need no data or checkpoint.
fn check_recipe_args(args: &TrainArgs) -> Result<()> {
    // The values' bounds, before any data is read. A resumed run without --optimizer keeps the
    // checkpoint's optimizer: its options are checked against that one once the checkpoint is
    // read (restating its own --momentum is no conflict).
    // Their bounds are checked now all the same, as the first optimizer that takes them has them.
    let base = match (&args.resume, args.optimizer.as_deref()) {
        (Some(_), None) => {
            let given = optim_flags(args).given();
            optim::accepting(&given).map(|d| Optimizer { kind: d.default_kind(), ..Optimizer::default() })
        }
        _ => Some(Optimizer::default()),
    };
    if let Some(base) = base {
        let optimizer = optimizer_from_args(args, base)?;
        // OneCycleLR refuses an optimizer with neither betas nor a momentum, as PyTorch's does.
        if args.lr_schedule.is_some_and(LrSchedule::cycles_momentum)
            && optimizer.descriptor().cycled.is_none()
        {
            bail!(
                "--lr-schedule onecycle cycles a momentum or beta1, which --optimizer {} has not",
                optimizer.descriptor().name
            );
        }
    }
    if args.val == Some(0) {
        bail!("--val 0 holds nothing out; leave --val out to train on every image");
    }
    if let Some(p) = args.augment_shift.filter(|&p| p > MAX_AUGMENT_SHIFT) {
        bail!("--augment-shift {p} is more than a 28x28 image can move (at most {MAX_AUGMENT_SHIFT})");
    }
    if let Some(d) = args.min_delta.filter(|d| !(d.is_finite() && *d >= 0.0)) {
        bail!("--min-delta {d} must be a finite number >= 0");
    }
    if (args.monitor.is_some() || args.min_delta.is_some())
        && args.patience.is_none()
        && args.save_best.is_none()
    {
        bail!("--monitor and --min-delta tell --patience and --save-best what to watch; give one of them");
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
    let gpu = gpu_options(&args.device, args.kernels.as_deref())?;
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
    let data = resolve_data_dir(args.data.as_deref())?;
    let dir = &data.path;
    let (train_files, test_files) = (find_split(dir, Split::Train)?, find_split(dir, Split::Test)?);
    notice(data.header());
    let outputs = check_train_paths(&args, &train_files, &test_files)?;
    // Held until the run ends: a second run writing any of these files is refused.
    let _locks = lock_outputs(&outputs)?;
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
                    "--optimizer, --momentum, --nesterov, --weight-decay, --alpha or --centered",
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

    if let Some(path) = &args.resume {
        let _ = writeln!(std::io::stderr(), "{}", resumed_line(path, &state, mnist.train.len()));
    }
    // Starting a GPU compiles its kernels: seconds, minutes on a software adapter.
    let (mut backend, choice) = lenet::train::progress::during(false, "starting the backend", || {
        open_backend(args.device.backend.into(), args.device.adapter.as_deref(), gpu, &mnist.train)
    })?;
    if let Some(line) = choice {
        notice(line);
    }
    // Never silent: which kernels could not run here, and what runs instead.
    if let Some(why) = backend.kernel_fallback() {
        notice(format!("kernels: {why}"));
    }
    if args.device.shader_loop_bounds == ShaderLoopBounds::Off && backend.kind() == "gpu" {
        notice("shaders: compiled without naga's loop bounding (--shader-loop-bounds off)");
    }
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
        monitor: args.monitor.map(Monitor::from),
        min_delta: args.min_delta.unwrap_or(0.0),
        until: args.until,
        plain_progress: false,
        chunk_steps: None,
    };
    let mut display = ProgressDisplay::new(cfg.plain_progress);
    let report = lenet::train::train_with_events(
        backend.as_mut(),
        &mut state,
        &mnist,
        validation.as_ref(),
        &cfg,
        &stop.flag,
        &mut |event| display.on_event(event),
    )?;
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
        "{verb} {} ({:.2} epochs) in {:.2} s, {:.0} images/s, on {}",
        count_of(report.steps as usize, "step", "steps"),
        report.epochs,
        report.train_seconds,
        report.images_per_s,
        on_device(&report.backend, &report.adapter),
    ));
    let test = match (report.test_accuracy, report.test_loss) {
        (Some(acc), Some(loss)) => {
            let of = match report.scored_weights {
                "best" => format!(" (the best validation checkpoint's weights, step {})", report.scored_step),
                _ => String::new(),
            };
            format!("test accuracy {:.2}%, test loss {loss:.4}{of}", 100.0 * acc)
        }
        _ => "no evaluation (the test set is empty)".to_string(),
    };
    let saved = args.save.as_ref().map(|p| format!("; saved {}", p.display())).unwrap_or_default();
    out.line(format!("train loss {:.4}, {test}{saved}", report.train_loss));
    for line in report.outcome_lines(&cfg) {
        out.line(line);
    }
    if args.json {
        let mut document = serde_json::to_value(&report)?;
        document["config"] = run_config(&state, &cfg, &data.path);
        out.document(&document)?;
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

/// `lenet eval --json`: where it ran, then the evaluation's fields (of the ensemble, with several
/// `--weights`), then each model's with several.
#[derive(serde::Serialize)]
struct EvalReport<'a> {
    backend: &'a str,
    adapter: String,
    /// The data directory read.
    data: String,
    #[serde(flatten)]
    evaluation: &'a Evaluation,
    /// With several `--weights`: each model's own figures, in the order given.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    models: Vec<ModelEvaluation>,
}

/// One model of an ensemble, scored alone.
#[derive(serde::Serialize)]
struct ModelEvaluation {
    weights: String,
    accuracy: f64,
    loss: f64,
    correct: usize,
    count: usize,
}

/// "1 model", "5 models": a count and its noun.
fn count_of(n: usize, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// Every `--weights` file as LeNet-5 parameters (any optimizer's checkpoint, or the ten model
/// tensors); the same file named twice is refused (it would count double in the mean).
fn load_models(paths: &[PathBuf]) -> Result<Vec<Params>> {
    let mut seen: Vec<PathBuf> = Vec::new();
    for path in paths {
        if let Ok(canonical) = std::fs::canonicalize(path) {
            if canonical.is_file() && seen.contains(&canonical) {
                bail!("{}: given twice as --weights; an ensemble counts each model once", path.display());
            }
            seen.push(canonical);
        }
    }
    paths.iter().map(|p| Ok(load_checkpoint(p)?.params)).collect()
}

fn eval(args: EvalArgs) -> Result<ExitCode> {
    let models = load_models(&args.weights)?;
    let data = resolve_data_dir(args.data.as_deref())?;
    // Only the test files: evaluating needs no training set.
    let test = load_split(&find_split(&data.path, Split::Test)?)?;
    if test.is_empty() {
        bail!("{}: the test set is empty; nothing to evaluate", data.path.display());
    }
    notice(data.header());
    let (mut backend, choice) = open_backend(
        args.device.backend.into(),
        args.device.adapter.as_deref(),
        lenet::choice::LoopBounds::from(args.device.shader_loop_bounds),
        &no_training_data(),
    )?;
    if let Some(line) = choice {
        notice(line);
    }
    if let Some(why) = backend.kernel_fallback() {
        notice(format!("kernels: {why}"));
    }
    let mut singles = Vec::with_capacity(models.len());
    let mut probabilities = Vec::with_capacity(models.len());
    for (params, path) in models.into_iter().zip(&args.weights) {
        let state = TrainState::new(params, Optimizer::default(), 0, 1, false);
        backend.load_state(&state)?;
        let logits = backend.logits(&test)?;
        let single = evaluate_logits(&logits, &test.labels)?;
        if !single.loss.is_finite() {
            bail!(
                "{}: the weights are finite but give a loss of {} on the test set (values too large \
                 to compute with, as a diverged run leaves them); nothing to report",
                path.display(),
                single.loss
            );
        }
        singles.push(single);
        if args.weights.len() > 1 {
            probabilities.push(softmax_rows(&logits));
        }
    }
    let device = on_device(backend.kind(), &backend.adapter());
    let mut out = Output::new(args.json);
    let eval = if args.weights.len() == 1 {
        let eval = singles.remove(0);
        out.line(format!(
            "accuracy {:.2}% ({}/{}), loss {:.4}, on {device}",
            100.0 * eval.accuracy,
            eval.correct,
            eval.count,
            eval.loss,
        ));
        eval
    } else {
        for (i, (single, path)) in singles.iter().zip(&args.weights).enumerate() {
            out.line(format!(
                "model {}: accuracy {:.2}% ({}/{}), loss {:.4}, {}",
                i + 1,
                100.0 * single.accuracy,
                single.correct,
                single.count,
                single.loss,
                path.display()
            ));
        }
        let eval = evaluate_probabilities(&mean_probabilities(&probabilities), &test.labels);
        out.line(format!(
            "ensemble of {} (the mean of their probabilities): accuracy {:.2}% ({}/{}), loss {:.4}, on {device}",
            count_of(args.weights.len(), "model", "models"),
            100.0 * eval.accuracy,
            eval.correct,
            eval.count,
            eval.loss,
        ));
        eval
    };
    let whose = if args.weights.len() > 1 { " of the ensemble" } else { "" };
    out.line(format!("confusion{whose} (rows: true digit, columns: predicted)"));
    out.line(format!("     {}", (0..10).map(|c| format!("{c:>6}")).collect::<String>()));
    for (label, row) in eval.confusion.iter().enumerate() {
        out.line(format!("{label:>4} {}", row.iter().map(|n| format!("{n:>6}")).collect::<String>()));
    }
    if args.json {
        let models = singles
            .iter()
            .zip(&args.weights)
            .map(|(e, path)| ModelEvaluation {
                weights: path.display().to_string(),
                accuracy: e.accuracy,
                loss: e.loss,
                correct: e.correct,
                count: e.count,
            })
            .collect();
        out.document(&EvalReport {
            backend: backend.kind(),
            adapter: backend.adapter(),
            data: data.path.display().to_string(),
            evaluation: &eval,
            models,
        })?;
    }
    Ok(out.finish(ExitCode::SUCCESS))
}

/// Below this top probability a prediction is flagged as low confidence.
const LOW_CONFIDENCE: f32 = 0.6;

/// Classifies every image, whatever happens to the others: an unreadable one gets an error line
/// (and an `error` field) and makes the exit status non-zero at the end; a blank one is "no digit"
/// with a warning, never a guess. With several `--weights` the probabilities are the mean of the
/// models' softmax outputs.
fn predict(args: PredictArgs) -> Result<ExitCode> {
    use lenet::image_input::{load_image, one_digit::OneDigitCheck, save::PreparedOutputs, Prepared};
    use serde_json::{json, Value};
    let models = load_models(&args.weights)?;
    // Every target is checked before any image is read.
    let saves = match &args.save_prepared {
        Some(dir) => Some(PreparedOutputs::plan(dir, &args.images)?),
        None => None,
    };
    // With --json, stdout holds only the JSON document.
    let mut out = Output::new(args.json);
    let mut records = Vec::with_capacity(args.images.len());
    let mut failed = 0usize;
    let mut saved = 0usize;
    for (index, path) in args.images.iter().enumerate() {
        // Names that are not UTF-8 are shown with their bytes escaped, so that no two print alike.
        let file = lenet::paths::display_lossless(path);
        let record = match load_image(path) {
            Err(e) => {
                let msg = e.to_string();
                let msg = match msg.strip_prefix(&format!("{}: ", path.display())) {
                    Some(rest) => format!("{file}: {rest}"),
                    None => msg,
                };
                notice(format!("error: {msg}"));
                failed += 1;
                json!({ "file": file, "digit": Value::Null, "probability": Value::Null,
                        "probabilities": Value::Null, "error": msg })
            }
            Ok(Prepared::NoInk) => {
                let warning = "no ink found: the image is blank or its marks are too faint";
                notice(format!("warning: {file}: {warning}"));
                out.line(format!("{file}: no digit"));
                json!({ "file": file, "digit": Value::Null, "probability": Value::Null,
                        "probabilities": Value::Null, "warning": warning })
            }
            Ok(Prepared::Digit { pixels, report }) => {
                let (probs, energy) = ensemble_probabilities(&models, &pixels[..])?;
                if probs.iter().any(|p| !p.is_finite()) {
                    bail!(
                        "the weights are finite but give non-finite probabilities for {file} (values \
                         too large to compute with, as a diverged run leaves them)"
                    );
                }
                let (digit, second) = top_two(&probs);
                let (p, p2) = (probs[digit], probs[second]);
                let check = OneDigitCheck::new(&pixels, &report, energy);
                let mut record = json!({ "file": file, "digit": digit, "probability": p,
                    "second_digit": second, "second_probability": p2, "probabilities": probs,
                    "one_digit": check.looks_like_one_digit(), "checks": check });
                let mut notes = Vec::new();
                let mut warnings = Vec::new();
                let mut not_one_digit = String::new();
                if p < LOW_CONFIDENCE {
                    notes.push("low confidence".to_string());
                    warnings.push(format!(
                        "low confidence: the top probability is below {:.0}%",
                        100.0 * LOW_CONFIDENCE
                    ));
                }
                if !check.looks_like_one_digit() {
                    // On the line itself, as low confidence is: no separate warning to lose.
                    not_one_digit = format!(" not like one digit: {}", check.reasons.join(", "));
                    warnings.push(format!("does not look like one digit: {}", check.reasons.join(", ")));
                }
                if !warnings.is_empty() {
                    record["warning"] = json!(warnings.join("; "));
                }
                if let Some(saves) = &saves {
                    match saves.write(index, &pixels) {
                        Ok(target) => {
                            saved += 1;
                            record["prepared"] = json!(target.display().to_string());
                        }
                        Err(e) => {
                            notice(format!("error: {e}"));
                            failed += 1;
                            record["error"] = json!(e.to_string());
                        }
                    }
                }
                let notes = notes.iter().map(|n| format!(", {n}")).collect::<String>();
                out.line(format!(
                    "{file}: {digit} ({:.1}%{notes}; next {second}, {:.1}%){not_one_digit}",
                    100.0 * p,
                    100.0 * p2
                ));
                record
            }
        };
        let mut record = record;
        if path.to_str().is_none() {
            // The name's exact bytes, for a reader that needs the file itself.
            record["file_bytes"] = json!(path.as_os_str().as_encoded_bytes());
        }
        records.push(record);
    }
    if let Some(saves) = &saves {
        notice(format!(
            "saved {} the network saw in {}",
            count_of(saved, "prepared image", "prepared images"),
            saves.dir.display()
        ));
    }
    if args.json {
        out.document(&Value::Array(records))?;
    }
    Ok(out.finish(if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }))
}

/// The most and the second most probable digits (the first of equals first).
fn top_two(probs: &[f32]) -> (usize, usize) {
    let first = lenet::train::argmax(probs);
    let second = (0..probs.len()).filter(|&d| d != first).fold(usize::MAX, |best, d| {
        if best == usize::MAX || probs[d] > probs[best] {
            d
        } else {
            best
        }
    });
    (first, second)
}

/// The probabilities of the ensemble for one image (each model's softmax, then their mean; the
/// CPU path: one image needs no GPU) and the mean of the models' energy scores.
fn ensemble_probabilities(models: &[Params], pixels: &[u8]) -> Result<(Vec<f32>, f64)> {
    let mut per_model = Vec::with_capacity(models.len());
    let mut energy = 0.0;
    for params in models {
        let logits = lenet::image_input::one_digit::logits(params, pixels)?;
        energy += lenet::image_input::one_digit::energy(&logits) / models.len() as f64;
        per_model.push(softmax_rows(&logits));
    }
    Ok((mean_probabilities(&per_model).iter().map(|&p| p as f32).collect(), energy))
}

fn bench(args: BenchArgs) -> Result<ExitCode> {
    let gpu = gpu_options(&args.device, args.kernels.as_deref())?;
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let (ctx, choice) = bench_context(args.device.backend.into(), args.device.adapter.as_deref(), gpu)?;
    if let Some(line) = choice {
        notice(line);
    }
    if let Some(why) = ctx.as_ref().and_then(|c| c.kernel_fallback()) {
        notice(format!("kernels: {why}"));
    }
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
    auto: lenet::choice::AutoChoice,
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

fn devices(args: DevicesArgs) -> Result<ExitCode> {
    let adapters = lenet::gpu::list_adapters();
    let wanted = wanted_adapter(args.adapter.as_deref());
    let auto = auto_choice(&adapters, wanted.as_deref());
    let mut out = Output::new(args.json);
    // `*` marks the adapter `auto` trains on: none when it takes the CPU path.
    let fallbacks = lenet::gpu::context::adapter_kernel_fallbacks()?;
    for (i, a) in adapters.iter().enumerate() {
        let mark = if auto.adapter == Some(i) { "*" } else { " " };
        out.line(format!("{mark} {i}: {a}"));
        // Never silent: the kernels an adapter's limits leave out, and what runs instead.
        if let Some(Some(why)) = fallbacks.get(i) {
            out.line(format!("     kernels: {why}"));
        }
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
    if args.shell == CompletionShell::Bash {
        script = bash_predict_completes_files(String::from_utf8(script)?)?.into_bytes();
    }
    let mut out = Output::new(false);
    out.product(&script);
    Ok(out.finish(ExitCode::SUCCESS))
}

/// clap's bash script offers only the options where `predict` takes its images: there it offers
/// files too (the other shells' scripts follow the arguments' `ValueHint::FilePath`).
fn bash_predict_completes_files(script: String) -> Result<String> {
    const BLOCK: &str = "        lenet__subcmd__predict)\n";
    const OPTIONS_ONLY: &str =
        "            COMPREPLY=( $(compgen -W \"${opts}\" -- \"${cur}\") )\n            return 0\n";
    const WITH_FILES: &str = "            COMPREPLY=( $(compgen -W \"${opts}\" -- \"${cur}\") $(compgen -f -- \"${cur}\") )\n            \
        if [[ \"${BASH_VERSINFO[0]}\" -ge 4 ]]; then\n                compopt -o filenames\n            fi\n            return 0\n";
    let start = script.find(BLOCK).context("clap's bash script has no predict block")?;
    let at = script[start..].find(OPTIONS_ONLY).context("clap's bash script changed shape")? + start;
    Ok(format!("{}{WITH_FILES}{}", &script[..at], &script[at + OPTIONS_ONLY.len()..]))
}

/// A subcommand's synopsis in roff, naming each option's value (`--batch B`,
/// `--backend auto|gpu|cpu`), where clap_mangen prints only `[--batch]`.
fn man_synopsis(cmd: &clap::Command, name: &str) -> String {
    let roff = |t: &str| t.replace('-', "\\-");
    let mut parts = vec![format!("\\fB{}\\fR", roff(name))];
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        let value = if arg.get_action().takes_values() {
            let values: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
                .map(|v| v.get_name().to_string())
                .collect();
            Some(if values.is_empty() {
                arg.get_value_names()
                    .and_then(|n| n.first())
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| arg.get_id().as_str().to_uppercase())
            } else {
                values.join("|")
            })
        } else {
            None
        };
        let repeated = matches!(arg.get_action(), clap::ArgAction::Append);
        let mut text = match (arg.get_long(), &value) {
            (Some(long), Some(v)) => format!("\\fB\\-\\-{}\\fR \\fI{}\\fR", roff(long), roff(v)),
            (Some(long), None) => format!("\\fB\\-\\-{}\\fR", roff(long)),
            (None, Some(v)) => format!("\\fI{}\\fR", roff(v)),
            (None, None) => continue,
        };
        if repeated {
            text.push_str("...");
        }
        if !arg.is_required_set() {
            text = format!("[{text}]");
        }
        parts.push(text);
    }
    parts.join(" ")
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
        writeln!(sections, ".SH SYNOPSIS\n{}", man_synopsis(sub, &format!("lenet {}", sub.get_name())))?;
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
LENET_DATA
the MNIST directory of train and eval when \-\-data is not given (else the user cache's
lenet\-wgpu/mnist, where \fBlenet data fetch\fR puts it, then data/mnist in the current
directory, in the source tree holding the executable, then in the one it was built from)
.TP
LENET_ADAPTER
picks a GPU adapter by part of its name, as \-\-adapter does
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
\fBlenet help\fR \fICOMMAND\fR and \fBlenet\fR \fICOMMAND\fR \fB\-\-help\fR (the same options, in
the terminal); README.md at the top of the lenet\-wgpu source tree (the repository lenet is built
from): the \-\-json fields, the \-\-metrics columns, the checkpoint format, the recipes and their
figures.
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
