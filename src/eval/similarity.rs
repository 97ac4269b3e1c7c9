//! Text similarity of an answer to a reference: Levenshtein distance (in
//! characters), ROUGE-L F1 and sentence BLEU-4 (over lower-cased word
//! tokens), and the cosine of two embeddings.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// The share of `expected`'s fields that `answer` (a JSON object) has with
/// equal values (numbers by value, strings trimmed), and the names of the
/// others.
pub fn json_fields(answer: &Value, expected: &Map<String, Value>) -> (f64, Vec<String>) {
    let equal = |a: &Value, b: &Value| match (a, b) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(a), Value::String(b)) => a.trim() == b.trim(),
        _ => a == b,
    };
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(name, value)| !answer.get(name).is_some_and(|a| equal(a, value)))
        .map(|(name, _)| name.clone())
        .collect();
    let share = if expected.is_empty() {
        1.0
    } else {
        1.0 - wrong.len() as f64 / expected.len() as f64
    };
    (share, wrong)
}

/// Edit distance in Unicode scalar values.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// Lower-cased word tokens (letters and digits), as ROUGE and BLEU count.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn longest_common_subsequence(a: &[String], b: &[String]) -> usize {
    let mut previous = vec![0usize; b.len() + 1];
    let mut current = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            current[j + 1] = if x == y {
                previous[j] + 1
            } else {
                previous[j + 1].max(current[j])
            };
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// ROUGE-L F1 of `candidate` against `reference` (0 to 1).
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (words(candidate), words(reference));
    if c.is_empty() || r.is_empty() {
        return f64::from(u8::from(c.is_empty() && r.is_empty()));
    }
    let lcs = longest_common_subsequence(&c, &r) as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (precision, recall) = (lcs / c.len() as f64, lcs / r.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for gram in tokens.windows(n) {
        *counts.entry(gram).or_insert(0) += 1;
    }
    counts
}

/// Sentence BLEU-4 with uniform weights, the brevity penalty, and
/// add-one smoothing of the higher n-gram precisions (Lin and Och's
/// smoothing 1 for n > 1), so that a short answer is not scored 0 for
/// lacking a 4-gram.
pub fn bleu(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (words(candidate), words(reference));
    if c.is_empty() || r.is_empty() {
        return 0.0;
    }
    let mut log_sum = 0.0;
    for n in 1..=4 {
        let candidate_grams = ngram_counts(&c, n);
        let reference_grams = ngram_counts(&r, n);
        let total: usize = candidate_grams.values().sum();
        let matched: usize = candidate_grams
            .iter()
            .map(|(gram, count)| (*count).min(reference_grams.get(gram).copied().unwrap_or(0)))
            .sum();
        let precision = if n == 1 {
            if matched == 0 {
                return 0.0;
            }
            matched as f64 / total as f64
        } else {
            (matched as f64 + 1.0) / (total as f64 + 1.0)
        };
        log_sum += precision.ln() / 4.0;
    }
    let brevity = if c.len() >= r.len() {
        1.0
    } else {
        (1.0 - r.len() as f64 / c.len() as f64).exp()
    };
    brevity * log_sum.exp()
}

/// The cosine of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let denominator = norm(a) * norm(b);
    if denominator == 0.0 {
        0.0
    } else {
        dot / denominator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("héllo", "hello"), 1);
        assert_eq!(levenshtein("same", "same"), 0);
    }

    #[test]
    fn rouge_l_matches_a_hand_count() {
        // LCS of "the cat sat on the mat" and "the cat is on the mat" is 5.
        let score = rouge_l("the cat sat on the mat", "The cat is on the mat.");
        let (p, r) = (5.0 / 6.0, 5.0 / 6.0);
        assert!((score - 2.0 * p * r / (p + r)).abs() < 1e-12);
        assert_eq!(rouge_l("alpha", "beta"), 0.0);
        assert_eq!(rouge_l("Same words", "same WORDS"), 1.0);
    }

    #[test]
    fn bleu_is_one_for_the_reference_and_falls_with_changes() {
        let reference = "a red tulip bulb that flowers in early spring";
        assert!((bleu(reference, reference) - 1.0).abs() < 1e-12);
        let close = bleu("a red tulip bulb that flowers in spring", reference);
        let far = bleu("watering can made of steel", reference);
        assert!(close > 0.5 && close < 1.0, "{close}");
        assert_eq!(far, 0.0);
    }

    #[test]
    fn json_fields_counts_equal_fields() {
        let expected = serde_json::json!({"brand": "Acme", "price": 12.5, "city": "Lyon"});
        let expected = expected.as_object().unwrap();
        let answer =
            serde_json::json!({"brand": " Acme ", "price": 12.50, "city": "Paris", "extra": 1});
        let (share, wrong) = json_fields(&answer, expected);
        assert!((share - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(wrong, ["city"]);
        assert_eq!(json_fields(&serde_json::json!("text"), expected).0, 0.0);
        assert_eq!(
            json_fields(&serde_json::json!({"price": "12.5"}), expected).0,
            0.0
        );
    }

    #[test]
    fn cosine_of_vectors() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
