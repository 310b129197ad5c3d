//! An engine's state to and from checkpoint directories: saving a training checkpoint as one
//! committed set, resuming from it exactly, loading another stage's weights (a LoRA
//! checkpoint's adapters merged in) and exporting a LoRA model merged into plain GPT-2 tensors.

use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use crate::ckpt::{load_tensors, save_tensors, CkptConfig, CkptPaths};
use crate::engine::Engine;
use crate::error::{HarnessError, Result};
use crate::model::HeadKind;
use crate::tokenizer::TokenizerKind;

fn check_complete(e: &dyn Engine, w: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    match e.spec().params.iter().find(|s| !w.contains_key(&s.name)) {
        Some(s) => Err(HarnessError::Checkpoint {
            path: path.into(),
            msg: format!("lacks {}", s.name),
        }),
        None => Ok(()),
    }
}

/// Restores the previous checkpoint at `dir` if a crash interrupted its replacement.
pub fn recover_checkpoint(dir: &Path) -> Result<()> {
    if crate::ckpt::recover(dir)? {
        eprintln!("note: {}: a checkpoint swap was interrupted; resuming from the previous checkpoint", dir.display());
    }
    Ok(())
}

/// Loads weights, optimizer moments and the loss scaler from the checkpoint at `dir` into `e`,
/// which must be the same model with the same head; returns the optimizer step.
pub fn resume_engine(e: &mut dyn Engine, dir: &Path, head: HeadKind) -> Result<u64> {
    let p = CkptPaths::new(dir);
    let c = p.read_config()?;
    if c.head != head || c.model != e.spec().cfg {
        return Err(HarnessError::Config(format!("--resume: {} holds a different model ({} {:?})", p.dir.display(), c.model.name, c.head)));
    }
    if c.lora != e.spec().lora {
        let show = |l: Option<crate::model::LoraConfig>| l.map_or("no adapters".to_string(), |l| format!("LoRA rank {} alpha {}", l.rank, l.alpha));
        return Err(HarnessError::Config(format!(
            "--resume: {} was trained with {}, this run asks for {}: give the same --lora-rank/--lora-alpha",
            p.dir.display(),
            show(c.lora),
            show(e.spec().lora)
        )));
    }
    let w = load_tensors(&p.model())?;
    check_complete(e, &w, &p.model())?;
    e.import(&w)?;
    let o = load_tensors(&p.optimizer())?;
    e.import_optimizer(c.step, &o)?;
    if let Some(st) = c.scaler {
        e.set_scaler_state(st);
    }
    Ok(c.step)
}

/// Writes weights, moments and config into `dir` (which must exist), uncommitted: the caller
/// commits the directory (`ckpt::commit_dir`).
pub fn write_checkpoint_files(e: &mut dyn Engine, dir: &Path, tok: TokenizerKind, seed: u64) -> Result<()> {
    let model = e.export()?;
    let (step, opt) = e.export_optimizer()?;
    let cfg = CkptConfig {
        model: e.spec().cfg.clone(),
        head: e.spec().head,
        tokenizer: tok,
        step,
        seed,
        scaler: e.scaler_state(),
        lora: e.spec().lora,
    };
    let p = CkptPaths::new(dir);
    save_tensors(&p.model(), &model)?;
    save_tensors(&p.optimizer(), &opt)?;
    p.write_config(&cfg)
}

/// For a LoRA model, writes the merged model (adapters folded into the base weights: plain
/// GPT-2 tensors `transformers` loads) with its config to `dir`; nothing otherwise.
pub fn save_merged(e: &mut dyn Engine, dir: &Path, tok: TokenizerKind, seed: u64) -> Result<()> {
    let Some(lora) = e.spec().lora else { return Ok(()) };
    let mut w: BTreeMap<String, Tensor> = e.export()?.into_iter().collect();
    crate::model::merge_lora(&mut w, lora)?;
    let cfg = CkptConfig {
        model: e.spec().cfg.clone(),
        head: e.spec().head,
        tokenizer: tok,
        step: e.steps(),
        seed,
        scaler: None,
        lora: None,
    };
    // In first-use order, as the other checkpoints are written.
    let model: Vec<(String, Tensor)> = crate::model::param_specs(&cfg.model, cfg.head).into_iter().filter_map(|s| w.remove(&s.name).map(|t| (s.name, t))).collect();
    crate::ckpt::commit_dir(dir, |tmp| {
        let p = CkptPaths::new(tmp);
        save_tensors(&p.model(), &model)?;
        p.write_config(&cfg)
    })
}

/// Saves weights, moments and config under `dir`.
pub fn save_checkpoint(e: &mut dyn Engine, dir: &Path, tok: TokenizerKind, seed: u64) -> Result<()> {
    // The three files are one checkpoint: committed together or not at all.
    crate::ckpt::commit_dir(dir, |tmp| write_checkpoint_files(e, tmp, tok, seed))
}

/// Loads a checkpoint's weights into `e`; heads other than `e`'s are dropped (a critic starts
/// from a reward model's body, a value head fresh).
pub fn load_weights(e: &mut dyn Engine, dir: &Path, head_from: HeadKind) -> Result<()> {
    let p = CkptPaths::new(dir);
    let (_, mut w) = p.read_merged()?;
    if head_from != e.spec().head {
        w.retain(|k, _| !k.starts_with("v_head.") && !k.starts_with("score."));
    }
    let fresh = |n: &str| n.starts_with("v_head.") || n.starts_with("score.") || crate::model::is_adapter(n);
    if let Some(missing) = e.spec().params.iter().find(|s| !w.contains_key(&s.name) && !fresh(&s.name)) {
        return Err(HarnessError::Checkpoint {
            path: p.model(),
            msg: format!("lacks {}", missing.name),
        });
    }
    e.import(&w)
}
