//! SFT and reward-model training through the `stowage` command line, as a user runs them.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use stowage_harness::data::save_jsonl;
use stowage_harness::tasks::Task;

fn stowage() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stowage"));
    // The test harness runs tests in parallel, one per core: one libtorch thread per run keeps
    // OpenMP's spinning workers from fighting over the cores (several times slower otherwise).
    c.env("OMP_NUM_THREADS", "1");
    c
}

fn scratch() -> tempfile::TempDir {
    // A real disk: O_DIRECT is refused by tmpfs.
    let base = std::env::var("STOWAGE_SCRATCH").unwrap_or_else(|_| "/var/tmp".into());
    tempfile::Builder::new().prefix("stowage-train").tempdir_in(base).unwrap()
}

fn run(args: &[&str], out: &Path) -> Value {
    let o = stowage().args(args).arg("--out").arg(out).arg("--quiet").output().unwrap();
    assert!(o.status.success(), "stowage {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    serde_json::from_str(&report).unwrap()
}

fn fails(args: &[&str]) -> String {
    let d = tempfile::tempdir().unwrap();
    let o = stowage().args(args).arg("--out").arg(d.path()).arg("--quiet").output().unwrap();
    assert!(!o.status.success(), "stowage {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The acceptance run: sort on the tiny model, chunked, with the device budget below the
/// model's state and the host budget below it too, so chunks spill to NVMe every step.
#[test]
fn sft_sort_learns_with_chunks_offloaded_to_nvme() {
    let d = scratch();
    let out = d.path().join("run");
    let nvme = d.path().join("swap");
    // The tiny model's state is about 13 MiB (16 bytes per parameter).
    let r = run(
        &["sft", "--task", "sort", "--model", "tiny", "--device-budget", "6M", "--host-budget", "6M", "--nvme-dir", nvme.to_str().unwrap(), "--eval-every", "0"],
        &out,
    );
    let em = r["sft"]["heldout_exact_match"].as_f64().unwrap();
    assert!(em >= 0.95, "held-out exact match {em}: {r}");
    let moved = &r["memory"]["bytes_moved"];
    for link in ["host->nvme", "nvme->device"] {
        assert!(moved[link].as_u64().unwrap_or(0) > 0, "no bytes over {link}: {moved}");
    }
    assert!(r["memory"]["peak_rss_bytes"].as_u64().unwrap() > 0);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 1000);
    for f in ["model.safetensors", "optimizer.safetensors", "config.json"] {
        assert!(out.join("checkpoint").join(f).exists(), "{f}");
    }
    // The checkpoint generates with the command line.
    let o = stowage()
        .args(["generate", "--checkpoint"])
        .arg(out.join("checkpoint"))
        .args(["--prompt", "sort 5141:", "--prompt", "sort 90:"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["prompt"], "sort 5141:");
}

/// User JSONL files of another task (reverse), on the naive strategy.
#[test]
fn sft_learns_from_jsonl_files() {
    let d = tempfile::tempdir().unwrap();
    let (train, eval) = (d.path().join("train.jsonl"), d.path().join("eval.jsonl"));
    save_jsonl(&train, &Task::Reverse.sft(4000, 11, false, 0.0)).unwrap();
    save_jsonl(&eval, &Task::Reverse.sft(200, 11, true, 0.0)).unwrap();
    let out = d.path().join("run");
    let r = run(&["sft", "--data", train.to_str().unwrap(), "--eval-data", eval.to_str().unwrap(), "--strategy", "naive", "--eval-every", "0"], &out);
    let em = r["sft"]["heldout_exact_match"].as_f64().unwrap();
    assert!(em >= 0.95, "held-out exact match {em}: {r}");
}

#[test]
fn rm_sort_ranks_held_out_pairs() {
    let d = tempfile::tempdir().unwrap();
    // Naive and chunked compute the same values (the parity test); naive is quicker here.
    let r = run(&["rm", "--task", "sort", "--eval-every", "0", "--strategy", "naive"], d.path());
    let acc = r["rm"]["heldout_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.90, "held-out pairwise accuracy {acc}: {r}");
}

#[test]
fn resuming_gives_the_same_model_as_training_straight() {
    let d = tempfile::tempdir().unwrap();
    let straight = d.path().join("straight");
    let split = d.path().join("split");
    let common = ["sft", "--task", "add", "--model", "2x32x4", "--eval-every", "0", "--eval-size", "4", "--batch-size", "4", "--steps", "8"];
    run(&common, &straight);
    // Interrupted after step 4 (a checkpoint is saved there), then resumed to step 8.
    run(&[&common[..], &["--stop-at", "4"]].concat(), &split);
    let stopped = stowage_harness::ckpt::CkptPaths::new(split.join("checkpoint")).read_config().unwrap();
    assert_eq!(stopped.step, 4);
    run(&[&common[..], &["--resume"]].concat(), &split);
    let a = stowage_harness::ckpt::load_tensors(&straight.join("checkpoint/model.safetensors")).unwrap();
    let b = stowage_harness::ckpt::load_tensors(&split.join("checkpoint/model.safetensors")).unwrap();
    for (k, v) in &a {
        assert!(v.equal(&b[k]), "{k} differs");
    }
}

/// PPO stopped part-way (`--stop-at`) and resumed ends with the same actor, bit for bit, as a
/// run straight through: the actor's and critic's weights and moments, the KL coefficient, the
/// reward-normalisation moments and the iteration-keyed draws all carry over.
#[test]
fn ppo_resumed_after_a_stop_matches_a_straight_run() {
    let d = tempfile::tempdir().unwrap();
    let small = ["--task", "sort", "--model", "2x32x4", "--batch-size", "4", "--eval-size", "4", "--eval-every", "0"];
    run(&[&["sft", "--steps", "10"], &small[..]].concat(), &d.path().join("sft"));
    run(&[&["rm", "--steps", "10"], &small[..]].concat(), &d.path().join("rm"));
    let (actor, rm) = (d.path().join("sft/checkpoint"), d.path().join("rm/checkpoint"));
    let common = [
        &["ppo", "--steps", "4", "--max-new", "6", "--kl-target", "1", "--actor", actor.to_str().unwrap(), "--reward-model", rm.to_str().unwrap()],
        &small[..],
    ]
    .concat();
    let (straight, split) = (d.path().join("straight"), d.path().join("split"));
    let a = run(&common, &straight);
    let stopped = run(&[&common[..], &["--stop-at", "2"]].concat(), &split);
    assert_eq!(stopped["ppo"]["stopped_at"], 2, "{stopped}");
    let state: Value = serde_json::from_slice(&std::fs::read(split.join("checkpoint/ppo_state.json")).unwrap()).unwrap();
    assert_eq!(state["iteration"], 2, "{state}");
    assert!(state["reward_moments"]["count"].as_f64().unwrap() == 8.0, "{state}");
    for f in ["actor/model.safetensors", "actor/optimizer.safetensors", "critic/model.safetensors", "critic/optimizer.safetensors"] {
        assert!(split.join("checkpoint").join(f).exists(), "{f}");
    }
    let b = run(&[&common[..], &["--resume"]].concat(), &split);
    assert_eq!(a["ppo"]["gold_reward_after"], b["ppo"]["gold_reward_after"], "{a}\n{b}");
    assert_eq!(a["ppo"]["gold_reward_before"], b["ppo"]["gold_reward_before"], "{a}\n{b}");
    let x = stowage_harness::ckpt::load_tensors(&straight.join("actor/model.safetensors")).unwrap();
    let y = stowage_harness::ckpt::load_tensors(&split.join("actor/model.safetensors")).unwrap();
    assert_eq!(x.len(), y.len());
    for (k, v) in &x {
        assert!(v.equal(&y[k]), "{k} differs");
    }
    // Iterations 1-2 from the first run, 3-4 from the resumed one: four lines, in order.
    let steps: Vec<u64> = std::fs::read_to_string(split.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"reward_mean\""))
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    // A PPO checkpoint missing its state is refused with the file named.
    std::fs::remove_file(split.join("checkpoint/ppo_state.json")).unwrap();
    let o = stowage().args(&common).args(["--resume", "--quiet", "--out"]).arg(&split).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("ppo_state.json"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The four PPO models taking turns with one device and host budget (chunks spilling to NVMe)
/// train exactly as with fixed shares of it: where chunks live changes no number. And turns
/// are taken: models give memory back to one another.
#[test]
fn ppo_models_taking_turns_with_the_budgets_train_as_with_fixed_shares() {
    let d = scratch();
    let small = ["--task", "sort", "--model", "2x32x4", "--batch-size", "4", "--eval-size", "4", "--eval-every", "0"];
    run(&[&["sft", "--steps", "4"], &small[..]].concat(), &d.path().join("sft"));
    run(&[&["rm", "--steps", "4"], &small[..]].concat(), &d.path().join("rm"));
    let (actor, rm) = (d.path().join("sft/checkpoint"), d.path().join("rm/checkpoint"));
    let ppo = |out: &str, extra: &[&str]| {
        let nvme = d.path().join(format!("{out}-swap"));
        let args: Vec<&str> = [
            &["ppo", "--steps", "2", "--max-new", "6", "--actor", actor.to_str().unwrap(), "--reward-model", rm.to_str().unwrap()][..],
            &["--device-budget", "1M", "--host-budget", "1M", "--nvme-dir", nvme.to_str().unwrap()],
            &small[..],
            extra,
        ]
        .concat();
        let r = run(&args, &d.path().join(out));
        let w = stowage_harness::ckpt::load_tensors(&d.path().join(out).join("actor/model.safetensors")).unwrap();
        (r, w)
    };
    let (turns, a) = ppo("turns", &["--budget-split", "turns"]);
    let (fixed, b) = ppo("fixed", &["--budget-split", "fixed"]);
    assert!(turns["memory"]["budget_turns"]["releases"].as_u64().unwrap() > 0, "no model gave memory back: {turns}");
    // Actor and critic updated in the background (clipping: after their backward passes) while
    // the next model took its turn.
    assert!(turns["memory"]["budget_turns"]["background_updates"].as_u64().unwrap() > 0, "no update ran in the background: {turns}");
    assert!(fixed["memory"].get("budget_turns").is_none(), "{fixed}");
    // The actor's parameters fit in a third of the budgets: auto keeps fixed shares.
    let (auto, _) = ppo("auto", &[]);
    assert!(auto["memory"].get("budget_turns").is_none(), "{auto}");
    let to_nvme = |r: &Value| ["host->nvme", "device->nvme"].iter().map(|l| r["memory"]["bytes_moved"][l].as_u64().unwrap_or(0)).sum::<u64>();
    assert!(to_nvme(&turns) > 0 && to_nvme(&fixed) > 0, "nothing spilled to NVMe: {turns}\n{fixed}");
    assert_eq!(turns["ppo"]["gold_reward_after"], fixed["ppo"]["gold_reward_after"]);
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert!(v.equal(&b[k]), "{k} differs between shared and fixed budgets");
    }
    // Decoding through a bf16 copy (its chunks claimed, spilled and dropped like the others):
    // where they live changes no number either.
    let bf16 = ["--gen-dtype", "bf16"];
    let (turns16, a16) = ppo("turns-bf16", &[&["--budget-split", "turns"][..], &bf16].concat());
    let (fixed16, b16) = ppo("fixed-bf16", &[&["--budget-split", "fixed"][..], &bf16].concat());
    assert_eq!(turns16["ppo"]["gold_reward_after"], fixed16["ppo"]["gold_reward_after"]);
    for (k, v) in &a16 {
        assert!(v.equal(&b16[k]), "{k} differs between shared and fixed budgets (bf16 decoding)");
    }
}

/// `--trace`: a Chrome trace with the model's process, a compute track and link tracks, and the
/// hidden share in the report.
#[test]
fn trace_records_compute_and_transfers() {
    let d = scratch();
    let trace = d.path().join("t.json");
    let r = run(
        &["rm", "--task", "sort", "--model", "2x32x4", "--steps", "6", "--batch-size", "4", "--eval-size", "4", "--eval-every", "0", "--device-budget", "256K", "--trace", trace.to_str().unwrap()],
        &d.path().join("run"),
    );
    let share = r["memory"]["transfer_hidden_share"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&share), "{r}");
    let t: Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let ev = t["traceEvents"].as_array().unwrap();
    let names: Vec<&str> = ev.iter().filter(|e| e["ph"] == "M").filter_map(|e| e["args"]["name"].as_str()).collect();
    assert!(names.contains(&"rm") && names.contains(&"compute") && names.iter().any(|n| n.contains("->")), "{names:?}");
    let spans = ev.iter().filter(|e| e["ph"] == "X").count();
    assert!(spans > 20 && ev.iter().filter(|e| e["ph"] == "X").all(|e| e["dur"].as_f64().unwrap() >= 0.0), "{spans} spans");
}

#[test]
fn bad_inputs_get_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\":\"a\",\"completion\":\"b\"}\n{\"prompt\":\"a\"\n").unwrap();
    let e = fails(&["sft", "--data", bad.to_str().unwrap(), "--eval-data", bad.to_str().unwrap()]);
    assert!(e.contains("bad.jsonl:2"), "{e}");
    let e = fails(&["sft", "--task", "sort", "--model", "huge"]);
    assert!(e.contains("unknown model `huge`"), "{e}");
    let e = fails(&["sft"]);
    assert!(e.contains("--task") && e.contains("--data"), "{e}");
    // A model whose state exceeds device + host with no NVMe tier.
    let e = fails(&["sft", "--task", "sort", "--model", "s", "--device", "sim", "--device-budget", "1G", "--host-budget", "256M"]);
    assert!(e.contains("budgets are device") && e.contains("NVMe"), "{e}");
    let e = fails(&["sft", "--task", "sort", "--lora-alpha", "16"]);
    assert!(e.contains("--lora-alpha") && e.contains("--lora-rank"), "{e}");
    // A LoRA checkpoint whose adapters have lost their pair is refused when loaded, naming it.
    let ck = d.path().join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    let a = tch::Tensor::zeros([4, 2], (tch::Kind::Float, tch::Device::Cpu));
    stowage_harness::ckpt::save_tensors(&ck.join("model.safetensors"), &[("h.0.mlp.c_fc.lora_a".into(), a)]).unwrap();
    std::fs::write(ck.join("config.json"), r#"{"model":{"name":"t","n_layer":1,"n_embd":4,"n_head":1,"n_ctx":8,"vocab":259},"head":"lm","tokenizer":"byte","step":1,"seed":0,"lora":{"rank":2,"alpha":2.0}}"#).unwrap();
    let e = fails(&["rm", "--task", "sort", "--init", ck.to_str().unwrap()]);
    assert!(e.contains("h.0.mlp.c_fc.lora_b") && e.contains("model.safetensors"), "{e}");
}

/// The whole pipeline end to end at toy lengths: every stage runs and the report has the
/// sections and figures the README documents (learning itself is measured in the issue notes).
#[test]
fn pipeline_runs_end_to_end_and_reports() {
    let d = tempfile::tempdir().unwrap();
    let r = run(
        &["pipeline", "--task", "sort", "--model", "2x32x4", "--sft-steps", "20", "--rm-steps", "20", "--ppo-steps", "3", "--batch-size", "8", "--eval-size", "8", "--max-new", "8", "--ptx-coef", "0.5", "--pairs-prompts", "64"],
        d.path(),
    );
    for k in ["final_loss", "heldout_exact_match"] {
        assert!(r["sft"][k].is_number(), "sft.{k}: {r}");
    }
    assert!(r["rm"]["heldout_accuracy"].is_number(), "{r}");
    for k in ["gold_reward_before", "gold_reward_after", "kl_final"] {
        assert!(r["ppo"][k].is_number(), "ppo.{k}: {r}");
    }
    for k in ["peak_rss_bytes", "device_peak_bytes"] {
        assert!(r["memory"][k].as_u64().unwrap() > 0, "memory.{k}: {r}");
    }
    let metrics = std::fs::read_to_string(d.path().join("ppo/metrics.jsonl")).unwrap();
    // The last iteration's line (held-out gold rewards are logged on lines of their own).
    let last: Value = serde_json::from_str(metrics.lines().rev().find(|l| l.contains("\"reward_mean\"")).unwrap()).unwrap();
    let held: Vec<Value> = metrics.lines().filter(|l| l.contains("gold_reward_heldout")).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(held.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 3], "held-out gold before and after");
    for k in ["reward_mean", "reward_std", "kl", "entropy", "approx_kl", "clipfrac", "policy_loss", "value_loss", "explained_variance", "response_length", "eos_rate", "generation_s", "training_s", "tokens_per_s", "ptx_loss"] {
        assert!(last[k].is_number(), "{k} missing from {last}");
    }
    // All stages' metrics in one file, and the charts.
    let all = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    for stage in ["sft", "rm", "ppo"] {
        assert!(all.contains(&format!("\"stage\":\"{stage}\"")), "no {stage} lines in metrics.jsonl");
    }
    for png in ["loss.png", "reward.png", "kl.png"] {
        let b = std::fs::read(d.path().join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(b.starts_with(b"\x89PNG") && b.len() > 5000, "{png}: {} bytes", b.len());
    }
    let samples = std::fs::read_to_string(d.path().join("samples.jsonl")).unwrap();
    let s: Value = serde_json::from_str(samples.lines().next().unwrap()).unwrap();
    assert!(s["prompt"].is_string() && s["response"].is_string() && s["gold_reward"].is_number(), "{s}");
}

/// The pipeline's reward model starts from the SFT model (InstructGPT's recipe): with no RM
/// step taken, its transformer body is the SFT checkpoint's, tensor for tensor, under a new
/// score head (also when `--rm-model` spells the policy's size another way); `--rm-init
/// random` starts it elsewhere.
#[test]
fn the_pipeline_reward_model_starts_from_the_sft_model() {
    let load = |p: std::path::PathBuf| stowage_harness::ckpt::load_tensors(&p).unwrap();
    let body = |d: &Path, models: [&str; 2], init: &str| {
        let r = run(
            &[
                "pipeline", "--task", "sort", "--model", models[0], "--rm-model", models[1], "--sft-steps", "3", "--rm-steps", "0", "--ppo-steps", "0", "--batch-size", "4", "--eval-size", "4", "--max-new", "4",
                "--pairs-prompts", "8", "--rm-init", init,
            ],
            d,
        );
        assert_eq!(r["rm"]["steps"], 0, "{r}");
        (load(d.join("sft/checkpoint/model.safetensors")), load(d.join("rm/checkpoint/model.safetensors")))
    };
    let d = tempfile::tempdir().unwrap();
    let (sft, rm) = body(&d.path().join("sft-init"), ["tiny", "4x128x4"], "sft");
    assert!(rm.keys().any(|n| n.starts_with("score.")) && !sft.keys().any(|n| n.starts_with("score.")));
    assert!(sft.len() > 10 && sft.contains_key("h.1.mlp.c_proj.weight"), "{:?}", sft.keys());
    for (n, t) in &sft {
        let got = rm.get(n).unwrap_or_else(|| panic!("the reward model has no {n}"));
        assert!(got.equal(t), "{n} differs between the SFT model and the untrained reward model");
    }
    let (sft, rm) = body(&d.path().join("random-init"), ["2x32x4", "2x32x4"], "random");
    let n = "h.0.attn.c_attn.weight";
    assert!(!rm[n].equal(&sft[n]), "--rm-init random gave the SFT model's {n}");
}

/// LoRA through the command line: a reward model's adapters (and its new score head) train
/// over a frozen base whose chunks spill to NVMe. The base tensors in the checkpoint are the
/// ones training started from, the optimizer holds moments of the trained tensors only, the
/// merged model is a plain GPT-2 checkpoint, and resuming with other LoRA settings is refused.
#[test]
fn lora_reward_model_trains_adapters_over_a_frozen_base() {
    let d = scratch();
    let nvme = d.path().join("swap");
    let common = [
        "rm", "--task", "sort", "--eval-every", "0", "--lora-rank", "8", "--steps", "120", "--batch-size", "16", "--lr", "2e-3", "--device-budget", "2M", "--host-budget", "2M",
        "--nvme-dir", nvme.to_str().unwrap(),
    ];
    let first = d.path().join("first");
    run(&[&common[..], &["--stop-at", "1"]].concat(), &first);
    let out = d.path().join("run");
    let r = run(&common, &out);
    let acc = r["rm"]["heldout_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.7, "held-out pairwise accuracy {acc}: {r}");
    assert!(r["memory"]["bytes_moved"]["nvme->device"].as_u64().unwrap_or(0) > 0, "no chunk came from NVMe: {r}");

    let load = |p: &Path| stowage_harness::ckpt::load_tensors(p).unwrap();
    let (start, end) = (load(&first.join("checkpoint/model.safetensors")), load(&out.join("checkpoint/model.safetensors")));
    let trained = |n: &str| n.ends_with(".lora_a") || n.ends_with(".lora_b") || n.starts_with("score.");
    assert!(end.keys().any(|n| n.ends_with(".lora_b")));
    for (name, t) in &end {
        if trained(name) {
            // B starts at zero, and every trained tensor moves in 119 steps.
            assert!(!t.equal(&start[name]), "{name} did not train");
        } else {
            assert!(t.equal(&start[name]), "{name} belongs to the frozen base but changed");
        }
    }
    let moments = load(&out.join("checkpoint/optimizer.safetensors"));
    assert!(!moments.is_empty() && moments.keys().all(|n| trained(n.trim_end_matches(".exp_avg_sq").trim_end_matches(".exp_avg"))), "moments of frozen tensors: {:?}", moments.keys().collect::<Vec<_>>());

    let merged = stowage_harness::ckpt::CkptPaths::new(out.join("merged"));
    assert!(merged.read_config().unwrap().lora.is_none());
    let m = load(&merged.model());
    assert_eq!(m.len(), end.len() - 8 * 4, "the 4 blocks' 8 adapters folded in");
    assert!(!m["h.0.attn.c_attn.weight"].equal(&end["h.0.attn.c_attn.weight"]), "the merged weight includes the adapters' product");

    let other: Vec<&str> = common.iter().map(|&x| if x == "8" { "4" } else { x }).collect();
    let o = stowage()
        .args(&other)
        .args(["--resume", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("LoRA rank 8") && e.contains("--lora-rank"), "{e}");
}
