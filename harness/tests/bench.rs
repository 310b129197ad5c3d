//! `stowage bench capacity`, run as a user would: each (strategy, model) in a child process
//! under a resident-memory budget.

use std::process::Command;

use serde_json::Value;

fn stowage() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stowage"));
    // One libtorch thread per child: tests run in parallel (see tests/train.rs).
    c.env("OMP_NUM_THREADS", "1");
    c
}

fn scratch() -> tempfile::TempDir {
    // A real disk: O_DIRECT is refused by tmpfs.
    let base = std::env::var("STOWAGE_SCRATCH").unwrap_or_else(|_| "/var/tmp".into());
    tempfile::Builder::new().prefix("stowage-bench").tempdir_in(base).unwrap()
}

fn bench(args: &[&str], d: &tempfile::TempDir) -> (Vec<Value>, String) {
    let json = d.path().join("runs.json");
    let out = d.path().join("out");
    let o = stowage()
        .args(["bench", "capacity", "--quiet", "--batch-size", "2", "--ctx", "32", "--max-new", "4"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "bench {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let runs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let md = std::fs::read_to_string(out.join("capacity.md")).unwrap();
    assert_eq!(md, String::from_utf8_lossy(&o.stdout), "the table is printed and saved");
    (runs, md)
}

#[test]
fn ppo_capacity_runs_both_strategies_and_reports_each_run() {
    let d = scratch();
    let nvme = d.path().join("swap");
    let (runs, md) = bench(
        &["--task", "ppo", "--budget", "3G", "--models", "tiny,2x64x4", "--steps", "2", "--nvme-dir", nvme.to_str().unwrap()],
        &d,
    );
    assert_eq!(runs.len(), 4, "{runs:?}");
    for r in &runs {
        assert_eq!(r["fits"], true, "{r}");
        let peak = r["peak_bytes"].as_u64().unwrap();
        assert!(peak > 50 << 20 && peak <= 3 << 30, "a real resident peak within the budget: {r}");
        assert!(r["step_s"].as_f64().unwrap() > 0.0 && r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        // Four models of one size; the value and score heads add a few parameters.
        let (n, total) = (r["params"].as_u64().unwrap(), r["params_total"].as_u64().unwrap());
        assert!(total >= 4 * n && total < 4 * n + n / 100, "{r}");
    }
    // Smallest model first, strategies in the order asked.
    assert_eq!(runs[0]["model"], "2x64x4");
    assert_eq!(runs[0]["strategy"], "naive");
    assert_eq!(runs[3]["strategy"], "chunked");
    // Everything fits in memory here: every chunk starts on the device (zeros, then the
    // weights written there), so nothing moves and there is no transfer time to hide (the
    // shares themselves are computed from the timeline: `record::tests`).
    let moved: u64 = runs[3]["bytes_moved"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(moved, 0, "{}", runs[3]);
    for k in ["transfer_hidden_share", "steady_hidden_share"] {
        assert!(runs[3][k].is_null() && runs[0][k].is_null(), "{k}: {} {}", runs[0], runs[3]);
    }
    assert!(md.contains("| - | - |"), "no shares without transfers: {md}");
    assert!(md.contains("chunked / naive capacity: 1.0x"), "{md}");
    assert!(md.contains("chunked step time"), "{md}");
    assert!(d.path().join("out/capacity.png").exists());
    // Each run's swap directory is removed afterwards.
    assert_eq!(std::fs::read_dir(&nvme).map(|r| r.count()).unwrap_or(0), 0);
}

#[test]
fn lora_rows_run_three_models_with_adapters() {
    let d = scratch();
    let nvme = d.path().join("swap");
    let (runs, md) = bench(
        &["--task", "ppo", "--budget", "3G", "--models", "2x64x4", "--steps", "1", "--lora-rank", "4", "--lora-only", "--nvme-dir", nvme.to_str().unwrap()],
        &d,
    );
    let names: Vec<&str> = runs.iter().map(|r| r["strategy"].as_str().unwrap()).collect();
    assert_eq!(names, ["naive+lora", "chunked+lora"], "{runs:?}");
    for r in &runs {
        assert_eq!(r["fits"], true, "{r}");
        // Actor (its own reference), critic and reward model; adapters add a few parameters.
        let (n, total) = (r["params"].as_u64().unwrap(), r["params_total"].as_u64().unwrap());
        assert!(total > 3 * n && total < 3 * n + n / 5, "three models: {r}");
    }
    assert!(md.contains("chunked+lora / naive+lora capacity: 1.0x"), "{md}");
    let o = stowage().args(["bench", "capacity", "--quiet", "--budget", "1G", "--lora-only", "--out"]).arg(d.path().join("x")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--lora-only needs --lora-rank"), "{err}");
}

#[test]
fn a_run_over_the_budget_is_stopped_and_larger_models_are_skipped() {
    let d = scratch();
    // 2x64x4 fits in 1 GiB; 8x1024x16 (about 100M parameters, 1.6 GB of fp32 weights, gradients
    // and moments) cannot, and 12x1024x16 is not tried after it.
    let (runs, md) = bench(&["--task", "sft", "--budget", "1G", "--strategies", "naive", "--models", "12x1024x16,2x64x4,8x1024x16", "--steps", "1"], &d);
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert_eq!(runs[0]["fits"], true, "{}", runs[0]);
    assert_eq!(runs[1]["fits"], false, "{}", runs[1]);
    let why = runs[1]["reason"].as_str().unwrap();
    assert!(why.contains("resident memory reached") && why.contains("budget"), "{why}");
    assert!(runs[1]["peak_bytes"].as_u64().unwrap() > 1 << 30, "{}", runs[1]);
    assert_eq!(runs[2]["fits"], false);
    assert!(runs[2]["reason"].as_str().unwrap().contains("not run"), "{}", runs[2]);
    assert!(md.contains("naive capacity: 0.1M"), "{md}");
}

#[test]
fn impossible_lengths_are_refused_before_any_run() {
    let d = scratch();
    let o = stowage()
        .args(["bench", "capacity", "--quiet", "--task", "ppo", "--budget", "1G", "--ctx", "2", "--models", "tiny"])
        .arg("--out")
        .arg(d.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--ctx >= 4"), "{err}");
}
