//! Train LeNet-5 through the library: the device chosen in code (auto: a GPU when there is a
//! hardware one, else the CPU), a few epochs with a progress callback, an evaluation on the test
//! set, and a checkpoint.
//!
//!     cargo run --release --example train -- [DATA_DIR [STEPS [CHECKPOINT]]]
//!
//! DATA_DIR holds the four MNIST files (default: data/mnist, a clone's; `lenet data fetch` puts
//! them in the user cache). STEPS cuts the run short (CI runs a few).

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;

use lenet::{load_mnist, Device, TrainConfig, TrainEvent, Trainer, TrainerConfig};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), lenet::Error> {
    let mut args = std::env::args().skip(1);
    let data = args.next().unwrap_or_else(|| "data/mnist".into());
    let steps = args.next().map(|s| s.parse::<u64>().expect("STEPS is a whole number"));
    let checkpoint = args.next().unwrap_or_else(|| "lenet-example.safetensors".into());

    let mnist = load_mnist(data.as_ref())?;
    let mut trainer = Trainer::new(&Device::Auto, &TrainerConfig::default(), mnist)?;
    if let Some(why) = trainer.device_choice() {
        println!("{why}");
    }
    // Three epochs, or `steps` steps when given.
    let run = TrainConfig { epochs: 3, steps, ..TrainConfig::default() };
    // Set this flag from another thread (a Ctrl-C handler, a UI) to stop between steps.
    let stop = AtomicBool::new(false);
    let report = trainer.train(&run, &stop, |event| {
        if let TrainEvent::EpochEnded { line } = event {
            println!("{line}");
        }
    })?;
    let test = trainer.evaluate_test()?;
    println!(
        "{} steps in {:.1} s on {}: test accuracy {:.2}% ({}/{}), loss {:.4}",
        report.steps,
        report.train_seconds,
        trainer.device(),
        100.0 * test.accuracy,
        test.correct,
        test.count,
        test.loss
    );
    trainer.save(checkpoint.as_ref())?;
    println!("saved {checkpoint}");
    Ok(())
}
