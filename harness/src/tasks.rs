//! Built-in tasks with exact gold rewards, generated deterministically from a seed. Every
//! prompt belongs to the training or the held-out side by a fixed hash of its text, so the two
//! never overlap whatever the seeds and sizes.
//!
//! - `sort`: `sort 52813:` -> `12358`
//! - `reverse`: `reverse abcde:` -> `edcba`
//! - `add`: `add 47+38:` -> `85`
//! - `sentiment`: `review the soup:` -> words; reward = positive minus negative words, plus 1
//!   for ending with EOS.
//!
//! For the first three the gold reward is the fraction of positions that match the answer
//! (1 for an exact answer), over the longer of answer and response.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{PrefExample, SftExample};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Sort,
    Reverse,
    Add,
    Sentiment,
}

const POSITIVE: &[&str] = &["good", "great", "fine", "lovely", "happy", "tasty", "nice", "superb", "fresh", "warm"];
const NEGATIVE: &[&str] = &["bad", "awful", "poor", "sad", "bland", "cold", "stale", "rude", "dull", "worse"];
const NEUTRAL: &[&str] = &["the", "food", "was", "and", "very", "it", "service", "room", "quite", "place"];
const TOPICS: &[&str] = &[
    "soup", "hotel", "film", "book", "cafe", "train", "park", "show", "bread", "game", "song", "bike", "tea", "shop", "museum", "phone",
    "beach", "pizza", "class", "concert",
];

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// Whether a prompt is on the held-out side (one in five, by text).
pub fn is_heldout(prompt: &str) -> bool {
    fnv(prompt) % 5 == 0
}

fn digits(rng: &mut ChaCha8Rng, n: usize) -> String {
    (0..n).map(|_| char::from(b'0' + rng.gen_range(0..10u8))).collect()
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Sort => "sort",
            Task::Reverse => "reverse",
            Task::Add => "add",
            Task::Sentiment => "sentiment",
        }
    }

    fn sample_prompt(self, rng: &mut ChaCha8Rng) -> String {
        match self {
            Task::Sort => {
                let n = rng.gen_range(3..=6);
                format!("sort {}:", digits(rng, n))
            }
            Task::Reverse => {
                let n = rng.gen_range(3..=6);
                let s: String = (0..n).map(|_| char::from(b'a' + rng.gen_range(0..26u8))).collect();
                format!("reverse {s}:")
            }
            Task::Add => format!("add {}+{}:", rng.gen_range(10..100), rng.gen_range(10..100)),
            Task::Sentiment => format!("review the {}:", TOPICS.choose(rng).expect("topics")),
        }
    }

    /// The prompt's argument (between the first space and the colon).
    fn arg(prompt: &str) -> &str {
        let a = prompt.find(' ').map_or(0, |i| i + 1);
        let b = prompt.rfind(':').unwrap_or(prompt.len());
        prompt.get(a..b.max(a)).unwrap_or("")
    }

    /// The correct answer (none for sentiment, whose reward is open-ended).
    pub fn answer(self, prompt: &str) -> Option<String> {
        let a = Self::arg(prompt);
        match self {
            Task::Sort => {
                let mut c: Vec<char> = a.chars().collect();
                c.sort_unstable();
                Some(c.into_iter().collect())
            }
            Task::Reverse => Some(a.chars().rev().collect()),
            Task::Add => {
                let (x, y) = a.split_once('+')?;
                Some((x.trim().parse::<i64>().ok()? + y.trim().parse::<i64>().ok()?).to_string())
            }
            Task::Sentiment => None,
        }
    }

    /// A demonstration: the answer, or for sentiment a neutral-to-mixed review.
    fn demo(self, prompt: &str, rng: &mut ChaCha8Rng) -> String {
        match self.answer(prompt) {
            Some(a) => a,
            None => {
                let n = rng.gen_range(3..=6);
                let words: Vec<&str> = (0..n)
                    .map(|_| {
                        let list = [POSITIVE, NEGATIVE, NEUTRAL][rng.gen_range(0..3)];
                        *list.choose(rng).expect("words")
                    })
                    .collect();
                words.join(" ")
            }
        }
    }

    /// A worse variant of a completion: one or two edits (digits, letters or words). The edits
    /// cover the ways a policy drifts: swapped, dropped, substituted, inserted characters, and a
    /// run appended past the answer (a reward model that never saw overlong answers rewards
    /// them, and PPO finds that out).
    fn corrupt(self, completion: &str, rng: &mut ChaCha8Rng) -> String {
        if self == Task::Sentiment {
            let mut w: Vec<&str> = completion.split(' ').collect();
            let i = rng.gen_range(0..w.len());
            w[i] = NEGATIVE.choose(rng).expect("words");
            return w.join(" ");
        }
        let mut c: Vec<char> = completion.chars().collect();
        let alphabet: Vec<char> = if self == Task::Reverse { ('a'..='z').collect() } else { ('0'..='9').collect() };
        for _ in 0..rng.gen_range(1..=2) {
            match rng.gen_range(0..5) {
                0 if c.len() > 1 => {
                    let (i, j) = (rng.gen_range(0..c.len()), rng.gen_range(0..c.len()));
                    c.swap(i, j);
                }
                1 if c.len() > 1 => {
                    c.remove(rng.gen_range(0..c.len()));
                }
                3 => {
                    let x = *alphabet.choose(rng).expect("alphabet");
                    c.insert(rng.gen_range(0..=c.len()), x);
                }
                4 => {
                    // The last character repeated, or random ones, past the end.
                    let x = match c.last() {
                        Some(&l) if rng.gen_bool(0.5) => l,
                        _ => *alphabet.choose(rng).expect("alphabet"),
                    };
                    let n = rng.gen_range(1..=4);
                    c.extend(std::iter::repeat_n(x, n));
                }
                _ => {
                    let i = rng.gen_range(0..c.len().max(1));
                    let x = *alphabet.choose(rng).expect("alphabet");
                    if c.is_empty() {
                        c.push(x);
                    } else {
                        c[i] = x;
                    }
                }
            }
        }
        let s: String = c.into_iter().collect();
        if s == completion {
            // Edits that cancelled out: append a character instead.
            format!("{s}{}", alphabet[0])
        } else {
            s
        }
    }

    /// The exact gold reward of `response` (decoded text, EOS excluded); `ended`: whether the
    /// response ended with EOS before the length limit.
    pub fn reward(self, prompt: &str, response: &str, ended: bool) -> f64 {
        match self.answer(prompt) {
            Some(a) => {
                let (a, r): (Vec<char>, Vec<char>) = (a.chars().collect(), response.chars().collect());
                let matches = a.iter().zip(&r).filter(|(x, y)| x == y).count();
                matches as f64 / a.len().max(r.len()).max(1) as f64
            }
            None => {
                let words = response.split_whitespace();
                let score: i64 = words
                    .map(|w| {
                        if POSITIVE.contains(&w) {
                            1
                        } else if NEGATIVE.contains(&w) {
                            -1
                        } else {
                            0
                        }
                    })
                    .sum();
                score as f64 + if ended { 1.0 } else { 0.0 }
            }
        }
    }

    /// `n` prompts from one side of the split, distinct where the task has enough of them.
    pub fn prompts(self, n: usize, seed: u64, heldout: bool) -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv(self.name()));
        rng.set_stream(heldout as u64);
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(n);
        let mut tries = 0;
        while out.len() < n {
            let p = self.sample_prompt(&mut rng);
            tries += 1;
            if is_heldout(&p) != heldout {
                continue;
            }
            // Distinct when possible; repeats once the space looks exhausted.
            if seen.insert(p.clone()) || tries > 50 * n {
                out.push(p);
            }
        }
        out
    }

    /// SFT demonstrations; a `corrupt` fraction of them replaced by a worse completion, so SFT
    /// leaves room for RL.
    pub fn sft(self, n: usize, seed: u64, heldout: bool, corrupt: f64) -> Vec<SftExample> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(1));
        self.prompts(n, seed, heldout)
            .into_iter()
            .map(|prompt| {
                let mut completion = self.demo(&prompt, &mut rng);
                if rng.gen_bool(corrupt.clamp(0.0, 1.0)) {
                    completion = self.corrupt(&completion, &mut rng);
                }
                SftExample { prompt, completion }
            })
            .collect()
    }

    /// Preference pairs ranked by gold reward; `noise`: probability a pair's labels are swapped.
    /// Tasks with an answer mostly pair it with a corruption of it (the distinction an RL policy
    /// near its SFT start needs), and one pair in ten ranks two corruptions by partial credit;
    /// sentiment pairs two free reviews.
    pub fn preferences(self, n: usize, seed: u64, heldout: bool, noise: f64) -> Vec<PrefExample> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(2));
        self.prompts(n, seed, heldout)
            .into_iter()
            .map(|prompt| {
                let mut p = self.pair_for(&prompt, &mut rng);
                if rng.gen_bool(noise.clamp(0.0, 1.0)) {
                    std::mem::swap(&mut p.chosen, &mut p.rejected);
                }
                p
            })
            .collect()
    }

    /// One synthetic preference pair for `prompt`, ranked by gold reward (see `preferences`).
    pub fn pair_for(self, prompt: &str, rng: &mut ChaCha8Rng) -> PrefExample {
        let graded = self.answer(prompt).is_none() || rng.gen_bool(0.1);
        let candidate = |rng: &mut ChaCha8Rng| {
            let d = self.demo(prompt, rng);
            if graded && self != Task::Sentiment {
                self.corrupt(&d, rng)
            } else {
                d
            }
        };
        let mut a = candidate(rng);
        let mut b = if graded { candidate(rng) } else { self.corrupt(&a, rng) };
        for _ in 0..20 {
            if self.reward(prompt, &a, true) != self.reward(prompt, &b, true) {
                break;
            }
            b = candidate(rng);
            if !graded {
                b = self.corrupt(&a, rng);
            }
        }
        if self.reward(prompt, &a, true) < self.reward(prompt, &b, true) {
            std::mem::swap(&mut a, &mut b);
        }
        PrefExample {
            prompt: prompt.to_string(),
            chosen: a,
            rejected: b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_rewards_are_exact() {
        assert_eq!(Task::Sort.answer("sort 52813:").unwrap(), "12358");
        assert_eq!(Task::Reverse.answer("reverse abc:").unwrap(), "cba");
        assert_eq!(Task::Add.answer("add 47+38:").unwrap(), "85");
        assert_eq!(Task::Sort.reward("sort 312:", "123", true), 1.0);
        assert!((Task::Sort.reward("sort 312:", "132", true) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(Task::Sort.reward("sort 312:", "", false), 0.0);
        assert!((Task::Add.reward("add 47+38:", "851", true) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(Task::Sentiment.reward("review the soup:", "good soup was bad great", true), 2.0);
        assert_eq!(Task::Sentiment.reward("review the soup:", "awful", false), -1.0);
    }

    #[test]
    fn splits_are_disjoint_deterministic_and_seeded() {
        for task in [Task::Sort, Task::Reverse, Task::Add, Task::Sentiment] {
            let train = task.prompts(300, 1, false);
            let held = task.prompts(100, 1, true);
            assert!(train.iter().all(|p| !is_heldout(p)) && held.iter().all(|p| is_heldout(p)));
            let t: std::collections::HashSet<_> = train.iter().collect();
            assert!(held.iter().all(|p| !t.contains(p)), "{task:?}");
            assert_eq!(train, task.prompts(300, 1, false));
            if task != Task::Sentiment {
                assert_ne!(train, task.prompts(300, 2, false));
            }
        }
    }

    #[test]
    fn corruption_and_preferences() {
        let clean = Task::Sort.sft(200, 3, false, 0.0);
        assert!(clean.iter().all(|e| Task::Sort.reward(&e.prompt, &e.completion, true) == 1.0));
        let dirty = Task::Sort.sft(200, 3, false, 0.5);
        let bad = dirty.iter().filter(|e| Task::Sort.reward(&e.prompt, &e.completion, true) < 1.0).count();
        assert!((60..140).contains(&bad), "{bad} of 200 corrupted at 0.5");
        for task in [Task::Sort, Task::Add, Task::Sentiment] {
            let prefs = task.preferences(200, 4, false, 0.0);
            let ordered = prefs.iter().filter(|p| task.reward(&p.prompt, &p.chosen, true) > task.reward(&p.prompt, &p.rejected, true)).count();
            assert!(ordered >= 190, "{task:?}: {ordered} of 200 pairs strictly ordered");
            let noisy = task.preferences(200, 4, false, 0.3);
            let flipped = noisy.iter().filter(|p| task.reward(&p.prompt, &p.chosen, true) < task.reward(&p.prompt, &p.rejected, true)).count();
            assert!((30..90).contains(&flipped), "{task:?}: {flipped} flipped at 0.3");
        }
    }
}
