//! Classify an image with a trained checkpoint, on the CPU: the image (PNG, JPEG, PGM/PPM/PBM, any
//! size, either polarity) is brought to a 28x28 light-on-dark digit as MNIST's, then the network
//! gives each digit's probability.
//!
//!     cargo run --release --example predict -- CHECKPOINT IMAGE
//!
//! (`cargo run --release --example train` writes a checkpoint.)

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [checkpoint, image] = &args[..] else {
        eprintln!("usage: predict CHECKPOINT IMAGE");
        return ExitCode::from(2);
    };
    let params = match lenet::load_weights(checkpoint) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The same preparation as `lenet predict` (crop, scale, centre by mass).
    let pixels = match lenet::image_input::load_image(image) {
        Ok(prepared) => match prepared.pixels() {
            Some(pixels) => *pixels,
            None => {
                println!("{}: no digit (the image is blank)", image.display());
                return ExitCode::SUCCESS;
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match lenet::predict(&params, &[&pixels[..]]) {
        Ok(predictions) => {
            let p = &predictions[0];
            println!("{}: {} ({:.1}%)", image.display(), p.digit, 100.0 * p.probabilities[p.digit]);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
