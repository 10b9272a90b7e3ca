//! The front API (`lenet::Trainer`, `predict`, `load_weights`, the `Error` values) as a library
//! user calls it: bad input is an error naming the values, never a panic; the stop flag the
//! caller owns stops a run; events come in order; a saved run resumes; `predict` agrees with
//! `evaluate`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use lenet::train::evaluate_logits;
use lenet::{Device, Error, Params, StopReason, TrainConfig, TrainEvent, Trainer, TrainerConfig};

fn trainer(batch: usize, validation: usize) -> Result<Trainer, Error> {
    let config = TrainerConfig { batch, validation, ..TrainerConfig::default() };
    Trainer::new(&Device::Cpu, &config, common::small_mnist(256, 100))
}

#[test]
fn bad_input_is_an_error_naming_the_values_not_a_panic() {
    let err = evaluate_logits(&[0.0; 25], &[1, 2, 3]).unwrap_err();
    assert!(matches!(err, Error::LogitsShape { logits: 25, labels: 3 }), "{err}");
    assert_eq!(err.to_string(), "25 logits for 3 labels: a LeNet-5 gives 10 logits per image");
    let err = evaluate_logits(&[0.0; 20], &[1, 10]).unwrap_err();
    assert!(matches!(err, Error::LabelOutOfRange { index: 1, label: 10 }), "{err}");
    let err: Error = Params::from_flat(&[0.0; 7]).unwrap_err().into();
    assert!(matches!(err, Error::ParamCount { got: 7, expected: 61_706 }), "{err}");
    let data = common::small_mnist(3, 1).train;
    assert_eq!(data.image(2).map(<[u8]>::len), Some(784));
    assert_eq!(data.image(3), None);
    assert_eq!(data.image(usize::MAX), None);
    let params = Params::init(0);
    let err = lenet::predict(&params, &[&[0u8; 783]]).unwrap_err();
    assert!(matches!(err, Error::ImageSize { got: 783 }), "{err}");
    assert!(matches!(trainer(0, 0).err().unwrap(), Error::BatchZero));
    let err = trainer(300, 0).err().unwrap();
    assert_eq!(err.to_string(), "a batch of 300 images is larger than the training set (256 images)");
    let err = trainer(32, 256).err().unwrap();
    assert!(matches!(err, Error::ValidationTooLarge { held: 256, images: 256 }), "{err}");
    let config = TrainerConfig { augment_shift: 28, ..TrainerConfig::default() };
    let err = Trainer::new(&Device::Cpu, &config, common::small_mnist(64, 10)).err().unwrap();
    assert!(matches!(err, Error::AugmentShift { shift: 28, max: 27 }), "{err}");
    // Early stopping needs a validation set: the loop's refusal, typed.
    let patience = TrainConfig { patience: Some(2), ..TrainConfig::default() };
    let err = trainer(32, 0).unwrap().train(&patience, &AtomicBool::new(false), |_| {}).unwrap_err();
    assert!(matches!(err, Error::NeedsValidation), "{err}");
    // The batch is checked against what validation leaves.
    let err = trainer(200, 100).err().unwrap();
    assert!(matches!(err, Error::BatchTooLarge { batch: 200, images: 156 }), "{err}");
}

#[test]
fn the_callers_stop_flag_ends_a_run_between_chunks_and_events_come_in_order() {
    let mut trainer = trainer(32, 0).unwrap();
    let stop = AtomicBool::new(false);
    let run = TrainConfig { epochs: 3, chunk_steps: Some(2), ..TrainConfig::default() };
    let mut kinds = Vec::new();
    let mut stepped = 0;
    let report = trainer
        .train(&run, &stop, |e| {
            kinds.push(match e {
                TrainEvent::Started { target_step, .. } => {
                    assert_eq!(*target_step, 24);
                    "started"
                }
                TrainEvent::Steps { rows, .. } => {
                    stepped += rows.len();
                    // Asked to stop after the first chunk's end is seen.
                    stop.store(true, Ordering::SeqCst);
                    "steps"
                }
                TrainEvent::Finished => "finished",
                _ => "other",
            })
        })
        .unwrap();
    assert_eq!(report.stop_reason, Some(StopReason::Signal));
    assert_eq!(kinds.first(), Some(&"started"));
    assert_eq!(kinds.last(), Some(&"finished"));
    // At most the two chunks in flight when the flag was set, of the 24 steps asked for.
    assert!(report.steps <= 4 && report.steps >= 2, "{} steps", report.steps);
    assert_eq!(stepped as u64, report.steps);
    assert_eq!(trainer.state().step, report.steps);
}

#[test]
fn a_saved_run_resumes_and_predict_agrees_with_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer(32, 0).unwrap();
    let run = TrainConfig { steps: Some(6), ..TrainConfig::default() };
    first.train(&run, &AtomicBool::new(false), |_| {}).unwrap();
    let path = dir.path().join("run.safetensors");
    first.save(&path).unwrap();
    let resumed = Trainer::resume(&Device::Cpu, &path, common::small_mnist(256, 100)).unwrap();
    assert_eq!(resumed.state().step, 6);
    assert_eq!(resumed.state().params, first.params().unwrap());

    // The digits predict gives, scored against the labels, are evaluate's accuracy.
    let evaluation = first.evaluate_test().unwrap();
    let test = common::small_mnist(1, 100).test;
    let images: Vec<&[u8]> = (0..test.len()).map(|i| test.image(i).unwrap()).collect();
    let params = lenet::load_weights(&path).unwrap();
    let predictions = lenet::predict(&params, &images).unwrap();
    let correct = predictions.iter().zip(&test.labels).filter(|(p, &l)| p.digit == l as usize).count();
    assert_eq!(correct, evaluation.correct);
    for p in &predictions {
        let sum: f32 = p.probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "probabilities sum to {sum}");
    }
    // A checkpoint that is not there: the checkpoint's error, as a value.
    let err =
        Trainer::resume(&Device::Cpu, &dir.path().join("missing.safetensors"), common::small_mnist(256, 10));
    assert!(matches!(err.err().unwrap(), Error::Checkpoint(_)));
}
