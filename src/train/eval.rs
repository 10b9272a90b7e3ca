//! Scoring logits against labels: accuracy, mean loss, confusion matrix.

use crate::model::CLASSES;

/// Accuracy, mean loss and confusion matrix of a set of logits against labels.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Evaluation {
    pub accuracy: f64,
    pub loss: f64,
    pub correct: usize,
    pub count: usize,
    /// confusion\[label\]\[predicted\]
    pub confusion: Vec<Vec<u32>>,
}

/// Scores logits [N, 10] against labels: prediction is the first largest logit. Logits that are
/// not ten per label, or a label outside 0-9, are an error.
pub fn evaluate_logits(logits: &[f32], labels: &[u8]) -> Result<Evaluation, crate::error::Error> {
    if Some(logits.len()) != labels.len().checked_mul(CLASSES) {
        return Err(crate::error::Error::LogitsShape { logits: logits.len(), labels: labels.len() });
    }
    if let Some((index, &label)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= CLASSES) {
        return Err(crate::error::Error::LabelOutOfRange { index, label });
    }
    let mut confusion = vec![vec![0u32; CLASSES]; CLASSES];
    let mut loss = 0.0f64;
    for (row, &label) in logits.chunks_exact(CLASSES).zip(labels) {
        let predicted = argmax(row);
        confusion[label as usize][predicted] += 1;
        let max = row[predicted] as f64;
        let sum: f64 = row.iter().map(|&z| (z as f64 - max).exp()).sum();
        loss += sum.ln() - (row[label as usize] as f64 - max);
    }
    let correct = (0..CLASSES).map(|c| confusion[c][c] as usize).sum();
    let count = labels.len().max(1);
    Ok(Evaluation {
        accuracy: correct as f64 / count as f64,
        loss: loss / count as f64,
        correct,
        count: labels.len(),
        confusion,
    })
}

/// Index of the first largest value.
pub use crate::cpu::reference::first_argmax as argmax;

/// Softmax of each row of logits [N, 10], in f64 (shifted by the row's largest logit, so no row
/// overflows): the probabilities one model gives.
pub fn softmax_rows(logits: &[f32]) -> Vec<f64> {
    assert_eq!(logits.len() % CLASSES, 0);
    let mut probs = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(CLASSES) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
        let exps: Vec<f64> = row.iter().map(|&z| (z as f64 - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        probs.extend(exps.iter().map(|e| e / sum));
    }
    probs
}

/// An ensemble's probabilities [N, 10]: for each image and digit, the mean over the models of
/// that model's probability (each model's softmax first, then the mean: not the mean of logits).
pub fn mean_probabilities(models: &[Vec<f64>]) -> Vec<f64> {
    assert!(!models.is_empty(), "an ensemble needs at least one model");
    let len = models[0].len();
    assert!(models.iter().all(|m| m.len() == len), "every model scores the same images");
    let mut mean = vec![0.0f64; len];
    for model in models {
        for (m, &p) in mean.iter_mut().zip(model) {
            *m += p;
        }
    }
    let n = models.len() as f64;
    mean.iter_mut().for_each(|m| *m /= n);
    mean
}

/// Scores probabilities [N, 10] (an ensemble's) against labels: the prediction is the first
/// largest probability, the loss the mean of -ln p(label) (a probability that underflowed to 0
/// counts as the smallest normal f64, so the loss stays finite: at most 708 per image).
pub fn evaluate_probabilities(probs: &[f64], labels: &[u8]) -> Evaluation {
    assert_eq!(probs.len(), labels.len() * CLASSES);
    let mut confusion = vec![vec![0u32; CLASSES]; CLASSES];
    let mut loss = 0.0f64;
    for (row, &label) in probs.chunks_exact(CLASSES).zip(labels) {
        let predicted = (0..CLASSES).fold(0, |best, c| if row[c] > row[best] { c } else { best });
        confusion[label as usize][predicted] += 1;
        loss -= row[label as usize].max(f64::MIN_POSITIVE).ln();
    }
    let correct = (0..CLASSES).map(|c| confusion[c][c] as usize).sum();
    let count = labels.len().max(1);
    Evaluation {
        accuracy: correct as f64 / count as f64,
        loss: loss / count as f64,
        correct,
        count: labels.len(),
        confusion,
    }
}
