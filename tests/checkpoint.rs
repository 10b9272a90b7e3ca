//! safetensors checkpoints: exact round trips, weights-only files, every kind of bad file, and
//! atomic writes.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::assert_file_error;
use lenet::checkpoint::{load_checkpoint, save_checkpoint, save_weights, FORMAT_TAG, META_KEYS};
use lenet::model::{param_specs, Params, TrainState};
use lenet::optim::{Adam, Optimizer, OptimizerKind, Sgd};
use safetensors::tensor::{Dtype, TensorView};

fn adam() -> Optimizer {
    Optimizer { kind: OptimizerKind::Adam(Adam { beta1: 0.85, beta2: 0.9995, eps: 1.1e-8 }), lr: 3.3e-4 }
}

fn state() -> TrainState {
    let mut s = TrainState::new(Params::init(11), adam(), 0xdead_beef_1234_5678, 64, false);
    // Adam's second moment is a running mean of squares: never negative (a file with a negative
    // one is refused on load).
    let mut v = Params::init(13);
    v.tensors.iter_mut().flatten().for_each(|x| *x = x.abs());
    s.moments = vec![Params::init(12), v];
    // Values whose bits a decimal round trip would lose if done carelessly.
    s.params.tensors[0][0] = f32::MIN_POSITIVE;
    s.params.tensors[0][1] = -0.0;
    s.params.tensors[9][9] = f32::MAX;
    s.moments[1].tensors[4][3] = 1e-45; // subnormal
    s.step = 123_456_789_012;
    s.epoch = 7;
    s.step_in_epoch = 233;
    s
}

fn bits(p: &Params) -> Vec<u32> {
    p.flatten().iter().map(|x| x.to_bits()).collect()
}

/// Tensor (name, dtype, shape, bytes) list of a full checkpoint, to build variants from.
type Raw = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn raw_tensors(with_adam: bool) -> Raw {
    let s = state();
    let mut out = Vec::new();
    let mut add = |prefix: &str, p: &Params| {
        for (t, spec) in p.tensors.iter().zip(param_specs()) {
            out.push((
                format!("{prefix}{}", spec.name),
                Dtype::F32,
                spec.shape.clone(),
                t.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
    };
    add("", &s.params);
    if with_adam {
        add("adam.m.", &s.moments[0]);
        add("adam.v.", &s.moments[1]);
    }
    out
}

fn good_meta() -> HashMap<String, String> {
    let mut m: HashMap<String, String> = META_KEYS.iter().map(|k| (k.to_string(), "1".to_string())).collect();
    m.insert("step".into(), "30".into());
    m.insert("lr".into(), "0.001".into());
    m.insert("beta1".into(), "0.9".into());
    m.insert("beta2".into(), "0.999".into());
    m.insert("eps".into(), "1e-8".into());
    m.insert("shuffle".into(), "true".into());
    m.insert("format".into(), FORMAT_TAG.into());
    m
}

fn write_raw(path: &Path, raw: &Raw, meta: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> =
        raw.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

fn dir_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.safetensors");
    let s = state();
    save_checkpoint(&path, &s).unwrap();
    let ck = load_checkpoint(&path).unwrap();
    assert_eq!(bits(&ck.params), bits(&s.params));
    let back = ck.into_train_state().expect("optimizer state");
    assert_eq!(bits(&back.moments[0]), bits(&s.moments[0]));
    assert_eq!(bits(&back.moments[1]), bits(&s.moments[1]));
    assert_eq!(
        (back.step, back.epoch, back.step_in_epoch, back.seed, back.batch, back.shuffle),
        (s.step, s.epoch, s.step_in_epoch, s.seed, s.batch, s.shuffle)
    );
    assert_eq!(back.optimizer, adam());
    assert_eq!(back, s);
    // Saving over an existing file replaces it, and leaves nothing else behind.
    let mut s2 = s.clone();
    s2.step += 1;
    s2.shuffle = true;
    s2.optimizer = Optimizer::default();
    save_checkpoint(&path, &s2).unwrap();
    let back = load_checkpoint(&path).unwrap().into_train_state().unwrap();
    assert_eq!(back, s2);
    assert_eq!(dir_entries(dir.path()), vec![path]);
}

/// SGD's momentum buffers are stored as `sgd.momentum.<name>`, with its settings.
#[test]
fn sgd_state_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sgd.safetensors");
    let opt = Optimizer {
        kind: OptimizerKind::Sgd(Sgd { momentum: 0.9, nesterov: true, weight_decay: 5e-4 }),
        lr: 0.05,
    };
    let mut s = TrainState::new(Params::init(3), opt, 1, 32, true);
    s.moments = vec![Params::init(4)];
    s.step = 99;
    save_checkpoint(&path, &s).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 2 * param_specs().len(), "the parameters and their momentum buffers");
    assert!(st.tensor("sgd.momentum.fc1.weight").is_ok());
    assert_eq!(load_checkpoint(&path).unwrap().into_train_state().unwrap(), s);
}

#[test]
fn file_is_a_pytorch_state_dict() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    save_checkpoint(&path, &state()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 3 * param_specs().len(), "the parameters and Adam's m and v");
    for spec in param_specs() {
        let t = st.tensor(&spec.name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        assert_eq!(t.shape(), spec.shape.as_slice());
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().unwrap();
    assert_eq!(meta["format"], FORMAT_TAG);
    assert_eq!(meta["step"], "123456789012");
    assert_eq!(meta["shuffle"], "false");
}

#[test]
fn weights_only_file_loads_without_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let p = Params::init(5);
    save_weights(&path, &p).unwrap();
    let ck = load_checkpoint(&path).unwrap();
    assert_eq!(ck.params, p);
    assert!(ck.state.is_none());
    // As PyTorch writes it: metadata {"format": "pt"}, or none at all.
    let pt = dir.path().join("pt.safetensors");
    write_raw(&pt, &raw_tensors(false), Some(HashMap::from([("format".into(), "pt".into())])));
    assert!(load_checkpoint(&pt).unwrap().state.is_none());
    write_raw(&pt, &raw_tensors(false), None);
    let ck = load_checkpoint(&pt).unwrap();
    assert_eq!(ck.params, state().params);
    assert!(ck.into_train_state().is_none());
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let mut raw = raw_tensors(false);
    raw.retain(|t| t.0 != "fc2.bias");
    write_raw(&path, &raw, None);
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "missing tensor fc2.bias");
    // One Adam moment missing.
    let mut raw = raw_tensors(true);
    raw.retain(|t| t.0 != "adam.v.conv2.weight");
    write_raw(&path, &raw, Some(good_meta()));
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "missing tensor adam.v.conv2.weight");
}

#[test]
fn wrong_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let mut raw = raw_tensors(false);
    // Same element count, PyTorch's transpose of fc1.
    raw[4].2 = vec![400, 120];
    write_raw(&path, &raw, None);
    assert_file_error(
        &load_checkpoint(&path).unwrap_err(),
        &path,
        "tensor fc1.weight has shape [400, 120], expected [120, 400]",
    );
}

#[test]
fn wrong_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    for (dtype, size, name) in [(Dtype::F64, 8, "F64"), (Dtype::F16, 2, "F16")] {
        let mut raw = raw_tensors(false);
        raw[1].1 = dtype;
        raw[1].3 = vec![0u8; 6 * size];
        write_raw(&path, &raw, None);
        assert_file_error(
            &load_checkpoint(&path).unwrap_err(),
            &path,
            &format!("tensor conv1.bias has dtype {name}, expected F32"),
        );
    }
}

#[test]
fn unexpected_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    for extra in ["fc4.weight", "adam.m.fc9.bias", "num_batches_tracked"] {
        let mut raw = raw_tensors(false);
        raw.push((extra.into(), Dtype::F32, vec![1], vec![0; 4]));
        write_raw(&path, &raw, None);
        assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, &format!("unexpected tensor {extra}"));
    }
}

#[test]
fn non_finite_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let mut raw = raw_tensors(false);
    raw[2].3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    write_raw(&path, &raw, None);
    assert_file_error(
        &load_checkpoint(&path).unwrap_err(),
        &path,
        "tensor conv2.weight holds a non-finite value NaN at index 2",
    );
    // Saving NaN weights is refused and leaves no file.
    let mut p = Params::init(1);
    p.tensors[3][0] = f32::INFINITY;
    let out = dir.path().join("nan.safetensors");
    assert_file_error(&save_weights(&out, &p).unwrap_err(), &out, "conv2.bias");
    assert!(!out.exists());
}

#[test]
fn bad_optimizer_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let raw = raw_tensors(true);
    let mut m = good_meta();
    m.remove("step");
    write_raw(&path, &raw, Some(m));
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "step is missing");
    write_raw(&path, &raw, None);
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "format tag missing");
    let mut m = good_meta();
    m.insert("lr".into(), "fast".into());
    write_raw(&path, &raw, Some(m));
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "lr = \"fast\"");
    let mut m = good_meta();
    m.insert("epoch".into(), "-1".into());
    write_raw(&path, &raw, Some(m));
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "epoch");
    let mut m = good_meta();
    m.insert("shuffle".into(), "yes".into());
    write_raw(&path, &raw, Some(m));
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "shuffle");
    // Settings the command line refuses are refused here too: a resumed run would train with
    // them (lr <= 0 climbs the loss; beta = 1 never updates the moments and divides by zero).
    for (key, value) in [
        ("lr", "0"),
        ("lr", "-0.001"),
        ("beta1", "1"),
        ("beta1", "-0.1"),
        ("beta2", "1.5"),
        ("eps", "0"),
        ("eps", "-1e-8"),
    ] {
        let mut m = good_meta();
        m.insert(key.into(), value.into());
        write_raw(&path, &raw, Some(m));
        let err = load_checkpoint(&path).unwrap_err();
        assert_file_error(&err, &path, &format!("{key} = "));
        assert_file_error(&err, &path, "must be");
    }
    // A position no run can reach: more epochs or steps into an epoch than steps in all.
    for (key, value) in [("epoch", "31"), ("step_in_epoch", "31")] {
        let mut m = good_meta();
        m.insert(key.into(), value.into());
        write_raw(&path, &raw, Some(m));
        assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "cannot both be reached");
    }
    // And the good metadata loads, with the edges of the ranges.
    write_raw(&path, &raw, Some(good_meta()));
    assert!(load_checkpoint(&path).unwrap().state.is_some());
    let mut m = good_meta();
    m.insert("beta1".into(), "0".into());
    write_raw(&path, &raw, Some(m));
    assert!(load_checkpoint(&path).is_ok());
}

#[test]
fn not_a_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    std::fs::write(&path, b"PK\x03\x04 this is a zip, say a torch.save pickle").unwrap();
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "not a safetensors file");
    std::fs::write(&path, b"abc").unwrap();
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "not a safetensors file");
    // Valid header length and JSON, data cut short.
    save_weights(&path, &Params::init(3)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "not a safetensors file");
}

#[test]
fn empty_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    std::fs::write(&path, b"").unwrap();
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "empty");
    let missing = dir.path().join("missing.safetensors");
    assert_file_error(&load_checkpoint(&missing).unwrap_err(), &missing, "cannot read");
    // A directory is not a checkpoint either.
    assert!(load_checkpoint(dir.path()).is_err());
}

#[test]
fn huge_data_offsets_are_an_error_not_an_overflow() {
    // Offsets near usize::MAX: refused with a clear message, never an arithmetic overflow.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let header = format!(
        r#"{{"a":{{"dtype":"U8","shape":[{}],"data_offsets":[0,{}]}}}}"#,
        usize::MAX - 4,
        usize::MAX - 4
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_file_error(&load_checkpoint(&path).unwrap_err(), &path, "not a safetensors file");
}

#[test]
fn failed_save_leaves_previous_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.safetensors");
    save_checkpoint(&path, &state()).unwrap();
    let before = std::fs::read(&path).unwrap();

    // Target directory missing.
    let missing = dir.path().join("no/such/dir/ck.safetensors");
    assert_file_error(&save_weights(&missing, &Params::init(1)).unwrap_err(), &missing, "cannot write");

    // The target path is a directory: the rename fails after the temp file was written.
    let occupied = dir.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("keep"), b"x").unwrap();
    assert_file_error(&save_weights(&occupied, &Params::init(1)).unwrap_err(), &occupied, "cannot write");

    // A target whose parent is a regular file: no temp file can be created (as root too).
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("ck.safetensors");
    assert_file_error(&save_weights(&under_file, &Params::init(2)).unwrap_err(), &under_file, "cannot write");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    assert_eq!(std::fs::read(&path).unwrap(), before);
    let mut names: Vec<_> = dir_entries(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["ck.safetensors", "occupied", "plain-file"]);
    assert_eq!(dir_entries(&occupied), vec![occupied.join("keep")]);
}

#[cfg(unix)]
#[test]
fn a_save_removes_temp_files_that_killed_saves_of_the_same_target_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.safetensors");
    // A process that has exited: its temp files are leftovers.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let dead = child.id();
    let stale = [format!(".ck.safetensors.tmp-{dead}-0"), format!(".ck.safetensors.tmp-{dead}-17")];
    // Kept: a writer that is alive (pid 1 always is), another target's temp file, and files that
    // merely look alike.
    let kept = [
        ".ck.safetensors.tmp-1-0".to_string(),
        format!(".other.safetensors.tmp-{dead}-0"),
        format!(".ck.safetensors.tmp-{dead}-x"),
        "ck.safetensors.tmp".to_string(),
        format!("ck.safetensors.tmp-{dead}-0"),
    ];
    for name in stale.iter().chain(&kept) {
        std::fs::write(dir.path().join(name), b"partial").unwrap();
    }
    save_checkpoint(&path, &state()).unwrap();
    let mut expected: Vec<PathBuf> = kept.iter().map(|n| dir.path().join(n)).chain([path.clone()]).collect();
    expected.sort();
    assert_eq!(dir_entries(dir.path()), expected);
}
