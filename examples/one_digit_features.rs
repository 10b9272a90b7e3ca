//! The features that `lenet predict`'s "does it look like one digit" checks read, measured on
//! rendered capital letters, pairs of MNIST digits side by side, and MNIST digits themselves (as
//! they are and redrawn with a pen), printed as CSV (kind,label,blobs,aspect,energy,msp,top): what
//! the thresholds in `src/image_input/one_digit.rs` were chosen from (BENCHMARKS.md, "Does it look
//! like one digit?"). A measurement, not a test:
//!
//!     cargo run --release --example one_digit_features -- a.safetensors [b.safetensors ...]

#[path = "../tests/digit_renders/mod.rs"]
mod digit_renders;

use std::path::Path;

use digit_renders::{mnist_digit, mnist_test, render, render_letter, render_pair, Rng};
use lenet::image_input::one_digit::{energy, ink_blobs, logits};
use lenet::image_input::{decode_gray, prepare, Prepared};

/// The features of one rendered image, for the measurement below.
fn features(params: &[lenet::model::Params], png: &[u8]) -> Option<(Vec<usize>, f64, f64, f32, usize)> {
    let img = decode_gray(Path::new("x.png"), png).unwrap();
    let Prepared::Digit { pixels, report } = prepare(&img) else { return None };
    let blobs = ink_blobs(&pixels);
    let [x0, y0, x1, y1] = report.ink_box;
    let aspect = (x1 - x0) / (y1 - y0);
    let mut e = 0.0;
    let mut probs = vec![0f32; 10];
    let n = params.len();
    for params in params {
        let z = logits(params, &pixels[..]).unwrap();
        e += energy(&z) / n as f64;
        let pr = lenet::train::eval::softmax_rows(&z);
        for (a, b) in probs.iter_mut().zip(&pr) {
            *a += *b as f32 / n as f32;
        }
    }
    let top = lenet::train::argmax(&probs);
    Some((blobs, aspect, e, probs[top], top))
}

fn main() {
    let weights: Vec<String> = std::env::args().skip(1).collect();
    if weights.is_empty() {
        eprintln!("usage: one_digit_features WEIGHTS.safetensors [WEIGHTS ...]");
        std::process::exit(2);
    }
    let params: Vec<_> =
        weights.iter().map(|w| lenet::checkpoint::load_checkpoint(Path::new(w)).unwrap().params).collect();
    let mut rng = Rng::new(5);
    let mut rows = Vec::new();
    let mut push = |kind: &str, label: String, f: Option<(Vec<usize>, f64, f64, f32, usize)>| match f {
        None => rows.push(format!("{kind},{label},none")),
        Some((blobs, aspect, e, msp, top)) => rows.push(format!(
            "{kind},{label},{},{aspect:.3},{e:.3},{msp:.4},{top}",
            blobs.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(" ")
        )),
    };
    for round in 0..4 {
        for ch in 'A'..='Z' {
            let png = render_letter(ch, &mut rng);
            push("letter", format!("{ch}{round}"), features(&params, &png));
        }
    }
    for k in 0..120 {
        let (i, j) = ((k * 131 + 7) % 10_000, (k * 577 + 3000) % 10_000);
        let gap = -45 + (k % 9) as i32 * 5;
        let png = render_pair(mnist_digit(i), mnist_digit(j), gap);
        let label = format!("{}{}", mnist_test().1[i], mnist_test().1[j]);
        push("pair", label, features(&params, &png));
    }
    for k in 0..400 {
        let i = (k * 37 + 11) % 10_000;
        let style = if k % 2 == 0 { "mnist_itself" } else { "pen_on_white" };
        let png = render(style, mnist_digit(i), &mut rng);
        push(style, mnist_test().1[i].to_string(), features(&params, &png));
    }
    println!("kind,label,blobs,aspect,energy,msp,top");
    for r in rows {
        println!("{r}");
    }
}
