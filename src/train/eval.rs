//! Scoring logits against labels: accuracy, mean loss, confusion matrix.

use crate::model::CLASSES;

/// Accuracy, mean loss and confusion matrix of a set of logits against labels.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Evaluation {
    pub accuracy: f64,
    pub loss: f64,
    pub correct: usize,
    pub count: usize,
    /// confusion[label][predicted]
    pub confusion: Vec<Vec<u32>>,
}

/// Scores logits [N, 10] against labels: prediction is the first largest logit.
pub fn evaluate_logits(logits: &[f32], labels: &[u8]) -> Evaluation {
    assert_eq!(logits.len(), labels.len() * CLASSES);
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
    Evaluation {
        accuracy: correct as f64 / count as f64,
        loss: loss / count as f64,
        correct,
        count: labels.len(),
        confusion,
    }
}

/// Index of the first largest value.
pub use crate::cpu::reference::first_argmax as argmax;
