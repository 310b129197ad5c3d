//! The GPT-2 architecture (learned positions, pre-LayerNorm, GELU, tied embeddings) as pure
//! functions over parameter tensors, so the same code runs on plain autograd tensors (the naive
//! strategy) and on views over chunks (the chunked strategy, one block at a time).
//!
//! Parameters carry Hugging Face GPT-2 names and shapes (`h.3.attn.c_attn.weight` is a Conv1D
//! weight `[in, out]`), so checkpoints load into and from `transformers` directly.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{HarnessError, Result};

/// The shape of a GPT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    pub name: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    /// Context length (rows of the position table).
    pub n_ctx: usize,
    pub vocab: usize,
}

/// The named ladder: (name, layers, width, heads). GPT-2 sizes, then the GPT-3 family up to the
/// 175B of Colossal-AI's benchmark.
pub const LADDER: &[(&str, usize, usize, usize)] = &[
    ("tiny", 4, 128, 4),
    ("s", 12, 768, 12),
    ("m", 24, 1024, 16),
    ("l", 36, 1280, 20),
    ("xl", 48, 1600, 25),
    ("2.7b", 32, 2560, 32),
    ("6.7b", 32, 4096, 32),
    ("13b", 40, 5120, 40),
    ("30b", 48, 7168, 56),
    ("66b", 64, 9216, 72),
    ("175b", 96, 12288, 96),
];

impl GptConfig {
    /// A named config (`tiny`, `s`, `m`, `l`, `xl`, `2.7b` ... `175b`) or an explicit
    /// `LAYERSxWIDTHxHEADS` (e.g. `6x384x6`), for a vocabulary of `vocab` tokens.
    pub fn parse(spec: &str, vocab: usize, n_ctx: usize) -> Result<Self> {
        let spec = spec.trim().to_ascii_lowercase();
        let (name, l, d, h) = if let Some(&(n, l, d, h)) = LADDER.iter().find(|e| e.0 == spec) {
            (n.to_string(), l, d, h)
        } else {
            let parts: Vec<&str> = spec.split('x').collect();
            let nums: Option<Vec<usize>> = parts.iter().map(|p| p.parse().ok()).collect();
            match nums.as_deref() {
                Some(&[l, d, h]) => (spec.clone(), l, d, h),
                _ => {
                    let names: Vec<&str> = LADDER.iter().map(|e| e.0).collect();
                    return Err(HarnessError::Config(format!(
                        "unknown model `{spec}`: use one of {} or LAYERSxWIDTHxHEADS such as 6x384x6",
                        names.join(", ")
                    )));
                }
            }
        };
        let c = GptConfig {
            name,
            n_layer: l,
            n_embd: d,
            n_head: h,
            n_ctx,
            vocab,
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.n_layer == 0 || self.n_embd == 0 || self.n_head == 0 || self.n_ctx == 0 || self.vocab == 0 {
            return Err(HarnessError::Config(format!("model {}: every dimension must be positive", self.name)));
        }
        if self.n_embd % self.n_head != 0 {
            return Err(HarnessError::Config(format!(
                "model {}: width {} is not divisible by {} heads",
                self.name, self.n_embd, self.n_head
            )));
        }
        Ok(())
    }

    /// Parameters of the body (embeddings, blocks, final norm), without a head.
    pub fn body_params(&self) -> u64 {
        let (l, d, v, c) = (self.n_layer as u64, self.n_embd as u64, self.vocab as u64, self.n_ctx as u64);
        v * d + c * d + l * (12 * d * d + 13 * d) + 2 * d
    }
}

/// What sits on top of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// Next-token logits through the tied token embedding (the actor, SFT).
    Lm,
    /// One value per token (the PPO critic).
    Value,
    /// One score per token; the reward is the score at the last non-pad token.
    Score,
}

/// Which execution unit a parameter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Embed,
    Block(usize),
    Head,
}

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f64),
    Ones,
    Zeros,
}

/// One parameter tensor.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub unit: Unit,
    pub init: Init,
    /// Receives gradients and optimizer state; false for a LoRA model's frozen base weights.
    pub trainable: bool,
    /// Its initial value's random stream (`init_tensor`): its index in the plain model's list,
    /// so a LoRA model's base starts where the plain model with the same seed does.
    pub stream: usize,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn shape_i64(&self) -> Vec<i64> {
        self.shape.iter().map(|&x| x as i64).collect()
    }
}

/// Tensors per transformer block, in the order `block` takes them.
pub const BLOCK_TENSORS: usize = 12;

/// The full parameter list in first-use order, with HF GPT-2 names.
pub fn param_specs(c: &GptConfig, head: HeadKind) -> Vec<ParamSpec> {
    let d = c.n_embd;
    let std = 0.02;
    let proj_std = 0.02 / (2.0 * c.n_layer as f64).sqrt();
    let p = |name: String, shape: Vec<usize>, unit, init| ParamSpec {
        name,
        shape,
        unit,
        init,
        trainable: true,
        stream: 0,
    };
    let mut v = vec![
        p("wte.weight".into(), vec![c.vocab, d], Unit::Embed, Init::Normal(std)),
        p("wpe.weight".into(), vec![c.n_ctx, d], Unit::Embed, Init::Normal(0.01)),
    ];
    for i in 0..c.n_layer {
        let u = Unit::Block(i);
        let n = |s: &str| format!("h.{i}.{s}");
        v.extend([
            p(n("ln_1.weight"), vec![d], u, Init::Ones),
            p(n("ln_1.bias"), vec![d], u, Init::Zeros),
            p(n("attn.c_attn.weight"), vec![d, 3 * d], u, Init::Normal(std)),
            p(n("attn.c_attn.bias"), vec![3 * d], u, Init::Zeros),
            p(n("attn.c_proj.weight"), vec![d, d], u, Init::Normal(proj_std)),
            p(n("attn.c_proj.bias"), vec![d], u, Init::Zeros),
            p(n("ln_2.weight"), vec![d], u, Init::Ones),
            p(n("ln_2.bias"), vec![d], u, Init::Zeros),
            p(n("mlp.c_fc.weight"), vec![d, 4 * d], u, Init::Normal(std)),
            p(n("mlp.c_fc.bias"), vec![4 * d], u, Init::Zeros),
            p(n("mlp.c_proj.weight"), vec![4 * d, d], u, Init::Normal(proj_std)),
            p(n("mlp.c_proj.bias"), vec![d], u, Init::Zeros),
        ]);
    }
    v.push(p("ln_f.weight".into(), vec![d], Unit::Head, Init::Ones));
    v.push(p("ln_f.bias".into(), vec![d], Unit::Head, Init::Zeros));
    // Scalar heads: N(0, 1/(d+1)), as InstructGPT-style reward models initialise them.
    let head_std = 1.0 / ((d + 1) as f64).sqrt();
    match head {
        HeadKind::Lm => {}
        HeadKind::Value => {
            v.push(p("v_head.weight".into(), vec![1, d], Unit::Head, Init::Normal(head_std)));
            v.push(p("v_head.bias".into(), vec![1], Unit::Head, Init::Zeros));
        }
        HeadKind::Score => v.push(p("score.weight".into(), vec![1, d], Unit::Head, Init::Normal(head_std))),
    }
    for (i, s) in v.iter_mut().enumerate() {
        s.stream = i;
    }
    v
}

/// Low-rank adapters (LoRA, Hu et al. 2021) on every block's four linears (`attn.c_attn`,
/// `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`): `y = x W + b + (alpha / rank) x A B`, with `A`
/// `[in, rank]` drawn N(0, 1/in) and `B` `[rank, out]` zero, so training starts from the base
/// model exactly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The block linears that carry adapters, as (name, index of the weight in a block's tensors).
pub const LORA_TARGETS: [(&str, usize); 4] = [("attn.c_attn", 2), ("attn.c_proj", 4), ("mlp.c_fc", 8), ("mlp.c_proj", 10)];

/// Tensors a block gains with adapters: an `A` and a `B` per target, in `LORA_TARGETS` order.
pub const LORA_TENSORS: usize = 2 * LORA_TARGETS.len();

/// The parameter list of a LoRA model: the base model's tensors frozen, except a scalar head
/// (`score`, `v_head`: new for a reward model or critic, so trained in full, as peft's
/// `modules_to_save` does), and each block's adapters after its own tensors.
pub fn lora_specs(base: Vec<ParamSpec>, lora: LoraConfig) -> Vec<ParamSpec> {
    let mut out = Vec::with_capacity(base.len() + base.len() / BLOCK_TENSORS * LORA_TENSORS);
    let mut stream = base.len();
    let mut it = base.into_iter().peekable();
    while let Some(mut p) = it.next() {
        p.trainable = p.unit == Unit::Head && !p.name.starts_with("ln_f.");
        let block_end = match p.unit {
            Unit::Block(i) if it.peek().is_none_or(|n| n.unit != Unit::Block(i)) => Some(i),
            _ => None,
        };
        out.push(p);
        if let Some(i) = block_end {
            let first = out.len() - BLOCK_TENSORS;
            for (target, w) in LORA_TARGETS {
                let shape = &out[first + w].shape;
                let (din, dout) = (shape[0], shape[1]);
                let p = |suffix: &str, shape: Vec<usize>, init, stream| ParamSpec {
                    name: format!("h.{i}.{target}.{suffix}"),
                    shape,
                    unit: Unit::Block(i),
                    init,
                    trainable: true,
                    stream,
                };
                let a = p("lora_a", vec![din, lora.rank], Init::Normal(1.0 / (din as f64).sqrt()), stream);
                let b = p("lora_b", vec![lora.rank, dout], Init::Zeros, stream + 1);
                stream += 2;
                out.extend([a, b]);
            }
        }
    }
    out
}

/// Whether `name` is an adapter tensor.
pub fn is_adapter(name: &str) -> bool {
    name.ends_with(".lora_a") || name.ends_with(".lora_b")
}

/// Folds adapters into their base weights (`W += scale A B`) and drops them: the plain GPT-2
/// tensors of what a LoRA model computes, for export and for the next stage.
pub fn merge_lora(w: &mut std::collections::BTreeMap<String, Tensor>, lora: LoraConfig) -> Result<()> {
    let names: Vec<String> = w.keys().filter(|n| n.ends_with(".lora_a")).cloned().collect();
    for a_name in names {
        let stem = a_name.trim_end_matches(".lora_a");
        let missing = |n: &str| HarnessError::Config(format!("LoRA weights lack {n}"));
        let b_name = format!("{stem}.lora_b");
        let w_name = format!("{stem}.weight");
        let a = w.remove(&a_name).ok_or_else(|| missing(&a_name))?;
        let b = w.remove(&b_name).ok_or_else(|| missing(&b_name))?;
        let base = w.get(&w_name).ok_or_else(|| missing(&w_name))?;
        let delta = a.to_kind(Kind::Float).f_matmul(&b.to_kind(Kind::Float))?;
        if delta.size() != base.size() {
            return Err(HarnessError::Config(format!("{stem}: adapters make {:?}, the weight is {:?}", delta.size(), base.size())));
        }
        let merged = base.to_kind(Kind::Float) + delta * lora.scale();
        w.insert(w_name, merged);
    }
    if let Some(b) = w.keys().find(|n| n.ends_with(".lora_b")) {
        return Err(HarnessError::Config(format!("LoRA weights: {b} has no lora_a")));
    }
    Ok(())
}

/// A parameter's initial value (CPU, fp32), drawn from its own stream of a ChaCha generator
/// keyed by `seed` and the tensor's index: reproducible whatever order or thread tensors are
/// initialised in.
pub fn init_tensor(spec: &ParamSpec, seed: u64, index: usize) -> Tensor {
    use rand::{Rng, SeedableRng};
    let shape = spec.shape_i64();
    let n = spec.numel();
    let opts = (Kind::Float, tch::Device::Cpu);
    match spec.init {
        Init::Normal(std) => {
            // Box-Muller: two normals per pair of uniforms, each uniform one 64-bit draw (two
            // ChaCha words), so pair k starts at word 4k: large tensors are drawn by several
            // threads, each seeking to its first pair, with the values of one sequential pass.
            let mut v = vec![0f32; n.div_ceil(2) * 2];
            let fill = |out: &mut [f32], first_pair: usize| {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(index as u64);
                rng.set_word_pos(4 * first_pair as u128);
                for pair in out.chunks_exact_mut(2) {
                    let u1: f64 = 1.0 - rng.gen::<f64>();
                    let u2: f64 = rng.gen::<f64>();
                    let r = (-2.0 * u1.ln()).sqrt() * std;
                    let a = std::f64::consts::TAU * u2;
                    pair[0] = (r * a.cos()) as f32;
                    pair[1] = (r * a.sin()) as f32;
                }
            };
            let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(v.len() / (1 << 20)).max(1);
            if threads == 1 {
                fill(&mut v, 0);
            } else {
                let per = (v.len() / 2).div_ceil(threads) * 2;
                std::thread::scope(|s| {
                    for (k, part) in v.chunks_mut(per).enumerate() {
                        let fill = &fill;
                        s.spawn(move || fill(part, k * per / 2));
                    }
                });
            }
            v.truncate(n);
            Tensor::from_slice(&v).reshape(shape.as_slice())
        }
        Init::Ones => Tensor::ones(shape.as_slice(), opts),
        Init::Zeros => Tensor::zeros(shape.as_slice(), opts),
    }
}

/// Token plus position embeddings: `ids` `[B, T]` -> `[B, T, C]`.
pub fn embed(wte: &Tensor, wpe: &Tensor, ids: &Tensor, pos_offset: i64) -> Tensor {
    let t = ids.size()[1];
    let tok = Tensor::embedding(wte, ids, -1, false, false);
    tok + wpe.narrow(0, pos_offset, t)
}

/// A cache of one block's keys and values `[B, H, T, D]`, for incremental decoding.
#[derive(Default)]
pub struct KvCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

/// `x W + b`, plus `scale x A B` when the linear carries adapters.
fn linear(x: &Tensor, p: &[Tensor], w: usize, lora: Option<(usize, f64)>) -> Tensor {
    let y = x.matmul(&p[w]) + &p[w + 1];
    match lora {
        Some((k, scale)) => {
            let (a, b) = (&p[BLOCK_TENSORS + 2 * k], &p[BLOCK_TENSORS + 2 * k + 1]);
            y + x.matmul(a).matmul(b) * scale
        }
        None => y,
    }
}

/// One pre-LayerNorm transformer block. `p` holds the block's tensors in `param_specs` order,
/// followed by its adapters (`lora_specs` order) for a LoRA model, whose output they add
/// scaled by `lora_scale` (0: adapters off). With `cache`, `x` holds only the new positions and keys/values are
/// appended.
pub fn block(p: &[Tensor], x: &Tensor, n_head: usize, lora_scale: f64, cache: Option<&mut KvCache>) -> Tensor {
    // Scale 0: adapters off (the base model alone), nothing computed for them.
    let has_lora = p.len() == BLOCK_TENSORS + LORA_TENSORS && lora_scale != 0.0;
    let lin = |x: &Tensor, k: usize| linear(x, p, LORA_TARGETS[k].1, has_lora.then_some((k, lora_scale)));
    let (b, t, c) = x.size3().expect("block input is [B, T, C]");
    let h = n_head as i64;
    let hd = c / h;
    let a = x.layer_norm([c], Some(&p[0]), Some(&p[1]), 1e-5, false);
    let qkv = lin(&a, 0);
    let parts = qkv.split(c, -1);
    let heads = |z: &Tensor| z.reshape([b, t, h, hd]).transpose(1, 2);
    let (q, mut k, mut v) = (heads(&parts[0]), heads(&parts[1]), heads(&parts[2]));
    let mut causal = true;
    if let Some(cache) = cache {
        if let (Some(pk), Some(pv)) = (&cache.k, &cache.v) {
            // A cache filled at another precision (a prompt read with the fp32 weights, then
            // decoding through a 16-bit copy) is converted once, here.
            let kind = k.kind();
            let same = |z: &Tensor| if z.kind() == kind { z.shallow_clone() } else { z.to_kind(kind) };
            k = Tensor::cat(&[same(pk), k], 2);
            v = Tensor::cat(&[same(pv), v], 2);
            // Every new query sees all cached positions; among new positions causality holds
            // only when several are added at once, which happens for the first call alone.
            causal = t > 1;
        }
        cache.k = Some(k.shallow_clone());
        cache.v = Some(v.shallow_clone());
    }
    let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, causal, None, false);
    let y = y.transpose(1, 2).reshape([b, t, c]);
    let x = x + lin(&y, 1);
    let m = x.layer_norm([c], Some(&p[6]), Some(&p[7]), 1e-5, false);
    let m = lin(&lin(&m, 2).gelu("tanh"), 3);
    x + m
}

/// The head: final LayerNorm, then logits `[B, T, V]` (through the tied `wte`) or one value per
/// token `[B, T]`. `p` holds the head's own tensors in `param_specs` order.
pub fn head(kind: HeadKind, p: &[Tensor], wte: Option<&Tensor>, x: &Tensor) -> Tensor {
    let c = x.size()[2];
    let h = x.layer_norm([c], Some(&p[0]), Some(&p[1]), 1e-5, false);
    match kind {
        HeadKind::Lm => h.matmul(&wte.expect("the LM head needs the token embedding").tr()),
        HeadKind::Value => (h.matmul(&p[2].tr()) + &p[3]).squeeze_dim(-1),
        HeadKind::Score => h.matmul(&p[2].tr()).squeeze_dim(-1),
    }
}

/// Index ranges of the parameter list per unit: embed, each block, head.
#[derive(Debug, Clone)]
pub struct Units {
    pub embed: std::ops::Range<usize>,
    pub blocks: Vec<std::ops::Range<usize>>,
    pub head: std::ops::Range<usize>,
}

impl Units {
    /// Spec indices of the blocks' linear weights (`[in, out]`, applied as `x W`).
    pub fn linear_weights(&self) -> Vec<usize> {
        self.blocks.iter().flat_map(|r| LORA_TARGETS.iter().map(move |&(_, w)| r.start + w)).collect()
    }
}

pub fn units(specs: &[ParamSpec], n_layer: usize) -> Units {
    let range = |u: Unit| {
        let a = specs.iter().position(|s| s.unit == u).expect("unit present");
        let b = specs.iter().rposition(|s| s.unit == u).expect("unit present") + 1;
        a..b
    };
    Units {
        embed: range(Unit::Embed),
        blocks: (0..n_layer).map(|i| range(Unit::Block(i))).collect(),
        head: range(Unit::Head),
    }
}

/// Forward of the whole model over plain tensors (`p` in `param_specs` or `lora_specs` order).
pub fn forward_all(c: &GptConfig, kind: HeadKind, u: &Units, p: &[Tensor], lora_scale: f64, ids: &Tensor) -> Tensor {
    let mut x = embed(&p[0], &p[1], ids, 0);
    for r in &u.blocks {
        x = block(&p[r.clone()], &x, c.n_head, lora_scale, None);
    }
    head(kind, &p[u.head.clone()], Some(&p[0]), &x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_sizes_match_the_published_counts() {
        // GPT-2 small: 124M with its 50257-token vocabulary and 1024 positions.
        let s = GptConfig::parse("s", 50257, 1024).unwrap();
        assert!((s.body_params() as f64 / 124.44e6 - 1.0).abs() < 0.01, "{}", s.body_params());
        let xl = GptConfig::parse("xl", 50257, 1024).unwrap();
        assert!((xl.body_params() as f64 / 1.558e9 - 1.0).abs() < 0.01, "{}", xl.body_params());
        let big = GptConfig::parse("175b", 50257, 2048).unwrap();
        assert!((big.body_params() as f64 / 175e9 - 1.0).abs() < 0.02, "{}", big.body_params());
        let tiny = GptConfig::parse("tiny", 259, 128).unwrap();
        assert!((0.5e6..2e6).contains(&(tiny.body_params() as f64)));
        let specs = param_specs(&tiny, HeadKind::Lm);
        assert_eq!(specs.iter().map(|s| s.numel() as u64).sum::<u64>(), tiny.body_params());
    }

    #[test]
    fn initialisation_is_reproducible_and_scaled() {
        let c = GptConfig::parse("2x256x4", 50, 16).unwrap();
        let specs = param_specs(&c, HeadKind::Score);
        let fc = specs.iter().position(|s| s.name == "h.0.mlp.c_fc.weight").unwrap();
        let a = init_tensor(&specs[fc], 1, fc);
        assert!(a.equal(&init_tensor(&specs[fc], 1, fc)));
        assert!(!a.equal(&init_tensor(&specs[fc], 2, fc)));
        let std = a.std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.001, "std {std}");
        let head = specs.len() - 1;
        assert_eq!(specs[head].name, "score.weight");
        let h = init_tensor(&specs[head], 1, head);
        assert!((h.std(true).double_value(&[]) * 257f64.sqrt() - 1.0).abs() < 0.2);
    }

    #[test]
    fn a_large_tensor_drawn_by_threads_equals_one_sequential_pass() {
        use rand::{Rng, SeedableRng};
        // 3M + 1 elements (odd, several threads' worth) drawn the plain sequential way.
        let spec = ParamSpec {
            name: "w".into(),
            shape: vec![3 << 20 | 1],
            init: Init::Normal(0.5),
            unit: Unit::Block(0),
            trainable: true,
            stream: 4,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        rng.set_stream(4);
        let mut want = Vec::new();
        while want.len() < spec.numel() {
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen::<f64>();
            let r = (-2.0 * u1.ln()).sqrt() * 0.5;
            let a = std::f64::consts::TAU * u2;
            want.push((r * a.cos()) as f32);
            want.push((r * a.sin()) as f32);
        }
        want.truncate(spec.numel());
        let got: Vec<f32> = Vec::try_from(&init_tensor(&spec, 9, 4)).unwrap();
        assert!(got == want, "the threaded draw differs from the sequential one");
    }

    #[test]
    fn lora_freezes_the_base_and_adds_two_adapters_per_linear() {
        let c = GptConfig::parse("2x32x4", 50, 16).unwrap();
        let lora = LoraConfig { rank: 4, alpha: 8.0 };
        let specs = lora_specs(param_specs(&c, HeadKind::Score), lora);
        assert_eq!(specs.len(), param_specs(&c, HeadKind::Score).len() + 2 * LORA_TENSORS);
        let u = units(&specs, c.n_layer);
        for (i, r) in u.blocks.iter().enumerate() {
            let names: Vec<&str> = specs[r.clone()].iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names.len(), BLOCK_TENSORS + LORA_TENSORS);
            assert_eq!(names[BLOCK_TENSORS], format!("h.{i}.attn.c_attn.lora_a"));
            assert_eq!(names[BLOCK_TENSORS + 7], format!("h.{i}.mlp.c_proj.lora_b"));
        }
        let fc_a = specs.iter().find(|s| s.name == "h.1.mlp.c_fc.lora_a").unwrap();
        let fc_b = specs.iter().find(|s| s.name == "h.1.mlp.c_fc.lora_b").unwrap();
        assert_eq!((fc_a.shape.clone(), fc_b.shape.clone()), (vec![32, 4], vec![4, 128]));
        let trainable: Vec<&str> = specs.iter().filter(|s| s.trainable && !is_adapter(&s.name)).map(|s| s.name.as_str()).collect();
        assert_eq!(trainable, ["score.weight"], "only the new scalar head trains in full");
        assert!(specs.iter().filter(|s| is_adapter(&s.name)).all(|s| s.trainable));
        assert!(lora_specs(param_specs(&c, HeadKind::Lm), lora).iter().all(|s| s.trainable == is_adapter(&s.name)));
    }

    #[test]
    fn adapters_start_at_the_base_model_and_merge_into_what_they_compute() {
        let c = GptConfig::parse("2x32x4", 50, 16).unwrap();
        let lora = LoraConfig { rank: 4, alpha: 8.0 };
        let base = param_specs(&c, HeadKind::Lm);
        let specs = lora_specs(base.clone(), lora);
        let mut p: Vec<Tensor> = specs.iter().map(|s| init_tensor(s, 3, s.stream)).collect();
        let plain: Vec<Tensor> = base.iter().enumerate().map(|(i, s)| init_tensor(s, 3, i)).collect();
        let ids = Tensor::from_slice(&[3i64, 7, 1, 9, 4, 2]).reshape([1, 6]);
        let (ul, ub) = (units(&specs, c.n_layer), units(&base, c.n_layer));
        let with = forward_all(&c, HeadKind::Lm, &ul, &p, lora.scale(), &ids);
        let without = forward_all(&c, HeadKind::Lm, &ub, &plain, 0.0, &ids);
        assert!(with.equal(&without), "B = 0: the adapted model starts as the base");
        // Trained adapters: every B non-zero.
        for (s, t) in specs.iter().zip(p.iter_mut()) {
            if s.name.ends_with(".lora_b") {
                *t = Tensor::randn(t.size(), (Kind::Float, tch::Device::Cpu)) * 0.1;
            }
        }
        let adapted = forward_all(&c, HeadKind::Lm, &ul, &p, lora.scale(), &ids);
        assert!((&adapted - &without).abs().max().double_value(&[]) > 1e-2, "the adapters change the output");
        let mut named: std::collections::BTreeMap<String, Tensor> = specs.iter().zip(&p).map(|(s, t)| (s.name.clone(), t.shallow_clone())).collect();
        merge_lora(&mut named, lora).unwrap();
        assert!(named.keys().all(|n| !is_adapter(n)));
        let merged: Vec<Tensor> = base.iter().map(|s| named[&s.name].shallow_clone()).collect();
        let out = forward_all(&c, HeadKind::Lm, &ub, &merged, 0.0, &ids);
        let diff = (&adapted - &out).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "merged model differs by {diff}");
        // A lone half of a pair is refused, naming it.
        let mut broken: std::collections::BTreeMap<String, Tensor> = specs.iter().zip(&p).map(|(s, t)| (s.name.clone(), t.shallow_clone())).collect();
        broken.remove("h.0.mlp.c_fc.lora_b");
        let e = merge_lora(&mut broken, lora).unwrap_err().to_string();
        assert!(e.contains("h.0.mlp.c_fc.lora_b"), "{e}");
    }

    #[test]
    fn explicit_and_bad_specs() {
        let c = GptConfig::parse("3x96x4", 100, 32).unwrap();
        assert_eq!((c.n_layer, c.n_embd, c.n_head), (3, 96, 4));
        let e = GptConfig::parse("3x97x4", 100, 32).unwrap_err().to_string();
        assert!(e.contains("not divisible"), "{e}");
        let e = GptConfig::parse("huge", 100, 32).unwrap_err().to_string();
        assert!(e.contains("unknown model") && e.contains("tiny"), "{e}");
    }

    #[test]
    fn cached_decoding_matches_full_recompute() {
        let c = GptConfig::parse("2x32x4", 50, 16).unwrap();
        let specs = param_specs(&c, HeadKind::Lm);
        let p: Vec<Tensor> = specs.iter().enumerate().map(|(i, s)| init_tensor(s, 3, i)).collect();
        let u = units(&specs, c.n_layer);
        let ids = Tensor::from_slice(&[3i64, 7, 1, 9, 4, 2]).reshape([1, 6]);
        let full = forward_all(&c, HeadKind::Lm, &u, &p, 0.0, &ids);
        let mut caches: Vec<KvCache> = (0..c.n_layer).map(|_| KvCache::default()).collect();
        let mut outs = Vec::new();
        for (start, len) in [(0, 3), (3, 1), (4, 1), (5, 1)] {
            let part = ids.narrow(1, start, len);
            let mut x = embed(&p[0], &p[1], &part, start);
            for (r, cache) in u.blocks.iter().zip(caches.iter_mut()) {
                x = block(&p[r.clone()], &x, c.n_head, 0.0, Some(cache));
            }
            outs.push(head(HeadKind::Lm, &p[u.head.clone()], Some(&p[0]), &x));
        }
        let inc = Tensor::cat(&outs, 1);
        let diff = (&full - &inc).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max difference {diff}");
    }
}
