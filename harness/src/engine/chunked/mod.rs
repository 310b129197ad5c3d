//! The chunked strategy: parameters, gradients, fp32 masters and moments live in Stowage chunks
//! placed by a policy over device, host and NVMe; the model runs one unit (embedding, each
//! block, head) at a time.
//!
//! A step: forward under `no_grad`, unit by unit, keeping only each unit's input; then backward
//! from the head: access the unit's parameter chunks (read) and gradient chunks (write),
//! recompute the unit with autograd on views over the chunks, `run_backward` with the output's
//! gradient, write the parameter gradients into their chunks, release. Each tensor's squared
//! gradient norm is taken as its gradient becomes final, so clipping needs no extra sweep. The
//! update runs per chunk: the memory crate's CPU AdamW where the chunks are CPU-addressable,
//! libtorch ops over device views otherwise. Without clipping or loss scaling, a chunk's update
//! starts on a second thread as soon as its gradients are final, overlapping the rest of the
//! backward pass. With them, the update needs the global norm, so it runs after the backward
//! pass; where it streams state from NVMe or to a GPU, in the background: `step` returns once
//! the norm is known and another model (the critic after the actor in PPO) computes while this
//! one's optimizer state streams; this model's next use waits for it. Either way the arithmetic
//! is the same as updating in place.
//!
//! Keep mode: when every parameter chunk fits on the device next to one unit's gradients (a
//! model that would fit without offloading), the forward pass holds them all and keeps each
//! unit's graph, so the backward pass recomputes nothing: the step costs what the naive
//! strategy's does, plus the chunk bookkeeping and the CPU AdamW.

mod decode;
mod pass;

use std::collections::BTreeMap;

use stowage_memory::optim::{CpuAdam, LossScaler};
use stowage_memory::{ChunkRef, ChunkSize, DType, Manager, ManagerConfig, Mode, PolicyKind, Role, TensorId, TiersConfig};
use tch::{Device, Kind, Tensor};

use super::naive::check_shape;
use super::{frozen_error, plan, Engine, MemoryReport, ModelSpec, StepStats, TrainOpts};
use crate::bridge::{view_mut, view_on};
pub use super::footprint::{human, Footprint};
use super::turns::Turns;
use super::update::{Background, Done, Updater};
use crate::error::{HarnessError, Result};
use crate::model::{init_tensor, HeadKind, KvCache};

/// Placement settings of the chunked strategy.
#[derive(Debug, Clone)]
pub struct ChunkedOpts {
    pub tiers: TiersConfig,
    pub policy: PolicyKind,
    /// Elements per chunk; default: searched between the largest tensor and twice that.
    pub chunk_elems: Option<usize>,
    pub prefetch_depth: usize,
    /// Record a timeline (`Manager::chrome_trace`).
    pub trace: bool,
    /// Overlap chunk updates with the backward pass when no global quantity (clipping norm,
    /// loss-scale overflow) must be known first.
    pub pipeline_update: bool,
    /// Run an update that must follow the backward pass in the background (the model's next
    /// use waits for it) instead of before `step` returns, where it streams state from NVMe or
    /// to a GPU.
    pub defer_update: bool,
    /// CPU AdamW threads (None: one per core).
    pub adam_threads: Option<usize>,
    /// Keep each unit's autograd graph from the forward pass when every parameter chunk fits on
    /// the device next to one unit's gradients (no recompute, the naive strategy's activation
    /// memory); false: always recompute in the backward pass (one unit's activations).
    pub keep_graph: bool,
    /// Device and host budgets shared with other models, taken in turns (see `Turns`); the
    /// tier budgets above are then the shared totals.
    pub turns: Option<Turns>,
}

impl Default for ChunkedOpts {
    fn default() -> Self {
        ChunkedOpts {
            tiers: TiersConfig::default(),
            policy: PolicyKind::Auto,
            chunk_elems: None,
            prefetch_depth: 64,
            trace: false,
            pipeline_update: true,
            defer_update: true,
            adam_threads: None,
            keep_graph: true,
            turns: None,
        }
    }
}

/// A unit's forward pass with autograd: tracked parameter leaves, the input leaf, the output.
struct UnitGraph {
    leaves: Vec<Tensor>,
    x: Tensor,
    out: Tensor,
}

pub struct Chunked {
    spec: ModelSpec,
    opts: TrainOpts,
    copts: ChunkedOpts,
    mgr: std::sync::Arc<Manager>,
    /// This model's member id in `copts.turns`.
    turn: Option<usize>,
    /// The group of trainable tensors (every role), if any.
    train: Option<usize>,
    /// The group of frozen tensors (parameters only: a LoRA base, an inference-only model).
    frozen: Option<usize>,
    /// Per manager group: the spec index of each of its tensors.
    group_tensors: Vec<Vec<usize>>,
    tids: Vec<TensorId>,
    /// Roles of the trainable group.
    roles: Vec<(Role, DType)>,
    /// Per unit (0: embedding, 1..=L: blocks, L+1: head): the tensors it uses.
    unit_tensors: Vec<Vec<usize>>,
    /// Per unit: its chunks as (group, index).
    unit_chunks: Vec<Vec<(usize, usize)>>,
    /// Per tensor: the backward position at which its gradient is first written / final.
    first_write: Vec<usize>,
    final_at: Vec<usize>,
    /// Per backward position: the trainable group's chunks whose gradients are all final
    /// after it.
    chunks_final: Vec<Vec<usize>>,
    up: std::sync::Arc<Updater>,
    background: std::sync::Mutex<Background>,
    step: u64,
    scaler: Option<LossScaler>,
    device: Device,
    ordinal: usize,
    footprint: Footprint,
    pipelined: bool,
    /// Run updates that follow the backward pass in the background (see `ChunkedOpts`).
    deferred: bool,
    /// Keep each unit's graph from the forward pass instead of recomputing it (every parameter
    /// chunk fits on the device with a unit's gradients).
    keep_graph: bool,
    /// LoRA adapters applied (see `Engine::set_adapters`).
    adapters_on: bool,
    /// The 16-bit copy generation decodes through (`TrainOpts::gen_dtype`).
    decode: Option<decode::DecodeCopy>,
    notes: Vec<String>,
}

impl Chunked {
    /// Registers the model's tensors, checks it can be placed under the budgets, initialises
    /// the parameters from `seed` and declares the step's access schedule.
    pub fn new(spec: ModelSpec, opts: TrainOpts, copts: ChunkedOpts, seed: u64) -> Result<Self> {
        let roles: Vec<(Role, DType)> = match opts.dtype {
            DType::F32 => vec![(Role::Param, DType::F32), (Role::Grad, DType::F32), (Role::Moment1, DType::F32), (Role::Moment2, DType::F32)],
            d => vec![(Role::Param, d), (Role::Grad, d), (Role::Master, DType::F32), (Role::Moment1, DType::F32), (Role::Moment2, DType::F32)],
        };
        let trainable: Vec<bool> = spec.params.iter().map(|p| opts.trainable && p.trainable).collect();
        let max_numel = spec.params.iter().map(|p| p.numel()).max().unwrap_or(1);
        let chunk_size = match copts.chunk_elems {
            Some(n) => ChunkSize::Fixed(n),
            None => ChunkSize::Search {
                min: max_numel,
                max: 2 * max_numel,
                step: (max_numel / 16).max(1),
            },
        };
        let mut tiers = copts.tiers.clone();
        if let Some(t) = &copts.turns {
            tiers = tiers.with_shared(Some(t.device.clone()), Some(t.host.clone()));
        }
        let cfg = ManagerConfig {
            tiers,
            policy: copts.policy,
            chunk_size,
            prefetch_depth: copts.prefetch_depth,
            trace: copts.trace,
        };
        let mut b = Manager::builder(cfg);
        // Trainable tensors in one group with every role; frozen ones (a LoRA base, an
        // inference-only model) in another holding parameters only: no gradient, master or
        // moment chunks exist for them, and their chunks are never written after loading.
        let mut group_tensors: Vec<Vec<usize>> = Vec::new();
        let mut tids: Vec<Option<TensorId>> = vec![None; spec.params.len()];
        let mut make_group = |b: &mut stowage_memory::ManagerBuilder, name: String, roles: &[(Role, DType)], want: bool| {
            let members: Vec<usize> = (0..spec.params.len()).filter(|&t| trainable[t] == want).collect();
            if members.is_empty() {
                return None;
            }
            let g = b.group(&name, roles);
            for &t in &members {
                tids[t] = Some(b.tensor(g, &spec.params[t].name, &spec.params[t].shape));
            }
            group_tensors.push(members);
            Some(g)
        };
        let train = make_group(&mut b, spec.cfg.name.clone(), &roles, true);
        let frozen_name = if train.is_some() { format!("{}.frozen", spec.cfg.name) } else { spec.cfg.name.clone() };
        let frozen = make_group(&mut b, frozen_name, &[(Role::Param, opts.dtype)], false);
        let decode_reg = opts.gen_dtype.filter(|&d| d != opts.dtype).map(|d| {
            let shapes: Vec<(String, Vec<usize>)> = spec.params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect();
            decode::DecodeCopy::register(&mut b, &format!("{}.decode", spec.cfg.name), d, &shapes, &spec.units.linear_weights())
        });
        let tids: Vec<TensorId> = tids.into_iter().map(|t| t.expect("every tensor is in a group")).collect();
        let mgr = std::sync::Arc::new(b.build()?);
        let roles = if train.is_some() { roles } else { Vec::new() };
        // Where each tensor sits: (group, chunk).
        let mut chunk_of = vec![(0, 0); spec.params.len()];
        for (g, members) in group_tensors.iter().enumerate() {
            for (k, info) in mgr.layout(g).tensors.iter().enumerate() {
                chunk_of[members[k]] = (g, info.placement.chunk);
            }
        }

        let l = spec.cfg.n_layer;
        let u = &spec.units;
        let mut unit_tensors: Vec<Vec<usize>> = vec![u.embed.clone().collect()];
        unit_tensors.extend(u.blocks.iter().map(|r| r.clone().collect::<Vec<_>>()));
        let mut h: Vec<usize> = u.head.clone().collect();
        if spec.head == HeadKind::Lm {
            h.push(0); // the tied token embedding
        }
        unit_tensors.push(h);
        let unit_chunks: Vec<Vec<(usize, usize)>> = unit_tensors
            .iter()
            .map(|ts| {
                let mut c: Vec<(usize, usize)> = ts.iter().map(|&t| chunk_of[t]).collect();
                c.sort_unstable();
                c.dedup();
                c
            })
            .collect();
        // Backward position j runs unit L+1-j.
        let n_pos = l + 2;
        let mut first_write = vec![usize::MAX; spec.params.len()];
        let mut final_at = vec![0; spec.params.len()];
        for j in 0..n_pos {
            for &t in &unit_tensors[l + 1 - j] {
                first_write[t] = first_write[t].min(j);
                final_at[t] = j;
            }
        }
        let mut chunks_final = vec![Vec::new(); n_pos];
        if let Some(g) = train {
            let mut chunk_final = vec![0; mgr.layout(g).chunk_sizes.len()];
            for &t in &group_tensors[g] {
                let c = chunk_of[t].1;
                chunk_final[c] = chunk_final[c].max(final_at[t]);
            }
            for (c, &j) in chunk_final.iter().enumerate() {
                chunks_final[j].push(c);
            }
        }

        let decode = decode_reg.map(|(g, dtids, transposed)| {
            let layout = mgr.layout(g);
            let per_unit = unit_tensors
                .iter()
                .map(|ts| {
                    let mut c: Vec<usize> = ts.iter().map(|&t| layout.tensors[t].placement.chunk).collect();
                    c.sort_unstable();
                    c.dedup();
                    c
                })
                .collect();
            decode::DecodeCopy::new(g, dtids, transposed, per_unit)
        });

        // What the budgets must hold.
        let mut fp = Footprint::measure(&mgr, group_tensors.len(), &unit_chunks, train, &roles);
        let decode_bytes: u64 = decode.as_ref().map_or(0, |d| (0..mgr.layout(d.group()).chunk_sizes.len()).map(|i| mgr.layout(d.group()).chunk_bytes(i, Role::Param).unwrap_or(0) as u64).sum());
        if decode_bytes > 0 {
            fp.per_role.insert("decode copy".into(), decode_bytes);
            fp.total += decode_bytes;
        }
        let device_budget = fp.check(&copts.tiers)?;
        let t = copts.tiers.clone();
        let param_total = fp.per_role.get("param").copied().unwrap_or(0);
        let keep_graph = opts.trainable && copts.keep_graph && param_total + fp.unit_max <= device_budget;
        // A pipelined update writes parameter chunks during the backward pass: not while keep
        // mode holds them all.
        let pipelined = !keep_graph && copts.pipeline_update && opts.max_norm.is_none() && opts.dtype != DType::F16 && fp.unit_max + fp.update_max <= device_budget;

        // An update left running in the background pays where it waits on transfers that other
        // work can hide: state streaming from NVMe (the shared budgets of models taking turns
        // put it there), or over PCIe to a GPU. One in CPU memory alone would compete with
        // that work for the same cores.
        let nvme = t.nvme.is_some();
        let cuda = mgr.tiers().device_kind() == Some(stowage_memory::DeviceKind::Cuda);
        let deferred = copts.defer_update && !pipelined && ((nvme && (copts.turns.is_some() || fp.total > device_budget.saturating_add(t.host_budget))) || (cuda && fp.total > device_budget));
        let device = match mgr.tiers().device_kind() {
            Some(stowage_memory::DeviceKind::Cuda) => Device::Cuda(t.device.ordinal),
            _ => Device::Cpu,
        };
        let mut notes: Vec<String> = mgr.tiers().notes().to_vec();
        if device.is_cuda() && !tch::Cuda::is_available() {
            return Err(HarnessError::Config(
                "chunks are on a CUDA device but libtorch sees no GPU: reinstall torch with CUDA (scripts/setup.sh) or use a simulated device".into(),
            ));
        }
        if !device.is_cuda() {
            notes.push("device tier: simulated (CPU memory under the device budget); compute on the CPU".into());
        }
        let adam = CpuAdam::new(opts.adam, copts.adam_threads)?;
        // At work it needs a unit's chunks and one chunk's optimizer set on the device; in keep
        // mode every parameter chunk too (the forward pass holds them all).
        let working = fp.unit_max + fp.update_max + if keep_graph { param_total } else { 0 };
        // In the background (the update) it needs one chunk's optimizer set and the next's.
        // A generation claims room for what it reads per token: the decoding copy where there
        // is one, else the parameters.
        let claim = if decode.is_some() { decode_bytes } else { param_total };
        let turn = copts.turns.as_ref().map(|t| t.join(mgr.clone(), working, claim, 2 * fp.largest_chunk, 2 * fp.update_max));
        // Its turns also make room for the next unit's chunks, which then arrive while the
        // current unit computes instead of on demand after it.
        if let (Some(t), Some(k)) = (copts.turns.as_ref(), turn) {
            t.ahead(k, fp.unit_max);
        }
        let up = std::sync::Arc::new(Updater {
            mgr: mgr.clone(),
            group: train,
            roles: roles.clone(),
            dtype: opts.dtype,
            adam,
            device,
            ordinal: t.device.ordinal,
        });
        let mut me = Chunked {
            scaler: opts.scaler(),
            spec,
            opts,
            copts,
            mgr,
            turn,
            train,
            frozen,
            group_tensors,
            tids,
            roles,
            unit_tensors,
            unit_chunks,
            first_write,
            final_at,
            chunks_final,
            up,
            background: Default::default(),
            step: 0,
            device,
            ordinal: t.device.ordinal,
            footprint: fp,
            pipelined,
            deferred,
            keep_graph,
            adapters_on: true,
            decode,
            notes,
        };
        me.initialise(seed)?;
        // The declared order: `optimal` follows it. `auto` takes it as its guess until it has
        // traced an iteration, which is right for a model that only runs forward passes over
        // its parameters (the reference and reward models of PPO never end an iteration, and
        // the registration order would evict each chunk two units share between them). A model
        // that trains or decodes through a copy also generates, which the schedule leaves out:
        // its first step is better guessed by the registration order, then traced.
        if me.copts.policy != PolicyKind::Auto || (!me.opts.trainable && me.decode.is_none()) {
            me.mgr.set_schedule(&me.schedule());
        }
        Ok(me)
    }

    pub fn manager(&self) -> &Manager {
        &self.mgr
    }

    /// Accesses chunks, first taking this model's turn with the budgets it shares.
    fn access(&self, refs: &[ChunkRef], mode: Mode) -> Result<stowage_memory::Access<'_>> {
        self.settle()?;
        if let (Some(t), Some(k)) = (&self.copts.turns, self.turn) {
            t.enter(k)?;
        }
        Ok(self.mgr.access(refs, mode)?)
    }

    /// Waits for the update running in the background, if any. Its error is returned here,
    /// and a note that the state is partly updated by every later call.
    fn settle(&self) -> Result<()> {
        if Background::running(&self.background) {
            // Someone waits for it now: its NVMe traffic no longer yields to the others', and
            // it may take device room from the idle models.
            self.mgr.tiers().set_background_io(false);
            if let (Some(t), Some(k)) = (&self.copts.turns, self.turn) {
                t.hurry(k)?;
            }
        }
        Background::settle(&self.background)
    }

    /// Whether an update was left running in the background and not yet waited for.
    pub fn updating_in_background(&self) -> bool {
        Background::running(&self.background)
    }

    /// Starts the update of the chunks in `order` on a background thread. False when it must
    /// run now instead: the budgets this model shares cannot hold its working set next to
    /// another model's.
    fn launch(&self, order: Vec<usize>, step: u64, mult: f32) -> Result<bool> {
        let done = match (&self.copts.turns, self.turn) {
            (Some(t), Some(k)) => {
                if !t.background(k)? {
                    return Ok(false);
                }
                Done(Some((t.clone(), k)))
            }
            _ => Done(None),
        };
        Background::start(&self.background, self.up.clone(), order, step, mult, self.opts.adam, done)?;
        Ok(true)
    }

    /// Whether the backward pass reuses the forward pass's graphs (keep mode) instead of
    /// recomputing each unit.
    pub fn keeps_graph(&self) -> bool {
        self.keep_graph
    }

    pub fn footprint(&self) -> &Footprint {
        &self.footprint
    }

    fn has_master(&self) -> bool {
        self.roles.iter().any(|r| r.0 == Role::Master)
    }

    /// The `role` chunks among `chunks` (parameters exist in every group, the other roles in
    /// the trainable group only).
    fn refs(&self, chunks: &[(usize, usize)], role: Role) -> Vec<ChunkRef> {
        chunks
            .iter()
            .filter(|&&(g, _)| role == Role::Param || Some(g) == self.train)
            .map(|&(group, index)| ChunkRef { group, index, role })
            .collect()
    }

    /// Every chunk of `group`.
    fn group_chunks(&self, group: usize) -> Vec<(usize, usize)> {
        (0..self.mgr.layout(group).chunk_sizes.len()).map(|i| (group, i)).collect()
    }

    /// Every chunk of every group.
    fn all_chunks(&self) -> Vec<(usize, usize)> {
        (0..self.group_tensors.len()).flat_map(|g| self.group_chunks(g)).collect()
    }

    /// Spec indices of the tensors in chunk `c` of `group`.
    fn tensors_in(&self, group: usize, c: usize) -> Vec<usize> {
        self.mgr.layout(group).tensors_in(c).map(|(k, _)| self.group_tensors[group][k]).collect()
    }

    fn trainable(&self, t: usize) -> bool {
        self.opts.trainable && self.spec.params[t].trainable
    }

    /// Trainable chunks in the order their updates run: as their gradients become final.
    fn update_order(&self) -> Vec<usize> {
        self.chunks_final.iter().flatten().copied().collect()
    }

    /// The access order of one step, for the policies that follow a schedule.
    fn schedule(&self) -> Vec<ChunkRef> {
        let l = self.spec.cfg.n_layer;
        let mut s = Vec::new();
        for u in 0..=l {
            s.extend(self.refs(&self.unit_chunks[u], Role::Param));
        }
        if !self.opts.trainable {
            s.extend(self.refs(&self.unit_chunks[l + 1], Role::Param));
            return s;
        }
        for j in 0..l + 2 {
            let u = l + 1 - j;
            s.extend(self.refs(&self.unit_chunks[u], Role::Param));
            s.extend(self.refs(&self.unit_chunks[u], Role::Grad));
        }
        if let Some(group) = self.train {
            for c in self.update_order() {
                for &(r, _) in &self.roles {
                    s.push(ChunkRef { group, index: c, role: r });
                }
            }
        }
        s
    }

    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Writes initial values chunk by chunk.
    fn initialise(&mut self, seed: u64) -> Result<()> {
        for (g, c) in self.all_chunks() {
            let values: Vec<(usize, Tensor)> = self.tensors_in(g, c).into_iter().map(|t| (t, init_tensor(&self.spec.params[t], seed, self.spec.params[t].stream))).collect();
            self.write_params((g, c), &values)?;
        }
        Ok(())
    }

    /// Sets tensors of chunk `c` (parameter and master copies) from CPU tensors.
    fn write_params(&self, c: (usize, usize), values: &[(usize, Tensor)]) -> Result<()> {
        let mut refs = self.refs(&[c], Role::Param);
        if self.has_master() {
            refs.extend(self.refs(&[c], Role::Master));
        }
        let a = self.access(&refs, Mode::Write)?;
        for (t, v) in values {
            let shape = self.spec.params[*t].shape_i64();
            for &r in refs.iter().map(|r| &r.role) {
                let dst = view_mut(&a, self.tids[*t], r, &shape, self.ordinal)?;
                tch::no_grad(|| dst.shallow_clone().f_copy_(v))?;
            }
        }
        self.sync();
        Ok(())
    }

    /// Updates chunk `c` (every role of it at once on the device).
    fn update_chunk(&self, c: usize, step: u64, mult: f32) -> Result<()> {
        self.up.apply(self.access(&self.up.refs(c)?, Mode::Write)?, step, mult, &self.opts.adam)?;
        self.up.discard_grad(c)
    }

    /// Copies the tensors of `group` out of their `role` chunks to the CPU as fp32, with their
    /// spec indices.
    fn read_role(&self, group: usize, role: Role, name: impl Fn(&str) -> String) -> Result<Vec<(usize, String, Tensor)>> {
        let mut out = Vec::with_capacity(self.tids.len());
        for c in self.group_chunks(group) {
            let a = self.access(&self.refs(&[c], role), Mode::Read)?;
            for t in self.tensors_in(c.0, c.1) {
                let s = &self.spec.params[t];
                let v = view_on(&a, self.tids[t], role, &s.shape_i64(), self.ordinal)?;
                out.push((t, name(&s.name), v.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.copy()));
            }
            self.sync();
        }
        Ok(out)
    }
}

impl Engine for Chunked {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn device(&self) -> Device {
        self.device
    }

    fn forward(&mut self, ids: &Tensor) -> Result<Tensor> {
        self.drop_decode()?;
        let mut x = ids.shallow_clone();
        for u in 0..self.spec.cfg.n_layer + 2 {
            x = self.unit_forward(u, &x)?;
        }
        Ok(x)
    }

    fn forward_cached(&mut self, ids: &Tensor, cache: &mut [KvCache], pos: i64) -> Result<Tensor> {
        let l = self.spec.cfg.n_layer;
        // Single tokens decode through the copy, if any; a prompt reads the parameters.
        let decode = ids.size().get(1) == Some(&1);
        let mut x = self.unit_cached(0, ids, pos, None, decode)?;
        for (u, kv) in (1..=l).zip(cache.iter_mut()) {
            x = self.unit_cached(u, &x, pos, Some(kv), decode)?;
        }
        self.unit_cached(l + 1, &x, pos, None, decode)
    }

    fn step(&mut self, ids: &Tensor, loss: &dyn Fn(&Tensor) -> Tensor) -> Result<StepStats> {
        if !self.opts.trainable {
            return Err(frozen_error());
        }
        self.drop_decode()?;
        let step = self.step + 1;
        let this = &*self;
        let (loss_value, sq) = if this.pipelined {
            std::thread::scope(|s| -> Result<(f64, f64)> {
                let (tx, rx) = crossbeam_channel::unbounded::<usize>();
                let worker = s.spawn(move || -> Result<()> {
                    for c in rx {
                        this.update_chunk(c, step, 1.0)?;
                    }
                    Ok(())
                });
                let r = this.forward_backward(ids, loss, Some(&tx));
                drop(tx);
                let w = worker.join().unwrap_or_else(|_| Err(HarnessError::Config("the update thread panicked".into())));
                let r = r?;
                w?;
                Ok(r)
            })?
        } else {
            this.forward_backward(ids, loss, None)?
        };
        if self.pipelined {
            self.step = step;
            self.mgr.end_iteration();
            return Ok(StepStats {
                loss: loss_value,
                grad_norm: sq.sqrt(),
                skipped: false,
            });
        }
        let (mult, grad_norm) = plan(sq, self.scaler.as_mut(), self.opts.max_norm);
        let skipped = mult.is_none();
        let stats = StepStats {
            loss: loss_value,
            grad_norm,
            skipped,
        };
        if let Some(mult) = mult {
            self.step = step;
            if self.deferred && self.launch(self.update_order(), step, mult)? {
                return Ok(stats);
            }
            for c in self.update_order() {
                self.update_chunk(c, step, mult)?;
            }
        } else {
            // A skipped step's gradients are of no further use either.
            for c in self.update_order() {
                self.up.discard_grad(c)?;
            }
        }
        self.mgr.end_iteration();
        Ok(stats)
    }

    fn settle(&self) -> Result<()> {
        Chunked::settle(self)
    }

    fn export(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.tids.len());
        if let Some(g) = self.train {
            // The fp32 masters where the parameters are 16-bit.
            out.extend(self.read_role(g, if self.has_master() { Role::Master } else { Role::Param }, |n| n.to_string())?);
        }
        if let Some(g) = self.frozen {
            out.extend(self.read_role(g, Role::Param, |n| n.to_string())?);
        }
        out.sort_by_key(|e| e.0);
        Ok(out.into_iter().map(|(_, n, t)| (n, t)).collect())
    }

    fn import(&mut self, named: &BTreeMap<String, Tensor>) -> Result<()> {
        self.drop_decode()?;
        for c in self.all_chunks() {
            let mut values = Vec::new();
            for t in self.tensors_in(c.0, c.1) {
                let s = &self.spec.params[t];
                if let Some(v) = named.get(&s.name) {
                    check_shape(&s.name, &s.shape_i64(), v)?;
                    values.push((t, v.shallow_clone()));
                }
            }
            if !values.is_empty() {
                self.write_params(c, &values)?;
            }
        }
        Ok(())
    }

    fn export_optimizer(&mut self) -> Result<(u64, Vec<(String, Tensor)>)> {
        let g = self.train.ok_or_else(frozen_error)?;
        let mut out = self.read_role(g, Role::Moment1, |n| format!("{n}.exp_avg"))?;
        out.extend(self.read_role(g, Role::Moment2, |n| format!("{n}.exp_avg_sq"))?);
        Ok((self.step, out.into_iter().map(|(_, n, t)| (n, t)).collect()))
    }

    fn import_optimizer(&mut self, step: u64, named: &BTreeMap<String, Tensor>) -> Result<()> {
        let g = self.train.ok_or_else(frozen_error)?;
        for (role, suffix) in [(Role::Moment1, "exp_avg"), (Role::Moment2, "exp_avg_sq")] {
            for c in self.group_chunks(g) {
                let a = self.access(&self.refs(&[c], role), Mode::Write)?;
                for t in self.tensors_in(c.0, c.1) {
                    let s = &self.spec.params[t];
                    let name = format!("{}.{suffix}", s.name);
                    let v = named.get(&name).ok_or_else(|| HarnessError::Config(format!("optimizer state lacks {name}")))?;
                    check_shape(&name, &s.shape_i64(), v)?;
                    let dst = view_mut(&a, self.tids[t], role, &s.shape_i64(), self.ordinal)?;
                    dst.shallow_clone().f_copy_(v)?;
                }
                self.sync();
            }
        }
        self.step = step;
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        // A snapshot: an update running in the background counts as far as it has gone (a
        // progress line must not wait for it, or the update would no longer overlap the next
        // step's work).
        let st = self.mgr.stats();
        MemoryReport {
            device_peak_bytes: st.tiers.get("device").map_or(0, |t| t.peak),
            bytes_moved: st.links.iter().map(|(k, v)| (k.clone(), v.bytes)).collect(),
            tiers: st
                .tiers
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!({"used": v.used, "peak": v.peak, "capacity": v.capacity})))
                .collect(),
        }
    }

    fn steps(&self) -> u64 {
        self.step
    }

    fn trace(&self) -> Option<serde_json::Value> {
        let _ = Chunked::settle(self);
        self.mgr.chrome_trace()
    }

    fn reset_trace(&self) {
        self.mgr.reset_trace();
    }

    fn claim_parameters(&mut self) -> Result<()> {
        Chunked::settle(self)?;
        self.begin_decode()?;
        match (&self.copts.turns, self.turn) {
            (Some(t), Some(k)) => t.claim(k),
            _ => Ok(()),
        }
    }

    fn end_generation(&mut self) -> Result<()> {
        self.drop_decode()
    }

    fn set_adapters(&mut self, on: bool) -> Result<()> {
        if self.spec.lora.is_none() {
            return Err(super::no_adapters_error());
        }
        self.adapters_on = on;
        Ok(())
    }

    fn scaler_state(&self) -> Option<crate::ckpt::ScalerState> {
        super::scaler_state(self.scaler.as_ref())
    }

    fn set_scaler_state(&mut self, st: crate::ckpt::ScalerState) {
        super::set_scaler_state(self.scaler.as_mut(), st);
    }

    fn set_lr(&mut self, lr: f32) {
        self.opts.adam.lr = lr;
    }

    fn notes(&self) -> Vec<String> {
        let mut n = self.notes.clone();
        n.push(format!(
            "chunked: {} chunks per role{}, model state {} ({}); policy {}; backward {}; update {}",
            self.train.map_or(0, |g| self.mgr.layout(g).chunk_sizes.len()),
            self.frozen.map_or(String::new(), |g| format!(" (+{} frozen parameter chunks)", self.mgr.layout(g).chunk_sizes.len())),
            human(self.footprint.total),
            self.footprint.per_role.iter().map(|(k, v)| format!("{k} {}", human(*v))).collect::<Vec<_>>().join(", "),
            self.copts.policy.name(),
            if self.keep_graph { "from the forward pass's graph (parameters all on the device)" } else { "recomputes each unit" },
            match (self.pipelined, self.deferred) {
                (true, _) => "overlapped with backward",
                (false, true) => "after backward (needs the global norm), in the background",
                (false, false) => "after backward (needs the global norm)",
            }
        ));
        n
    }
}

impl Drop for Chunked {
    fn drop(&mut self) {
        // An update still running in the background holds the manager: wait for it.
        if let Err(e) = Chunked::settle(self) {
            log::warn!("chunked model dropped after its optimizer update failed: {e}");
        }
    }
}
