//! Datasets as JSON Lines in the formats people use: SFT `{"prompt", "completion"}`,
//! preferences `{"prompt", "chosen", "rejected"}`, prompts `{"prompt"}`. Other fields are
//! ignored; blank lines are skipped; a malformed line is an error naming file and line.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{HarnessError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftExample {
    pub prompt: String,
    pub completion: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefExample {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptExample {
    pub prompt: String,
}

/// Reads a JSONL file of `T` records.
pub fn load_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let f = std::fs::File::open(path).map_err(|e| HarnessError::io("opening dataset", path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| HarnessError::Data {
            file: path.into(),
            line: i + 1,
            msg: format!("unreadable line ({e}); datasets must be UTF-8 JSON Lines"),
        })?;
        // A byte-order mark some editors put at the start of a file is not part of the data.
        let line = if i == 0 { line.strip_prefix('\u{feff}').unwrap_or(&line) } else { &line };
        if line.trim().is_empty() {
            continue;
        }
        // serde would read a struct from a JSON array by position; a record is an object.
        if !line.trim_start().starts_with('{') {
            return Err(HarnessError::Data {
                file: path.into(),
                line: i + 1,
                msg: format!("not a JSON object; expected one object per line with the fields {}", fields::<T>()),
            });
        }
        let rec = serde_json::from_str::<T>(line).map_err(|e| HarnessError::Data {
            file: path.into(),
            line: i + 1,
            msg: format!("{e}; expected one JSON object per line with the fields {}", fields::<T>()),
        })?;
        out.push(rec);
    }
    if out.is_empty() {
        return Err(HarnessError::Data {
            file: path.into(),
            line: 0,
            msg: format!("no records; expected JSON Lines with the fields {}", fields::<T>()),
        });
    }
    Ok(out)
}

fn fields<T>() -> &'static str {
    let n = std::any::type_name::<T>();
    if n.ends_with("SftExample") {
        "\"prompt\" and \"completion\""
    } else if n.ends_with("PrefExample") {
        "\"prompt\", \"chosen\" and \"rejected\""
    } else {
        "\"prompt\""
    }
}

/// Writes records as JSONL.
pub fn save_jsonl<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| HarnessError::io("creating", path, e))?);
    for r in records {
        let line = serde_json::to_string(r).map_err(|e| HarnessError::Config(e.to_string()))?;
        writeln!(f, "{line}").map_err(|e| HarnessError::io("writing", path, e))?;
    }
    f.flush().map_err(|e| HarnessError::io("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_extra_fields_and_blank_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        std::fs::write(&p, "{\"prompt\":\"a\",\"completion\":\"b\",\"id\":3}\n\n{\"prompt\":\"c\",\"completion\":\"d\"}\n").unwrap();
        let v: Vec<SftExample> = load_jsonl(&p).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].completion, "d");
    }

    #[test]
    fn a_malformed_line_names_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad.jsonl");
        std::fs::write(&p, "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n{\"prompt\":\"a\",\"chosen\":\"b\"}\n").unwrap();
        let e = load_jsonl::<PrefExample>(&p).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2") && e.contains("rejected"), "{e}");
        std::fs::write(&p, "{\"prompt\": 3}\n").unwrap();
        let e = load_jsonl::<PromptExample>(&p).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:1") && e.contains("invalid type"), "{e}");
        std::fs::write(&p, "not json\n").unwrap();
        let e = load_jsonl::<SftExample>(&p).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:1") && e.contains("\"completion\""), "{e}");
        let e = load_jsonl::<SftExample>(&d.path().join("missing.jsonl")).unwrap_err().to_string();
        assert!(e.contains("missing.jsonl") && e.contains("opening dataset"), "{e}");
    }
}
