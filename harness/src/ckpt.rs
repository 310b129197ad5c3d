//! Checkpoints: `model.safetensors` with Hugging Face GPT-2 tensor names (fp32), the optimizer's
//! moments in `optimizer.safetensors`, and `config.json` (the model's shape, head, tokenizer and
//! the training position). Files are written atomically (temporary file with mode 0600, fsync,
//! rename, fsync of the directory), and a training checkpoint is committed as a set: its files
//! go to a temporary directory that then replaces the old one by renames (the old one kept as
//! `.NAME.prev` until the new one is in place), so a crash at any point leaves one whole
//! checkpoint, never a model from one step with the optimizer of another (`recover` finishes an
//! interrupted swap).
//!
//! Loading accepts GPT-2 weights as `transformers` saves them (`transformer.` prefixes, the
//! attention-mask buffers and a tied `lm_head.weight` are skipped) and rejects tensors whose
//! declared size or offset exceeds the file (the safetensors parser validates the header).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{HarnessError, Result};
use crate::model::{GptConfig, HeadKind};
use crate::tokenizer::TokenizerKind;

/// `config.json`: enough to rebuild the model and resume training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CkptConfig {
    pub model: GptConfig,
    pub head: HeadKind,
    pub tokenizer: TokenizerKind,
    /// Optimizer steps taken.
    pub step: u64,
    pub seed: u64,
    /// The fp16 loss scaler's state, when training used one.
    #[serde(default)]
    pub scaler: Option<ScalerState>,
    /// A LoRA model: `model.safetensors` holds the frozen base weights and the adapters
    /// (`*.lora_a`, `*.lora_b`) apart; loading for another stage merges them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::LoraConfig>,
}

/// What a dynamic loss scaler needs to carry on exactly where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    pub scale: f32,
    pub clean_steps: u32,
    pub hysteresis_left: u32,
}

fn ckerr(path: &Path, msg: impl Into<String>) -> HarnessError {
    HarnessError::Checkpoint {
        path: path.into(),
        msg: msg.into(),
    }
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| ckerr(path, "not a file path"))?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(HarnessError::io("writing checkpoint file", path, e));
    }
    Ok(())
}

/// Serialises named CPU tensors (converted to fp32) as safetensors.
pub fn save_tensors(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(named.len());
    for (n, t) in named {
        let t = t.f_to_kind(Kind::Float)?.f_contiguous()?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let v: Vec<f32> = Vec::<f32>::try_from(&t.flatten(0, -1)).map_err(HarnessError::from)?;
        data.push((n.clone(), shape, bytemuck::cast_slice(&v).to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| ckerr(path, format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::tensor::serialize(views, &None).map_err(|e| ckerr(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Reads safetensors (f32, f16 or bf16) into CPU fp32 tensors, names normalised to GPT-2's.
pub fn load_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| HarnessError::io("reading checkpoint", path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ckerr(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let name = name.strip_prefix("transformer.").unwrap_or(&name).to_string();
        if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name == "lm_head.weight" {
            continue;
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let kind = match view.dtype() {
            safetensors::Dtype::F32 => Kind::Float,
            safetensors::Dtype::F16 => Kind::Half,
            safetensors::Dtype::BF16 => Kind::BFloat16,
            d => return Err(ckerr(path, format!("tensor {name} has dtype {d:?}; only F32, F16 and BF16 load"))),
        };
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?.f_to_kind(Kind::Float)?;
        out.insert(name, t);
    }
    Ok(out)
}

fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| ckerr(dir, "not a directory path"))?.to_string_lossy().into_owned();
    Ok(dir.with_file_name(format!(".{name}.{tag}")))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes a checkpoint directory as one unit: `fill` writes the files into a fresh temporary
/// directory, which then takes `dir`'s place. A crash before the final rename leaves the old
/// checkpoint (as `dir`, or as `.NAME.prev` for `recover` to restore).
pub fn commit_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| HarnessError::io("creating", &parent, e))?;
    recover(dir)?;
    let tmp = sibling(dir, &format!("tmp-{}", std::process::id()))?;
    let prev = sibling(dir, "prev")?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| HarnessError::io("removing", &tmp, e))?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(|e| HarnessError::io("creating", &tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let r = (|| -> std::io::Result<()> {
        if dir.exists() {
            std::fs::rename(dir, &prev)?;
        }
        std::fs::rename(&tmp, dir)?;
        sync_dir(&parent)?;
        if prev.exists() {
            std::fs::remove_dir_all(&prev)?;
        }
        Ok(())
    })();
    r.map_err(|e| HarnessError::io("committing checkpoint", dir, e))
}

/// Finishes a swap `commit_dir` was interrupted in: restores `.NAME.prev` when `dir` is
/// missing, drops it when `dir` is whole, and removes temporary directories left by dead
/// writers. Returns whether it restored the previous checkpoint.
pub fn recover(dir: &Path) -> Result<bool> {
    let prev = sibling(dir, "prev")?;
    let mut restored = false;
    if prev.exists() {
        if dir.exists() {
            std::fs::remove_dir_all(&prev).map_err(|e| HarnessError::io("removing", &prev, e))?;
        } else {
            std::fs::rename(&prev, dir).map_err(|e| HarnessError::io("restoring", dir, e))?;
            restored = true;
        }
    }
    if let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) {
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        let stem = format!(".{}.tmp-", name.to_string_lossy());
        for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let pid = n.strip_prefix(&stem).and_then(|p| p.parse::<u32>().ok());
            // Another live process may be writing its own; only dead writers' are removed.
            if pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(restored)
}

/// Paths of a checkpoint directory's files.
pub struct CkptPaths {
    pub dir: PathBuf,
}

impl CkptPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CkptPaths { dir: dir.into() }
    }
    pub fn model(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    pub fn optimizer(&self) -> PathBuf {
        self.dir.join("optimizer.safetensors")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    pub fn read_config(&self) -> Result<CkptConfig> {
        let p = self.config();
        let s = std::fs::read_to_string(&p).map_err(|e| HarnessError::io("reading checkpoint config", &p, e))?;
        serde_json::from_str(&s).map_err(|e| ckerr(&p, format!("malformed config: {e}")))
    }

    /// The checkpoint's config and its model tensors as the plain GPT-2 they compute: a LoRA
    /// checkpoint's adapters are merged into their base weights.
    pub fn read_merged(&self) -> Result<(CkptConfig, BTreeMap<String, Tensor>)> {
        let c = self.read_config()?;
        let mut w = load_tensors(&self.model())?;
        match c.lora {
            Some(l) => crate::model::merge_lora(&mut w, l).map_err(|e| ckerr(&self.model(), e.to_string()))?,
            None => {
                if let Some(n) = w.keys().find(|n| crate::model::is_adapter(n)) {
                    return Err(ckerr(&self.model(), format!("holds the adapter {n} but config.json has no `lora` section to merge it with")));
                }
            }
        }
        Ok((c, w))
    }

    pub fn write_config(&self, c: &CkptConfig) -> Result<()> {
        let s = serde_json::to_vec_pretty(c).map_err(|e| ckerr(&self.config(), e.to_string()))?;
        write_atomic(&self.config(), &s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hf_names() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
        save_tensors(&p, &[("transformer.wte.weight".into(), a.shallow_clone()), ("h.0.attn.bias".into(), a.shallow_clone())]).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let m = load_tensors(&p).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), vec!["wte.weight"]);
        assert!(m["wte.weight"].equal(&a));
    }

    #[test]
    fn a_checkpoint_is_replaced_as_a_whole_and_an_interrupted_swap_recovers() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("checkpoint");
        let put = |v: &'static [u8]| move |t: &Path| write_atomic(&t.join("a"), v).and_then(|_| write_atomic(&t.join("b"), v));
        commit_dir(&dir, put(b"1")).unwrap();
        commit_dir(&dir, put(b"2")).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"2");
        assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"2");
        // A writer that fails half-way leaves the old set alone and no temporary directory.
        let e = commit_dir(&dir, |t: &Path| {
            write_atomic(&t.join("a"), b"3")?;
            Err(ckerr(t, "disk full"))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"2");
        let names: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["checkpoint"]);
        // A crash between the two renames: only `.checkpoint.prev` is left, and a dead writer's
        // temporary directory.
        let prev = d.path().join(".checkpoint.prev");
        std::fs::rename(&dir, &prev).unwrap();
        let dead = d.path().join(".checkpoint.tmp-999999999");
        std::fs::create_dir(&dead).unwrap();
        assert!(recover(&dir).unwrap());
        assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"2");
        assert!(!prev.exists() && !dead.exists());
        assert!(!recover(&dir).unwrap());
    }

    #[test]
    fn truncated_or_lying_files_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let a = Tensor::zeros([64], (Kind::Float, tch::Device::Cpu));
        save_tensors(&p, &[("wte.weight".into(), a)]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 8]).unwrap();
        let e = load_tensors(&p).unwrap_err().to_string();
        assert!(e.contains("not a valid safetensors file"), "{e}");
        // A header whose offsets point past the end of the data.
        let header = br#"{"wte.weight":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}"#;
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header);
        f.extend_from_slice(&[0u8; 16]);
        std::fs::write(&p, &f).unwrap();
        let e = load_tensors(&p).unwrap_err().to_string();
        assert!(e.contains("not a valid safetensors file"), "{e}");
    }
}
