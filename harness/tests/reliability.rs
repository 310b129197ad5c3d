//! Crash safety: training with NVMe offload killed with SIGKILL at random points resumes from
//! its last checkpoint to the same model as a run that was never interrupted.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

fn stowage() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stowage"));
    c.env("OMP_NUM_THREADS", "1");
    c
}

fn scratch() -> tempfile::TempDir {
    // A real disk: O_DIRECT is refused by tmpfs.
    let base = std::env::var("STOWAGE_SCRATCH").unwrap_or_else(|_| "/var/tmp".into());
    tempfile::Builder::new().prefix("stowage-kill").tempdir_in(base).unwrap()
}

const STEPS: &str = "600";

fn train(out: &Path, swap: &Path, resume: bool) -> Command {
    let mut c = stowage();
    c.args(["sft", "--task", "add", "--model", "2x64x4", "--eval-every", "0", "--eval-size", "4", "--batch-size", "8", "--steps", STEPS, "--save-every", "1"])
        // Budgets below the model's state: chunks move through host memory to the swap files
        // every step.
        .args(["--device-budget", "1M", "--host-budget", "1M", "--quiet", "--nvme-dir"])
        .arg(swap)
        .arg("--out")
        .arg(out);
    if resume {
        c.arg("--resume");
    }
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    c
}

fn has_checkpoint(out: &Path) -> bool {
    out.join("checkpoint/config.json").exists() || out.join(".checkpoint.prev/config.json").exists()
}

#[test]
fn training_killed_at_random_points_resumes_to_the_same_model() {
    let d = scratch();
    let swap = d.path().join("swap");
    let straight = d.path().join("straight");
    let o = train(&straight, &swap, false).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let killed = d.path().join("killed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut kills = 0;
    let mut launches = 0;
    loop {
        launches += 1;
        assert!(launches < 200, "no progress after {launches} launches");
        let mut child = train(&killed, &swap, has_checkpoint(&killed)).spawn().unwrap();
        // Twenty kills at random points (start-up, a step, a checkpoint being written), then
        // one run to the end.
        let deadline = (kills < 20).then(|| Instant::now() + Duration::from_millis(rng.gen_range(150..1500)));
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if deadline.is_some_and(|t| Instant::now() >= t) {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if let Some(s) = status {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(s.success(), "launch {launches} (after {kills} kills) failed: {err}");
            if kills >= 20 {
                break;
            }
        }
    }
    assert!(kills >= 20);
    let cfg = stowage_harness::ckpt::CkptPaths::new(killed.join("checkpoint")).read_config().unwrap();
    assert_eq!(cfg.step, STEPS.parse::<u64>().unwrap());
    let a = stowage_harness::ckpt::load_tensors(&straight.join("checkpoint/model.safetensors")).unwrap();
    let b = stowage_harness::ckpt::load_tensors(&killed.join("checkpoint/model.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert!(v.equal(&b[k]), "{k} differs after {kills} kills and {launches} launches");
    }
    let oa = stowage_harness::ckpt::load_tensors(&straight.join("checkpoint/optimizer.safetensors")).unwrap();
    let ob = stowage_harness::ckpt::load_tensors(&killed.join("checkpoint/optimizer.safetensors")).unwrap();
    for (k, v) in &oa {
        assert!(v.equal(&ob[k]), "optimizer state {k} differs");
    }
    // The killed runs' swap files were swept by the next launch; the last run removed its own.
    let left: Vec<_> = std::fs::read_dir(&swap).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "swap files left: {left:?}");
}
