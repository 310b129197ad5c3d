//! Property-based fuzzing of the parsers users feed: dataset JSON Lines, model specs, sizes,
//! checkpoint configs and safetensors files. Arbitrary input gives a value or a clear error,
//! never a panic; errors on dataset files name the file and line. Failing inputs proptest finds
//! are kept in `tests/fuzz.proptest-regressions` (the corpus) and replayed first on every run.

use proptest::prelude::*;
use stowage_harness::ckpt::{load_tensors, CkptPaths};
use stowage_harness::data::{load_jsonl, PrefExample, PromptExample, SftExample};
use stowage_harness::model::GptConfig;
use stowage_harness::tokenizer::{Tokenizer, TokenizerKind};
use stowage_harness::train::parse_size;

fn cases() -> ProptestConfig {
    // STOWAGE_FUZZ_CASES raises the count for a longer pass outside CI.
    let n = std::env::var("STOWAGE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    ProptestConfig { cases: n, ..ProptestConfig::default() }
}

/// Lines that are sometimes valid records, sometimes near misses, sometimes noise.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z ]{0,12}".prop_map(|p| serde_json::json!({"prompt": p, "completion": "x"}).to_string()),
        ("[a-z]{0,6}", "[a-z]{0,6}", "[a-z]{0,6}").prop_map(|(p, c, r)| serde_json::json!({"prompt": p, "chosen": c, "rejected": r}).to_string()),
        Just("{\"prompt\": 3}".to_string()),
        Just("{\"prompt\": \"a\"".to_string()),
        Just(String::new()),
        "\\PC{0,40}",
    ]
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn dataset_lines_parse_or_fail_naming_file_and_line(lines in prop::collection::vec(line(), 0..8), raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("data.jsonl");
        let mut body = lines.join("\n").into_bytes();
        if raw.len() % 3 == 0 {
            // Sometimes append bytes that need not be UTF-8.
            body.extend_from_slice(&raw);
        }
        std::fs::write(&path, &body).unwrap();
        let check = |r: Result<usize, stowage_harness::HarnessError>| {
            if let Err(e) = r {
                let msg = e.to_string();
                prop_assert!(msg.contains("data.jsonl"), "the error names the file: {}", msg);
                if let stowage_harness::HarnessError::Data { line, .. } = e {
                    // The line number is the file's (1-based; 0 for "no records at all").
                    prop_assert!(line <= body.split(|&b| b == b'\n').count(), "line {} of {}", line, msg);
                    prop_assert!(msg.contains(&format!("data.jsonl:{line}:")), "{}", msg);
                }
            }
            Ok(())
        };
        check(load_jsonl::<SftExample>(&path).map(|v| v.len()))?;
        check(load_jsonl::<PrefExample>(&path).map(|v| v.len()))?;
        check(load_jsonl::<PromptExample>(&path).map(|v| v.len()))?;
    }

    #[test]
    fn model_specs_parse_or_fail_clearly(spec in prop_oneof!["[0-9]{1,3}x[0-9]{1,4}x[0-9]{1,3}", "\\PC{0,12}"], vocab in 0usize..300, ctx in 0usize..200) {
        match GptConfig::parse(&spec, vocab, ctx) {
            Ok(c) => {
                prop_assert!(c.n_layer > 0 && c.n_embd % c.n_head == 0 && c.vocab > 0 && c.n_ctx > 0);
            }
            Err(e) => prop_assert!(e.to_string().contains("model"), "{}", e),
        }
    }

    #[test]
    fn sizes_parse_or_fail_clearly(s in prop_oneof!["[0-9]{1,4}(\\.[0-9])?[kKmMgGtT]?(i?[bB])?", "\\PC{0,10}"]) {
        match parse_size(&s) {
            Ok(_) => {}
            Err(e) => prop_assert!(e.contains("size"), "{}", e),
        }
    }

    #[test]
    fn byte_tokenizer_round_trips_any_text(text in "\\PC{0,64}") {
        let tok = Tokenizer::new(TokenizerKind::Byte).unwrap();
        prop_assert_eq!(tok.decode(&tok.encode(&text)), text);
    }

    #[test]
    fn checkpoint_files_load_or_fail_clearly(bytes in prop::collection::vec(any::<u8>(), 0..256), header in "\\PC{0,80}", cut in 0usize..64) {
        let d = tempfile::tempdir().unwrap();
        // Random bytes, and a plausible safetensors file (length prefix, JSON header, data) cut
        // at a random point.
        let p = d.path().join("model.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        if let Err(e) = load_tensors(&p) {
            prop_assert!(e.to_string().contains("model.safetensors"), "{}", e);
        }
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.extend_from_slice(&bytes);
        f.truncate(f.len().saturating_sub(cut));
        std::fs::write(&p, &f).unwrap();
        if let Err(e) = load_tensors(&p) {
            prop_assert!(e.to_string().contains("model.safetensors"), "{}", e);
        }
        // A config.json of random text.
        std::fs::write(d.path().join("config.json"), header.as_bytes()).unwrap();
        if let Err(e) = CkptPaths::new(d.path()).read_config() {
            prop_assert!(e.to_string().contains("config.json"), "{}", e);
        }
    }
}
