//! safetensors checkpoints in PyTorch's `state_dict` layout.
//!
//! The ten model tensors are f32 little-endian under their `state_dict` names (`conv1.weight`,
//! ...), so `model.load_state_dict(safetensors.torch.load_file(f))` reads them. The optimizer's
//! state, for `--resume`, lives in the same file as `<optimizer>.<state>.<name>` (the names
//! [`crate::optim`]'s descriptors give: `adam.m.<name>`, `sgd.momentum.<name>`,
//! `rmsprop.square_avg.<name>`, ...), and the step count, epoch position,
//! seed, batch, shuffle flag and the optimizer's settings in the file's string metadata (files
//! written before SGD existed have no `optimizer` key: they are Adam). The second round's options
//! add keys only where they are used (`lr_schedule` and `schedule_steps`, `augment_shift`,
//! `validation` and the validation record: `best_val_loss`, `evals_since_best_val_loss`,
//! `best_val_accuracy`, `best_val_step`, and `best_val_file`, where `--save-best` wrote it); a
//! file without them has the contract's recipe. A run that measures its time ([`RunClock`]) keeps
//! `train_seconds` and `run_seconds`. A file with only the ten model tensors is valid (no
//! optimiser state). A state no run reaches (a non-finite value anywhere, a negative second
//! moment) is refused on load, naming the tensor ([`check_state_tensor`], the same check the
//! training loop's backends run after each chunk).
//!
//! Writes are atomic ([`write_atomic`]): a temp file in the target's directory is written and
//! fsynced, then renamed over the target, then the directory is fsynced. A failed save leaves an
//! existing file as it was. A target that is a symbolic link is written through: the link stays,
//! its file is replaced.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::augment::MAX_AUGMENT_SHIFT;
use crate::files::{open_input, write_atomic};
use crate::model::{param_specs, EpochSums, Params, RunClock, TrainState, ValidationRecord};
use crate::optim::Optimizer;
use crate::schedule::LrSchedule;

/// The value of the `format` metadata key in files this crate writes.
pub const FORMAT_TAG: &str = "lenet-wgpu-checkpoint-v1";
/// Metadata keys of the run's position (the optimizer adds its own, see [`Optimizer::metadata`]).
pub const META_KEYS: [&str; 6] = ["step", "epoch", "step_in_epoch", "seed", "batch", "shuffle"];
/// A LeNet-5 checkpoint with its optimiser state is about 740 KB; anything far larger is not one,
/// and is refused before it is read into memory.
pub const MAX_CHECKPOINT_BYTES: u64 = 64 << 20;

/// A tensor ready to serialise: name, shape, little-endian f32 bytes.
type NamedTensor = (String, Vec<usize>, Vec<u8>);

/// The state buffer names of every optimizer: a tensor `<one of these>.<parameter>` is optimizer
/// state.
fn state_prefixes() -> Vec<String> {
    crate::optim::all_state_names()
}

/// What a checkpoint file holds: the weights, and the whole training state if it was saved.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub params: Params,
    /// The run to resume: parameters (the same as `params`), optimizer state and position.
    pub state: Option<TrainState>,
}

impl Checkpoint {
    /// The training state to resume from, if the file has one.
    pub fn into_train_state(self) -> Option<TrainState> {
        self.state
    }
}

/// What can go wrong reading or writing a checkpoint. Each message is one line that starts with
/// the file's path.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: cannot read checkpoint: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: cannot write checkpoint: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}: checkpoint file is empty", path.display())]
    Empty { path: PathBuf },
    #[error("{}: {size} bytes is far too large for a LeNet-5 checkpoint", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{}: not a safetensors file: {reason}", path.display())]
    NotSafetensors { path: PathBuf, reason: String },
    #[error("{}: missing tensor {name}", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor {name} has shape {found:?}, expected {expected:?}", path.display())]
    WrongShape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{}: tensor {name} has dtype {found}, expected F32", path.display())]
    WrongDtype { path: PathBuf, name: String, found: String },
    #[error("{}: unexpected tensor {name} (not a LeNet-5 parameter or optimizer state)", path.display())]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{}: tensor {name} holds a non-finite value {value} at index {index}", path.display())]
    NonFinite { path: PathBuf, name: String, index: usize, value: f32 },
    #[error("{}: {fault}; no run reaches such a state", path.display())]
    ImpossibleState { path: PathBuf, fault: StateFault },
    #[error("{}: bad optimiser metadata: {reason}", path.display())]
    BadMetadata { path: PathBuf, reason: String },
}

/// Saves the weights, the optimizer's state and the run's position, atomically.
pub fn save_checkpoint(path: &Path, state: &TrainState) -> Result<(), CheckpointError> {
    let mut tensors = named_tensors(path, "", &state.params)?;
    for (name, moment) in state.optimizer.state_names().iter().zip(&state.moments) {
        tensors.extend(named_tensors(path, &format!("{name}."), moment)?);
    }
    let mut meta: HashMap<String, String> = [
        ("format", FORMAT_TAG.to_string()),
        ("step", state.step.to_string()),
        ("epoch", state.epoch.to_string()),
        ("step_in_epoch", state.step_in_epoch.to_string()),
        ("seed", state.seed.to_string()),
        ("batch", state.batch.to_string()),
        ("shuffle", state.shuffle.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    meta.extend(state.optimizer.metadata().into_iter().map(|(k, v)| (k.to_string(), v)));
    meta.extend(recipe_metadata(state).into_iter().map(|(k, v)| (k.to_string(), v)));
    meta.extend(run_notes_metadata(state).into_iter().map(|(k, v)| (k.to_string(), v)));
    write_tensors(path, tensors, meta)
}

/// The metadata of the second round's options: each key only where its option is used, so a run
/// with the contract's recipe writes the same file as before they existed, and files from before
/// read back with the defaults. f64 values are written as Rust prints them: the shortest decimal
/// that parses back to the same bits.
fn recipe_metadata(state: &TrainState) -> Vec<(&'static str, String)> {
    let mut meta = Vec::new();
    if state.schedule != LrSchedule::Constant {
        meta.push(("lr_schedule", state.schedule.name().to_string()));
        meta.push(("schedule_steps", state.schedule_steps.to_string()));
    }
    if state.augment_shift > 0 {
        meta.push(("augment_shift", state.augment_shift.to_string()));
    }
    if state.validation > 0 {
        let r = &state.record;
        meta.push(("validation", state.validation.to_string()));
        meta.push(("evals_since_best_val_loss", r.evals_since_best_loss.to_string()));
        if let Some(loss) = r.best_loss {
            meta.push(("best_val_loss", loss.to_string()));
        }
        if let Some((accuracy, step)) = r.best_accuracy {
            meta.push(("best_val_accuracy", accuracy.to_string()));
            meta.push(("best_val_step", step.to_string()));
        }
        if let Some(step) = r.best_loss_step {
            meta.push(("best_val_loss_step", step.to_string()));
        }
        meta.push(("evals_since_best_val_accuracy", r.evals_since_best_accuracy.to_string()));
    }
    meta
}

/// The run's clock and where its best checkpoint went, each only when the run has it:
/// `train_seconds` and `run_seconds` ([`RunClock`]), `best_val_file`.
fn run_notes_metadata(state: &TrainState) -> Vec<(&'static str, String)> {
    let mut meta = Vec::new();
    if let Some(clock) = state.clock {
        meta.push(("train_seconds", clock.train_seconds.to_string()));
        meta.push(("run_seconds", clock.run_seconds.to_string()));
    }
    if let Some(file) = &state.best_file {
        meta.push(("best_val_file", file.clone()));
    }
    // Only inside an epoch, so a checkpoint at an epoch's end is what it always was.
    if let (true, Some(sums)) = (state.step_in_epoch > 0, state.epoch_sums) {
        meta.push(("epoch_loss_sum", sums.loss_sum.to_string()));
        meta.push(("epoch_correct", sums.correct.to_string()));
    }
    meta
}

/// The epoch's sums of a checkpoint taken `step_in_epoch` steps into an epoch of `batch` images
/// a step: both keys or neither, a finite loss sum >= 0, at most every image correct.
fn read_epoch_sums(
    meta: &HashMap<String, String>,
    step_in_epoch: u64,
    batch: usize,
) -> Result<Option<EpochSums>, String> {
    match (meta.get("epoch_loss_sum"), meta.get("epoch_correct")) {
        (None, None) => Ok(None),
        (Some(loss), Some(correct)) => {
            let loss_sum = non_negative("epoch_loss_sum", loss, "")?;
            let images = step_in_epoch.saturating_mul(batch as u64);
            let correct = correct.parse::<u64>().ok().filter(|&c| c <= images).ok_or_else(|| {
                format!("epoch_correct = {correct:?} is not a count of at most {images} images")
            })?;
            Ok((step_in_epoch > 0).then_some(EpochSums { loss_sum, correct }))
        }
        _ => Err("epoch_loss_sum and epoch_correct must be given together".into()),
    }
}

/// The metadata value `v` of `key` as a finite number >= 0 (`unit`: " of seconds" or "", for the
/// message).
fn non_negative(key: &str, v: &str, unit: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{key} = {v:?} is not a finite number{unit} >= 0")),
    }
}

/// The inverse of [`run_notes_metadata`].
fn read_run_notes(meta: &HashMap<String, String>) -> Result<(Option<RunClock>, Option<String>), String> {
    let seconds = |key: &str| meta.get(key).map(|v| non_negative(key, v, " of seconds")).transpose();
    let clock = match (seconds("train_seconds")?, seconds("run_seconds")?) {
        (Some(train_seconds), Some(run_seconds)) => Some(RunClock { train_seconds, run_seconds }),
        (None, None) => None,
        _ => return Err("train_seconds and run_seconds must be given together".into()),
    };
    Ok((clock, meta.get("best_val_file").cloned()))
}

/// The inverse of [`recipe_metadata`], with the bounds the command line puts on each value.
fn read_recipe_metadata(
    meta: &HashMap<String, String>,
    step: u64,
) -> Result<(LrSchedule, u64, u32, usize, ValidationRecord), String> {
    let int = |key: &str| -> Result<Option<u64>, String> {
        meta.get(key)
            .map(|v| v.parse::<u64>().map_err(|_| format!("{key} = {v:?} is not a non-negative integer")))
            .transpose()
    };
    let float = |key: &str| meta.get(key).map(|v| non_negative(key, v, "")).transpose();
    let schedule = match meta.get("lr_schedule") {
        None => LrSchedule::Constant,
        Some(name) => name.parse::<LrSchedule>().map_err(|e| e.to_string())?,
    };
    let schedule_steps = int("schedule_steps")?.unwrap_or(0);
    if schedule != LrSchedule::Constant && schedule_steps < step {
        return Err(format!(
            "step {step} is past the end of its {schedule} schedule of {schedule_steps} steps"
        ));
    }
    let augment_shift = match int("augment_shift")?.unwrap_or(0) {
        p if p <= MAX_AUGMENT_SHIFT as u64 => p as u32,
        p => return Err(format!("augment_shift = {p} is above {MAX_AUGMENT_SHIFT}")),
    };
    let validation =
        usize::try_from(int("validation")?.unwrap_or(0)).map_err(|_| "validation is too large")?;
    let best_accuracy =
        match (float("best_val_accuracy")?, int("best_val_step")?) {
            (Some(a), Some(s)) if a <= 1.0 && s <= step => Some((a, s)),
            (None, None) => None,
            _ => return Err(
                "best_val_accuracy and best_val_step must be given together, within 0..1 and the steps taken"
                    .into(),
            ),
        };
    let best_loss_step = match int("best_val_loss_step")? {
        Some(s) if s > step => {
            return Err(format!("best_val_loss_step = {s} is past the steps taken ({step})"))
        }
        s => s,
    };
    let record = ValidationRecord {
        best_loss: float("best_val_loss")?,
        evals_since_best_loss: int("evals_since_best_val_loss")?.unwrap_or(0),
        best_accuracy,
        best_loss_step,
        evals_since_best_accuracy: int("evals_since_best_val_accuracy")?.unwrap_or(0),
    };
    Ok((schedule, schedule_steps, augment_shift, validation, record))
}

/// Saves only the ten model tensors (a valid `--init` / `eval` input), atomically.
pub fn save_weights(path: &Path, params: &Params) -> Result<(), CheckpointError> {
    let tensors = named_tensors(path, "", params)?;
    let meta = HashMap::from([("format".to_string(), FORMAT_TAG.to_string())]);
    write_tensors(path, tensors, meta)
}

/// Loads a checkpoint: the ten model tensors, and the optimiser state if the file has any
/// `adam.*` tensor (then all twenty moments and the metadata must be there and valid).
///
/// A FIFO, a pipe (`--weights <(...)`) or a device is read as a stream with the same size bound;
/// opening never blocks, so a FIFO nobody writes to reads as empty instead of hanging.
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let read_err = |source| CheckpointError::Read { path: path.to_owned(), source };
    let input = open_input(path).map_err(read_err)?;
    if let Some(size) = input.len {
        if size == 0 {
            return Err(CheckpointError::Empty { path: path.to_owned() });
        }
        if size > MAX_CHECKPOINT_BYTES {
            return Err(CheckpointError::TooLarge { path: path.to_owned(), size });
        }
    }
    // A stream's length is known only once it is read: reserve a checkpoint's worth, and read one
    // byte past the bound to tell "at the bound" from "over it".
    let reserve = input.len.unwrap_or(1 << 20).min(MAX_CHECKPOINT_BYTES);
    let mut bytes = Vec::with_capacity(reserve as usize);
    input.file.take(MAX_CHECKPOINT_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_CHECKPOINT_BYTES {
        return Err(CheckpointError::TooLarge { path: path.to_owned(), size: bytes.len() as u64 });
    }
    parse_checkpoint(path, &bytes)
}

/// Parses checkpoint bytes; `path` only names the source in errors.
pub fn parse_checkpoint(path: &Path, bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    if bytes.is_empty() {
        return Err(CheckpointError::Empty { path: path.to_owned() });
    }
    precheck_offsets(bytes)
        .map_err(|reason| CheckpointError::NotSafetensors { path: path.to_owned(), reason })?;
    let not_st = |e: safetensors::SafeTensorError| CheckpointError::NotSafetensors {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(not_st)?;
    let st = SafeTensors::deserialize(bytes).map_err(not_st)?;

    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let prefixes = state_prefixes();
    let mut has_state = false;
    for name in &names {
        let is_param = |n: &str| param_specs().iter().any(|s| s.name == n);
        let state_of = prefixes.iter().find_map(|p| name.strip_prefix(p).and_then(|r| r.strip_prefix('.')));
        let known = match state_of {
            Some(base) => {
                has_state = true;
                is_param(base)
            }
            None => is_param(name),
        };
        if !known {
            return Err(CheckpointError::UnexpectedTensor { path: path.to_owned(), name: name.to_string() });
        }
    }

    let params = read_params(path, &st, "")?;
    if !has_state {
        return Ok(Checkpoint { params, state: None });
    }
    let empty = HashMap::new();
    let meta = header.metadata().as_ref().unwrap_or(&empty);
    let bad = |reason: String| CheckpointError::BadMetadata { path: path.to_owned(), reason };
    match meta.get("format") {
        Some(f) if f == FORMAT_TAG => {}
        Some(f) => return Err(bad(format!("format is {f:?}, expected {FORMAT_TAG:?}"))),
        None => return Err(bad(format!("format tag missing (expected {FORMAT_TAG:?})"))),
    }
    let get = |key: &str| -> Result<&String, CheckpointError> {
        meta.get(key).ok_or_else(|| bad(format!("optimizer state is present but {key} is missing")))
    };
    let int = |key: &str| -> Result<u64, CheckpointError> {
        let v = get(key)?;
        v.parse::<u64>().map_err(|_| bad(format!("{key} = {v:?} is not a non-negative integer")))
    };
    let shuffle = match get("shuffle")?.as_str() {
        "true" => true,
        "false" => false,
        v => return Err(bad(format!("shuffle = {v:?} is not true or false"))),
    };
    let batch = int("batch")?;
    if batch == 0 {
        return Err(bad("batch = \"0\" must be positive".into()));
    }
    let batch = usize::try_from(batch).map_err(|_| bad(format!("batch = {batch} is too large")))?;
    let (step, epoch, step_in_epoch) = (int("step")?, int("epoch")?, int("step_in_epoch")?);
    // Every epoch takes at least one step, and the steps inside one are steps too.
    if epoch as u128 + step_in_epoch as u128 > step as u128 {
        return Err(bad(format!(
            "epoch {epoch} and step_in_epoch {step_in_epoch} cannot both be reached in {step} steps"
        )));
    }
    // The same bounds the command line puts on these settings.
    let optimizer = Optimizer::from_metadata(&|k| meta.get(k).cloned()).map_err(|e| bad(format!("{e:#}")))?;
    let moments = optimizer
        .state_names()
        .iter()
        .map(|name| read_params(path, &st, &format!("{name}.")))
        .collect::<Result<Vec<_>, _>>()?;
    // Finite values were checked as they were read; what the optimizer cannot produce (a negative
    // second moment) is refused here, before a resumed run turns it into a NaN many steps later.
    let buffers: Vec<&Params> = std::iter::once(&params).chain(&moments).collect();
    check_state(&state_rules(&optimizer), &buffers)
        .map_err(|fault| CheckpointError::ImpossibleState { path: path.to_owned(), fault })?;
    let (schedule, schedule_steps, augment_shift, validation, record) =
        read_recipe_metadata(meta, step).map_err(bad)?;
    let (clock, best_file) = read_run_notes(meta).map_err(bad)?;
    let epoch_sums = read_epoch_sums(meta, step_in_epoch, batch).map_err(bad)?;
    let state = TrainState {
        params: params.clone(),
        optimizer,
        moments,
        step,
        epoch,
        step_in_epoch,
        seed: int("seed")?,
        batch,
        shuffle,
        schedule,
        schedule_steps,
        augment_shift,
        validation,
        record,
        clock,
        best_file,
        epoch_sums,
    };
    Ok(Checkpoint { params, state: Some(state) })
}

/// Checks that the header fits in the file and every tensor's data offsets lie inside it before
/// the safetensors crate sees the bytes: a clearer message than its generic offset errors, and
/// no reliance on its arithmetic staying overflow-free for hostile offsets.
fn precheck_offsets(bytes: &[u8]) -> Result<(), String> {
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(format!("{} bytes is shorter than the 8-byte header length", bytes.len()));
    };
    let n = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if n > (bytes.len() - 8) as u64 {
        return Err(format!("header length {n} runs past the end of the {}-byte file", bytes.len()));
    }
    let header = &bytes[8..8 + n as usize];
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(header) else {
        return Err("header is not valid JSON".into());
    };
    let Some(map) = json.as_object() else {
        return Err("header is not a JSON object".into());
    };
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info.get("data_offsets").and_then(|o| o.as_array());
        if let Some(offsets) = offsets {
            for o in offsets {
                if o.as_u64().is_some_and(|o| o > bytes.len() as u64) {
                    return Err(format!("tensor {name} has data offsets past the end of the file"));
                }
            }
        }
    }
    Ok(())
}

fn read_params(path: &Path, st: &SafeTensors<'_>, prefix: &str) -> Result<Params, CheckpointError> {
    let mut params = Params::zeros();
    for (tensor, spec) in params.tensors.iter_mut().zip(param_specs()) {
        let name = format!("{prefix}{}", spec.name);
        let view = st
            .tensor(&name)
            .map_err(|_| CheckpointError::MissingTensor { path: path.to_owned(), name: name.clone() })?;
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::WrongDtype {
                path: path.to_owned(),
                name,
                found: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != spec.shape.as_slice() {
            return Err(CheckpointError::WrongShape {
                path: path.to_owned(),
                name,
                expected: spec.shape.clone(),
                found: view.shape().to_vec(),
            });
        }
        // safetensors has checked that the data is exactly shape x 4 bytes.
        for (x, b) in tensor.iter_mut().zip(view.data().chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        check_finite(path, name, tensor)?;
    }
    Ok(params)
}

/// A value a run's state can never hold: the tensor, the first bad element and why it is bad.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("tensor {tensor} holds {value} at index {index}, {}", if *.negative { "below 0 (it can only be >= 0)" } else { "not a finite number" })]
pub struct StateFault {
    pub tensor: String,
    pub index: usize,
    pub value: f32,
    /// Negative where only values >= 0 can arise (else: NaN or infinite).
    pub negative: bool,
}

/// Checks one tensor of a run's state: every value finite, and, where the optimizer can only
/// produce values >= 0 (Adam's second moment, a running mean of squares), none below 0. One
/// check for a checkpoint being loaded and for the state after each chunk of training steps.
pub fn check_state_tensor(
    tensor: &str,
    values: &[f32],
    must_be_non_negative: bool,
) -> Result<(), StateFault> {
    let bad = values.iter().position(|&x| !x.is_finite() || (must_be_non_negative && x < 0.0));
    match bad {
        None => Ok(()),
        Some(index) => {
            let value = values[index];
            Err(StateFault { tensor: tensor.to_string(), index, value, negative: value.is_finite() })
        }
    }
}

/// The parameters and optimizer state of `state` laid out for [`check_state`]: each buffer's
/// name prefix ("" for the parameters) and whether its values must be >= 0 (the optimizer's
/// descriptor says which of its states are: Adam's `v`, RMSprop's `square_avg`, ...).
pub fn state_rules(optimizer: &Optimizer) -> Vec<(String, bool)> {
    let states = &optimizer.descriptor().states;
    std::iter::once((String::new(), false))
        .chain(
            optimizer.state_names().iter().zip(states.iter()).map(|(n, s)| (format!("{n}."), s.non_negative)),
        )
        .collect()
}

/// Checks the parameters and each optimizer state buffer (`buffers[k]` under `rules[k]`, see
/// [`state_rules`]), naming the first bad tensor.
pub fn check_state(rules: &[(String, bool)], buffers: &[&Params]) -> Result<(), StateFault> {
    for k in state_check_order(rules.len()) {
        let (prefix, non_negative) = &rules[k];
        for (values, spec) in buffers[k].tensors.iter().zip(param_specs()) {
            check_state_tensor(&format!("{prefix}{}", spec.name), values, *non_negative)?;
        }
    }
    Ok(())
}

/// The order the buffers of [`state_rules`] are checked in: the optimizer's state first, then
/// the parameters. A bad state value (the cause) spoils the parameters at the same step (the
/// effect); the message names the cause.
pub fn state_check_order(buffers: usize) -> impl Iterator<Item = usize> {
    (1..buffers).chain((buffers > 0).then_some(0))
}

/// A tensor with a NaN or an infinity is refused, naming its first one.
fn check_finite(path: &Path, name: String, tensor: &[f32]) -> Result<(), CheckpointError> {
    match tensor.iter().position(|x| !x.is_finite()) {
        Some(index) => {
            Err(CheckpointError::NonFinite { path: path.to_owned(), name, index, value: tensor[index] })
        }
        None => Ok(()),
    }
}

/// (name, shape, little-endian bytes) of each tensor of `params`; refuses non-finite values, so a
/// diverged run never overwrites a good checkpoint.
fn named_tensors(path: &Path, prefix: &str, params: &Params) -> Result<Vec<NamedTensor>, CheckpointError> {
    let mut out = Vec::with_capacity(param_specs().len());
    for (tensor, spec) in params.tensors.iter().zip(param_specs()) {
        let name = format!("{prefix}{}", spec.name);
        assert_eq!(tensor.len(), spec.len(), "{name} has the wrong length");
        check_finite(path, name.clone(), tensor)?;
        let bytes = tensor.iter().flat_map(|x| x.to_le_bytes()).collect();
        out.push((name, spec.shape.clone(), bytes));
    }
    Ok(out)
}

fn write_tensors(
    path: &Path,
    tensors: Vec<NamedTensor>,
    meta: HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let write_err = |source| CheckpointError::Write { path: path.to_owned(), source };
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| write_err(io::Error::other(e.to_string())))?;
    let mut bytes =
        safetensors::serialize(views, Some(meta)).map_err(|e| write_err(io::Error::other(e.to_string())))?;
    sort_metadata(&mut bytes).map_err(write_err)?;
    write_atomic(path, &bytes).map_err(write_err)
}

/// safetensors writes the metadata map in HashMap order, which changes from run to run. Rewrite
/// the header with the metadata keys sorted (same length, so no offset moves) so that the same
/// state always gives the same bytes.
fn sort_metadata(bytes: &mut [u8]) -> io::Result<()> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = &mut bytes[8..8 + header_len];
    let mut json: serde_json::Value = serde_json::from_slice(header).map_err(io::Error::other)?;
    if let Some(meta) = json.get_mut("__metadata__") {
        let sorted: std::collections::BTreeMap<String, serde_json::Value> =
            meta.as_object().cloned().unwrap_or_default().into_iter().collect();
        *meta = serde_json::to_value(sorted).map_err(io::Error::other)?;
    }
    let mut text = serde_json::to_vec(&json).map_err(io::Error::other)?;
    if text.len() > header_len {
        return Err(io::Error::other("re-encoded safetensors header grew"));
    }
    text.resize(header_len, b' ');
    header.copy_from_slice(&text);
    Ok(())
}
