//! Property-based fuzzing of the parsers users feed: dataset JSON Lines, model specs, sizes,
//! checkpoint configs and safetensors files. Arbitrary input gives a value or a clear error,
//! never a panic; errors on dataset files name the file and line. Failing inputs proptest finds
//! are kept in `tests/fuzz.proptest-regressions` and replayed first on every run.
//!
//! The seed corpus `tests/corpus/{safetensors,config,jsonl}/` (written by
//! `scripts/make_fuzz_corpus.py`; files may also be dropped in by hand) is replayed as is, each
//! file's name saying what its loader must do (`ok_*` loads, `err_*` fails naming the file,
//! `any_*` either), and mutated: bytes flipped, inserted, removed, cut, spliced from another seed.

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

/// Which loader a corpus directory feeds.
#[derive(Clone, Copy, Debug)]
enum Target {
    Safetensors,
    Config,
    Jsonl,
}

const TARGETS: [(Target, &str); 3] = [(Target::Safetensors, "safetensors"), (Target::Config, "config"), (Target::Jsonl, "jsonl")];

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(dir);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// Feeds `bytes` to the target's loaders. Each result is Ok or an error naming the file (and,
/// for datasets, a line within it); returns which loaders succeeded, or what broke the rule.
fn feed(target: Target, bytes: &[u8]) -> Result<Vec<bool>, String> {
    let d = tempfile::tempdir().unwrap();
    let named = |r: Result<(), stowage_harness::HarnessError>, file: &str| -> Result<bool, String> {
        match r {
            Ok(()) => Ok(true),
            Err(e) => {
                let msg = e.to_string();
                if !msg.contains(file) {
                    return Err(format!("the error does not name {file}: {msg}"));
                }
                if let stowage_harness::HarnessError::Data { line, .. } = e {
                    let lines = bytes.split(|&b| b == b'\n').count();
                    if line > lines {
                        return Err(format!("line {line} of a {lines}-line file: {msg}"));
                    }
                }
                Ok(false)
            }
        }
    };
    match target {
        Target::Safetensors => {
            let p = d.path().join("model.safetensors");
            std::fs::write(&p, bytes).unwrap();
            Ok(vec![named(load_tensors(&p).map(|_| ()), "model.safetensors")?])
        }
        Target::Config => {
            std::fs::write(d.path().join("config.json"), bytes).unwrap();
            Ok(vec![named(CkptPaths::new(d.path()).read_config().map(|_| ()), "config.json")?])
        }
        Target::Jsonl => {
            let p = d.path().join("data.jsonl");
            std::fs::write(&p, bytes).unwrap();
            Ok(vec![
                named(load_jsonl::<SftExample>(&p).map(|_| ()), "data.jsonl")?,
                named(load_jsonl::<PrefExample>(&p).map(|_| ()), "data.jsonl")?,
                named(load_jsonl::<PromptExample>(&p).map(|_| ()), "data.jsonl")?,
            ])
        }
    }
}

/// Every seed as is: the outcome its name promises.
#[test]
fn corpus_seeds_load_or_fail_as_named() {
    let mut seen = 0;
    for (target, dir) in TARGETS {
        for (name, bytes) in corpus(dir) {
            seen += 1;
            let ok = feed(target, &bytes).unwrap_or_else(|e| panic!("{dir}/{name}: {e}"));
            let want_ok = match target {
                // A dataset seed `ok_sft`, `ok_prefs`, `ok_prompts` must load as that kind.
                Target::Jsonl => ["sft", "prefs", "prompts"].iter().position(|k| name.starts_with(&format!("ok_{k}"))),
                _ => name.starts_with("ok_").then_some(0),
            };
            if let Some(k) = want_ok {
                assert!(ok[k], "{dir}/{name} should load");
            }
            if name.starts_with("err_") {
                assert!(ok.iter().all(|&o| !o), "{dir}/{name} should be refused: {ok:?}");
            }
        }
    }
    assert!(seen >= 30, "only {seen} corpus files");
}

/// One edit of a seed.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Cut(usize),
    /// Bytes from another seed of the same target.
    Splice(usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), prop::collection::vec(prop_oneof![any::<u8>(), Just(b'"'), Just(b'{'), Just(b'\n'), Just(b'9')], 1..6)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(s, i, j)| Mutation::Splice(s, i, j)),
    ]
}

fn mutate(mut b: Vec<u8>, ms: &[Mutation], seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
    for m in ms {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match m {
            Mutation::Flip(i, x) if !b.is_empty() => {
                let k = i % b.len();
                b[k] ^= x | 1;
            }
            Mutation::Flip(..) => {}
            Mutation::Insert(i, x) => {
                let k = at(*i, b.len());
                b.splice(k..k, x.iter().copied());
            }
            Mutation::Remove(i, n) => {
                let k = at(*i, b.len());
                let end = (k + n).min(b.len());
                b.drain(k..end);
            }
            Mutation::Cut(i) => b.truncate(at(*i, b.len())),
            Mutation::Splice(s, i, j) => {
                let other = &seeds[s % seeds.len()].1;
                let (x, y) = (at(*i, other.len()), at(*j, other.len()));
                let k = at(*i ^ *j, b.len());
                b.splice(k..k, other[x.min(y)..x.max(y)].iter().copied());
            }
        }
    }
    b
}

proptest! {
    #![proptest_config(cases())]

    /// Seeds with up to four edits: a value or an error naming the file, never a panic.
    #[test]
    fn mutated_corpus_inputs_load_or_fail_clearly(t in 0usize..3, seed in any::<usize>(), ms in prop::collection::vec(mutation(), 1..5)) {
        let (target, dir) = TARGETS[t];
        let seeds = corpus(dir);
        let (name, bytes) = &seeds[seed % seeds.len()];
        let input = mutate(bytes.clone(), &ms, &seeds);
        if let Err(e) = feed(target, &input) {
            prop_assert!(false, "{}/{} mutated by {:?}: {}", dir, name, ms, e);
        }
    }
}
