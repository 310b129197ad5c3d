//! Tokenizers: byte-level with PAD, BOS and EOS (the default for models trained from scratch)
//! and GPT-2's BPE (tiktoken-rs's `r50k_base`, which ships the real vocabulary offline).

use serde::{Deserialize, Serialize};

use crate::error::{HarnessError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    Byte,
    Gpt2,
}

pub enum Tokenizer {
    Byte,
    Gpt2(Box<tiktoken_rs::CoreBPE>),
}

/// GPT-2's `<|endoftext|>`: its BOS, EOS and (masked) padding.
const GPT2_EOT: i64 = 50256;

impl Tokenizer {
    pub fn new(kind: TokenizerKind) -> Result<Self> {
        match kind {
            TokenizerKind::Byte => Ok(Tokenizer::Byte),
            TokenizerKind::Gpt2 => tiktoken_rs::r50k_base()
                .map(|b| Tokenizer::Gpt2(Box::new(b)))
                .map_err(|e| HarnessError::Config(format!("loading the GPT-2 vocabulary: {e}"))),
        }
    }

    pub fn kind(&self) -> TokenizerKind {
        match self {
            Tokenizer::Byte => TokenizerKind::Byte,
            Tokenizer::Gpt2(_) => TokenizerKind::Gpt2,
        }
    }

    pub fn vocab(&self) -> usize {
        match self {
            Tokenizer::Byte => 259,
            Tokenizer::Gpt2(_) => 50257,
        }
    }

    pub fn pad(&self) -> i64 {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::Gpt2(_) => GPT2_EOT,
        }
    }

    pub fn bos(&self) -> i64 {
        match self {
            Tokenizer::Byte => 257,
            Tokenizer::Gpt2(_) => GPT2_EOT,
        }
    }

    pub fn eos(&self) -> i64 {
        match self {
            Tokenizer::Byte => 258,
            Tokenizer::Gpt2(_) => GPT2_EOT,
        }
    }

    /// Text to tokens (no special tokens; text that looks like one is ordinary text).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        match self {
            Tokenizer::Byte => text.bytes().map(i64::from).collect(),
            Tokenizer::Gpt2(b) => b.encode_ordinary(text).into_iter().map(i64::from).collect(),
        }
    }

    /// Tokens to text, stopping at EOS and skipping other special tokens; invalid UTF-8 is
    /// replaced, never an error.
    pub fn decode(&self, ids: &[i64]) -> String {
        let upto = ids.iter().position(|&t| t == self.eos()).unwrap_or(ids.len());
        let ids = &ids[..upto];
        match self {
            Tokenizer::Byte => {
                let bytes: Vec<u8> = ids.iter().filter(|&&t| (0..256).contains(&t)).map(|&t| t as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Gpt2(b) => {
                let toks: Vec<u32> = ids.iter().filter(|&&t| (0..GPT2_EOT).contains(&t)).map(|&t| t as u32).collect();
                match b.decode(toks.clone()) {
                    Ok(s) => s,
                    // A response cut inside a multi-byte character: decode what is whole.
                    Err(_) => toks.iter().filter_map(|&t| b.decode(vec![t]).ok()).collect(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips_with_specials() {
        let t = Tokenizer::new(TokenizerKind::Byte).unwrap();
        let ids = t.encode("sort 312: é");
        assert!(ids.iter().all(|&i| i < 256));
        let mut with_eos = ids.clone();
        with_eos.push(t.eos());
        with_eos.push(42);
        assert_eq!(t.decode(&with_eos), "sort 312: é");
        assert_eq!(t.vocab(), 259);
        assert_eq!([t.pad(), t.bos(), t.eos()], [256, 257, 258]);
    }

    #[test]
    fn gpt2_bpe_uses_the_real_vocabulary() {
        let t = Tokenizer::new(TokenizerKind::Gpt2).unwrap();
        // "Hello world" is [15496, 995] in GPT-2's vocabulary.
        assert_eq!(t.encode("Hello world"), vec![15496, 995]);
        assert_eq!(t.decode(&[15496, 995, t.eos(), 15496]), "Hello world");
        assert_eq!(t.vocab(), 50257);
    }
}
