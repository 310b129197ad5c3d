//! The chunked strategy computes what plain autograd computes.

use stowage_memory::{DeviceChoice, DType, NvmeConfig, PolicyKind, TiersConfig};
use tch::{Kind, Tensor};

use super::*;
use crate::model::GptConfig;

fn lm_loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = logits.size()[2];
    logits.reshape([-1, v]).cross_entropy_loss::<Tensor>(&targets.reshape([-1]), None, tch::Reduction::Mean, -100, 0.0)
}

fn batches(vocab: i64, n: usize) -> Vec<(Tensor, Tensor)> {
    tch::manual_seed(99);
    (0..n)
        .map(|_| {
            let x = Tensor::randint(vocab, [4, 12], (Kind::Int64, tch::Device::Cpu));
            // A learnable target: the next token is the current one plus one.
            let y = (&x + 1).remainder(vocab);
            (x, y)
        })
        .collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-6)
}

fn parity(max_norm: Option<f32>, policy: PolicyKind, nvme: Option<&std::path::Path>, keep_graph: bool) {
    let cfg = GptConfig::parse("3x64x4", 61, 16).unwrap();
    parity_of(ModelSpec::new(cfg, HeadKind::Lm), max_norm, policy, nvme, keep_graph);
}

/// The chunked strategy against naive on `spec`, 20 steps: losses, gradient norms and final
/// parameters agree. Returns (naive, chunked) after training.
fn parity_of(spec: ModelSpec, max_norm: Option<f32>, policy: PolicyKind, nvme: Option<&std::path::Path>, keep_graph: bool) -> (Naive, Chunked) {
    let opts = TrainOpts {
        dtype: DType::F32,
        adam: stowage_memory::optim::AdamConfig { lr: 3e-3, ..Default::default() },
        max_norm,
        ..TrainOpts::default()
    };
    let mut naive = Naive::new(spec.clone(), tch::Device::Cpu, opts, 5).unwrap();
    // The device holds half the model state (keep mode: 16 bytes per parameter, so that every
    // parameter chunk and a unit's gradients fit at once, padding included, but not the
    // optimizer state): chunks stream in and out every step.
    let trained = spec.trainable_numel();
    let state = trained * 16 + (spec.numel() - trained) * 4;
    // LoRA's state is mostly parameters: keep mode needs room for them all and a unit's
    // gradients, and chunks are smaller so that a block's fit in half the state.
    let lora = spec.lora.is_some();
    let device = match (keep_graph, lora) {
        (true, true) => 2 * state,
        (true, false) => state,
        (false, _) => state / 2,
    };
    let chunk_elems = if lora { 4096 } else { 16 * 1024 };
    let mut tiers = TiersConfig::default().with_device(DeviceChoice::Simulated, device).with_host_budget(if nvme.is_some() { state / 2 } else { 2 * state });
    if let Some(d) = nvme {
        tiers = tiers.with_nvme(NvmeConfig::new(d));
    }
    let copts = ChunkedOpts {
        tiers,
        policy,
        chunk_elems: Some(chunk_elems),
        keep_graph,
        ..ChunkedOpts::default()
    };
    let mut chunked = Chunked::new(spec.clone(), opts, copts, 5).unwrap();
    assert_eq!(chunked.keeps_graph(), keep_graph);
    for (i, (x, y)) in batches(61, 20).iter().enumerate() {
        let f = |out: &Tensor| lm_loss(out, y);
        let a = naive.step(x, &f).unwrap();
        let b = chunked.step(x, &f).unwrap();
        assert!(close(a.loss, b.loss, 1e-5), "step {i}: loss naive {} chunked {}", a.loss, b.loss);
        assert!(close(a.grad_norm, b.grad_norm, 1e-4), "step {i}: grad norm naive {} chunked {}", a.grad_norm, b.grad_norm);
    }
    let pa = naive.export().unwrap();
    let pb = chunked.export().unwrap();
    assert_eq!(pa.len(), pb.len());
    let d = 64;
    for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        let (ta, tb) = if na.ends_with("attn.c_attn.bias") {
            // The key bias shifts every score of a query's row alike, which softmax ignores: its
            // exact gradient is zero, and Adam normalises the float noise in its place into
            // lr-sized steps of random sign. Both strategies' values there are rounding noise,
            // bounded by lr x steps; the query and value biases must match like the rest.
            let key = (ta.narrow(0, d, d) - tb.narrow(0, d, d)).abs().max().double_value(&[]);
            assert!(key <= 2.0 * 3e-3 * 20.0, "{na}: key-bias difference {key} exceeds 2 lr x steps");
            (Tensor::cat(&[ta.narrow(0, 0, d), ta.narrow(0, 2 * d, d)], 0), Tensor::cat(&[tb.narrow(0, 0, d), tb.narrow(0, 2 * d, d)], 0))
        } else {
            (ta.shallow_clone(), tb.shallow_clone())
        };
        let diff = (&ta - &tb).abs().max().double_value(&[]);
        let scale = ta.abs().max().double_value(&[]).max(1e-3);
        // Adapters start at B = 0, where Adam's first steps normalise gradients that are
        // rounding-sized in places: their agreement is looser, still far below one lr step.
        let tol = if crate::model::is_adapter(na) { 1e-4 } else { 1e-5 };
        assert!(diff <= tol * scale, "{na}: max difference {diff} (scale {scale})");
    }
    let moved = chunked.memory().bytes_moved;
    if spec.lora.is_none() {
        assert!(moved.get("device->host").copied().unwrap_or(0) > 0, "the device budget should force evictions: {moved:?}");
    }
    if !keep_graph {
        // Every step reads the parameters back in.
        let params = spec.numel() * 4;
        assert!(moved.values().sum::<u64>() > 10 * params, "the device budget should make chunks stream: {moved:?}");
    }
    (naive, chunked)
}

/// LoRA: adapters train over a frozen base, identically in both strategies (with the device
/// holding half the state, so chunks stream); the base never changes, and the chunked
/// strategy holds no gradient, master or moment bytes for it.
fn lora_parity(max_norm: Option<f32>, head_kind: HeadKind, keep_graph: bool) {
    let cfg = GptConfig::parse("3x64x4", 61, 16).unwrap();
    let lora = crate::model::LoraConfig { rank: 4, alpha: 8.0 };
    let spec = ModelSpec::with_lora(cfg.clone(), head_kind, Some(lora));
    let mut fresh = Naive::new(spec.clone(), tch::Device::Cpu, TrainOpts::default(), 5).unwrap();
    let before: BTreeMap<String, Tensor> = fresh.export().unwrap().into_iter().collect();
    let (mut naive, mut chunked) = if head_kind == HeadKind::Lm {
        parity_of(spec.clone(), max_norm, PolicyKind::Auto, None, keep_graph)
    } else {
        score_parity(spec.clone(), keep_graph)
    };
    for e in [&mut naive as &mut dyn Engine, &mut chunked] {
        for (name, t) in e.export().unwrap() {
            let frozen = !spec.params.iter().find(|s| s.name == name).unwrap().trainable;
            assert_eq!(frozen, t.equal(&before[&name]), "{name}: frozen {frozen}, but it {} changed", if frozen { "" } else { "never" });
        }
        let (_, moments) = e.export_optimizer().unwrap();
        assert_eq!(moments.len(), 2 * spec.params.iter().filter(|s| s.trainable).count(), "moments of the trainable tensors only");
    }
    let fp = chunked.footprint();
    let trained = spec.trainable_numel() * 4;
    assert!(fp.per_role["grad"] >= trained && fp.per_role["grad"] < spec.numel(), "gradient chunks hold the adapters only: {:?}", fp.per_role);
    assert_eq!(fp.per_role["grad"], fp.per_role["exp_avg"]);
    // The adapted model merges into a plain one computing the same.
    let mut merged: BTreeMap<String, Tensor> = chunked.export().unwrap().into_iter().collect();
    crate::model::merge_lora(&mut merged, lora).unwrap();
    let mut plain = Naive::new(ModelSpec::new(cfg, head_kind), tch::Device::Cpu, TrainOpts::default(), 0).unwrap();
    plain.import(&merged).unwrap();
    let x = &batches(61, 1)[0].0;
    let (a, b) = (chunked.forward(x).unwrap(), plain.forward(x).unwrap());
    let diff = (&a - &b).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "merged model differs by {diff}");
}

/// Parity for a scalar head (the reward model's pairwise loss on the last position).
fn score_parity(spec: ModelSpec, keep_graph: bool) -> (Naive, Chunked) {
    let opts = TrainOpts {
        adam: stowage_memory::optim::AdamConfig { lr: 3e-3, ..Default::default() },
        ..TrainOpts::default()
    };
    let mut naive = Naive::new(spec.clone(), tch::Device::Cpu, opts, 5).unwrap();
    let trained = spec.trainable_numel();
    let state = trained * 16 + (spec.numel() - trained) * 4;
    let copts = ChunkedOpts {
        tiers: TiersConfig::default().with_device(DeviceChoice::Simulated, if keep_graph { 2 * state } else { state / 2 }).with_host_budget(2 * state),
        chunk_elems: Some(4096),
        keep_graph,
        ..ChunkedOpts::default()
    };
    let mut chunked = Chunked::new(spec, opts, copts, 5).unwrap();
    assert_eq!(chunked.keeps_graph(), keep_graph);
    for (i, (x, y)) in batches(61, 10).iter().enumerate() {
        // Higher scores for sequences whose last token is larger.
        let f = |out: &Tensor| {
            let last = out.select(1, -1);
            let want = y.select(1, -1).to_kind(Kind::Float) / 61.0;
            (last - want).square().mean(Kind::Float)
        };
        let a = naive.step(x, &f).unwrap();
        let b = chunked.step(x, &f).unwrap();
        assert!(close(a.loss, b.loss, 1e-5), "step {i}: loss naive {} chunked {}", a.loss, b.loss);
        assert!(close(a.grad_norm, b.grad_norm, 1e-4), "step {i}: grad norm naive {} chunked {}", a.grad_norm, b.grad_norm);
    }
    (naive, chunked)
}

#[test]
fn lora_chunked_matches_naive_with_the_base_frozen() {
    lora_parity(Some(1.0), HeadKind::Lm, false);
}

#[test]
fn lora_chunked_keeping_the_forward_graph_matches_naive() {
    lora_parity(None, HeadKind::Lm, true);
}

#[test]
fn lora_reward_model_trains_its_score_head_in_full() {
    lora_parity(Some(1.0), HeadKind::Score, false);
}

#[test]
fn chunked_matches_naive_with_clipping() {
    parity(Some(1.0), PolicyKind::Auto, None, false);
}

#[test]
fn chunked_keeping_the_forward_graph_matches_naive() {
    parity(Some(1.0), PolicyKind::Auto, None, true);
}

#[test]
fn chunked_matches_naive_with_updates_overlapping_backward() {
    parity(None, PolicyKind::Optimal, None, false);
}

#[test]
fn chunked_matches_naive_through_nvme() {
    let dir = tempfile::Builder::new().prefix("stowage-parity").tempdir_in(std::env::var("STOWAGE_SCRATCH").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    parity(Some(1.0), PolicyKind::Auto, Some(dir.path()), false);
}

#[test]
fn a_model_that_cannot_fit_names_bytes_per_tier() {
    let cfg = GptConfig::parse("3x64x4", 61, 16).unwrap();
    let spec = ModelSpec::new(cfg, HeadKind::Lm);
    let state = spec.numel() * 16;
    let copts = ChunkedOpts {
        tiers: TiersConfig::default().with_device(DeviceChoice::Simulated, state / 3).with_host_budget(state / 4),
        chunk_elems: Some(16 * 1024),
        ..ChunkedOpts::default()
    };
    let e = Chunked::new(spec.clone(), TrainOpts::default(), copts, 0).err().expect("must not fit").to_string();
    assert!(e.contains("budgets are device") && e.contains("host") && e.contains("NVMe"), "{e}");
    let copts = ChunkedOpts {
        tiers: TiersConfig::default().with_device(DeviceChoice::Simulated, 200 << 10).with_host_budget(state * 2),
        chunk_elems: Some(16 * 1024),
        ..ChunkedOpts::default()
    };
    let e = Chunked::new(spec, TrainOpts::default(), copts, 0).err().expect("must not fit").to_string();
    assert!(e.contains("the device needs at least") && e.contains("--device-budget"), "{e}");
}

fn low_precision_learns(dtype: DType) -> Vec<StepStats> {
    let cfg = GptConfig::parse("2x64x4", 61, 16).unwrap();
    let spec = ModelSpec::new(cfg, HeadKind::Lm);
    let opts = TrainOpts {
        dtype,
        adam: stowage_memory::optim::AdamConfig { lr: 3e-3, ..Default::default() },
        max_norm: Some(1.0),
        ..TrainOpts::default()
    };
    let state = spec.numel() * 16;
    let copts = ChunkedOpts {
        tiers: TiersConfig::default().with_device(DeviceChoice::Simulated, state / 2).with_host_budget(2 * state),
        chunk_elems: Some(16 * 1024),
        ..ChunkedOpts::default()
    };
    let mut m = Chunked::new(spec, opts, copts, 1).unwrap();
    let data = batches(61, 60);
    let stats: Vec<StepStats> = data.iter().map(|(x, y)| m.step(x, &|o: &Tensor| lm_loss(o, y)).unwrap()).collect();
    let losses: Vec<f64> = stats.iter().map(|s| s.loss).collect();
    let head: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let tail: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(tail < head * 0.7, "{dtype:?} training did not learn: {head} -> {tail}");
    stats
}

#[test]
fn bf16_chunked_training_learns() {
    let s = low_precision_learns(DType::BF16);
    assert!(s.iter().all(|s| !s.skipped), "bf16 needs no loss scaling: nothing is skipped");
}

#[test]
fn fp16_chunked_training_learns_with_loss_scaling() {
    // The scaler starts at 2^16: the first steps overflow in fp16 and are skipped (state
    // untouched) until the scale backs off, as in any dynamic-scaling trainer.
    let s = low_precision_learns(DType::F16);
    let skipped = s.iter().filter(|s| s.skipped).count();
    assert!(skipped < 20, "{skipped} of {} steps skipped", s.len());
}

/// An update left running in the background (with clipping it needs the global norm, so it
/// runs after the backward pass) trains exactly as one finished before `step` returns: the same
/// parameters bit for bit, chunks streaming through NVMe, in bf16 (16-bit parameters written
/// from the masters) and fp32.
#[test]
fn background_updates_train_exactly_as_updates_in_place() {
    let dir = tempfile::Builder::new().prefix("stowage-defer").tempdir_in(std::env::var("STOWAGE_SCRATCH").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let cfg = GptConfig::parse("3x64x4", 61, 16).unwrap();
    let spec = ModelSpec::new(cfg, HeadKind::Lm);
    let state = spec.numel() * 16;
    let data = batches(61, 6);
    for dtype in [DType::F32, DType::BF16] {
        let run = |defer: bool| {
            let opts = TrainOpts {
                dtype,
                adam: stowage_memory::optim::AdamConfig { lr: 3e-3, ..Default::default() },
                max_norm: Some(1.0),
                ..TrainOpts::default()
            };
            let copts = ChunkedOpts {
                tiers: TiersConfig::default().with_device(DeviceChoice::Simulated, state / 2).with_host_budget(state / 4).with_nvme(NvmeConfig::new(dir.path())),
                chunk_elems: Some(16 * 1024),
                keep_graph: false,
                defer_update: defer,
                ..ChunkedOpts::default()
            };
            let mut m = Chunked::new(spec.clone(), opts, copts, 3).unwrap();
            let mut background = 0;
            let mut losses = Vec::new();
            for (i, (x, y)) in data.iter().enumerate() {
                // A learning-rate change between steps applies from the next step on, not to an
                // update still running.
                m.set_lr(3e-3 / (i + 1) as f32);
                losses.push(m.step(x, &|o: &Tensor| lm_loss(o, y)).unwrap().loss);
                // A progress line's memory figures do not wait for the update.
                let _ = m.memory();
                background += m.updating_in_background() as usize;
            }
            (m.export().unwrap(), losses, background, m.memory().bytes_moved)
        };
        let (a, la, bg_a, moved) = run(false);
        let (b, lb, bg_b, _) = run(true);
        assert_eq!(bg_a, 0, "{dtype:?}: in place means no background update");
        assert_eq!(bg_b, data.len(), "{dtype:?}: every update ran in the background");
        assert!(moved.iter().any(|(k, &v)| k.ends_with("->nvme") && v > 0), "{dtype:?}: chunks should reach NVMe: {moved:?}");
        assert_eq!(la, lb, "{dtype:?}: losses");
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{dtype:?} {na}: parameters differ");
        }
    }
}

/// One generation's logits: the prompt `[B, P]` at once, then each of `tokens`' columns as a
/// single decoded token.
fn decode_logits(e: &mut dyn Engine, prompt: &Tensor, tokens: &Tensor) -> Vec<Tensor> {
    e.claim_parameters().unwrap();
    let mut cache: Vec<crate::model::KvCache> = (0..e.spec().cfg.n_layer).map(|_| Default::default()).collect();
    let mut out = vec![e.forward_cached(prompt, &mut cache, 0).unwrap()];
    let p = prompt.size()[1];
    for k in 0..tokens.size()[1] {
        out.push(e.forward_cached(&tokens.narrow(1, k, 1), &mut cache, p + k).unwrap());
    }
    e.end_generation().unwrap();
    out
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Decoding through a bf16 copy (`gen_dtype`), with chunks streaming through NVMe: the prompt
/// reads the fp32 parameters (exactly fp32's logits), single tokens the copy (naive's bf16
/// copy's logits, close to fp32's but not equal to them: the copy is what is read); after a
/// step the next generation decodes the new weights (the copy is never stale), and when it
/// ends no chunk of the copy remains in any tier.
#[test]
fn decoding_through_a_bf16_copy_matches_naive_and_is_never_stale() {
    let dir = tempfile::Builder::new().prefix("stowage-decode").tempdir_in(std::env::var("STOWAGE_SCRATCH").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let cfg = GptConfig::parse("3x64x4", 61, 16).unwrap();
    let spec = ModelSpec::new(cfg, HeadKind::Lm);
    let opts = TrainOpts {
        adam: stowage_memory::optim::AdamConfig { lr: 1e-2, ..Default::default() },
        ..TrainOpts::default()
    };
    let copy = TrainOpts { gen_dtype: Some(DType::BF16), ..opts };
    let mut fp32 = Naive::new(spec.clone(), tch::Device::Cpu, opts, 5).unwrap();
    let mut naive = Naive::new(spec.clone(), tch::Device::Cpu, copy, 5).unwrap();
    // A quarter of the state on the device and on the host: the copy (an eighth of it) and
    // the parameters stream.
    let state = spec.numel() * 18;
    let copts = ChunkedOpts {
        tiers: TiersConfig::default().with_device(DeviceChoice::Simulated, state / 4).with_host_budget(state / 4).with_nvme(NvmeConfig::new(dir.path())),
        chunk_elems: Some(8 * 1024),
        keep_graph: false,
        ..ChunkedOpts::default()
    };
    let mut chunked = Chunked::new(spec, copy, copts, 5).unwrap();
    tch::manual_seed(7);
    let prompt = Tensor::randint(61, [4, 5], (Kind::Int64, tch::Device::Cpu));
    let tokens = Tensor::randint(61, [4, 6], (Kind::Int64, tch::Device::Cpu));
    let copy_group = (0..8).find(|&g| chunked.manager().group_name(g).ends_with(".decode")).expect("a group for the copy");
    for (round, (x, y)) in batches(61, 3).iter().enumerate() {
        let want = decode_logits(&mut fp32, &prompt, &tokens);
        let a = decode_logits(&mut naive, &prompt, &tokens);
        let b = decode_logits(&mut chunked, &prompt, &tokens);
        assert!(max_diff(&want[0], &a[0]) == 0.0 && max_diff(&want[0], &b[0]) < 1e-5, "round {round}: the prompt reads the fp32 weights");
        for k in 1..want.len() {
            let (to_naive, to_fp32) = (max_diff(&a[k], &b[k]), max_diff(&want[k], &b[k]));
            // The same bf16 weights give the same logits; after steps the two strategies' fp32
            // weights differ in the last bits (their AdamW kernels), which can round a weight
            // to a neighbouring bf16 value: a few bf16 steps at most, where a copy left from
            // before the step would be off by 0.8 and more.
            let tol = if round == 0 { 0.0 } else { 2e-2 };
            assert!(to_naive <= tol, "round {round}, token {k}: chunked and naive bf16 decoding differ by {to_naive}");
            assert!(to_fp32 > 1e-6 && to_fp32 < 0.1, "round {round}, token {k}: bf16 decoding is {to_fp32} from fp32's");
        }
        for c in chunked.manager().chunks(copy_group, stowage_memory::Role::Param) {
            assert!(chunked.manager().residency(c).is_empty(), "round {round}: {c:?} outlived the generation");
        }
        let f = |out: &Tensor| lm_loss(out, y);
        for e in [&mut fp32 as &mut dyn Engine, &mut naive, &mut chunked] {
            e.step(x, &f).unwrap();
        }
    }
    assert!(chunked.memory().bytes_moved.iter().any(|(k, &v)| k.ends_with("->nvme") && v > 0), "chunks should reach NVMe");
}
