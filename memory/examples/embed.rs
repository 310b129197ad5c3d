//! A minimal trainer that uses the chunk manager as its allocator: an MLP trained with plain
//! Rust arithmetic (no libtorch) to imitate a fixed random "teacher" MLP, with its parameters,
//! gradients and Adam moments in chunks, under a device budget smaller than the model.
//!
//! Training is layer-streamed as Stowage's harness does it: forward one layer at a time
//! (access its parameter chunk, compute, release), backward from the last layer (parameters
//! read, gradients written), then an Adam pass chunk by chunk. The declared schedule lets the
//! `optimal` policy prefetch the next layer while the current one computes.
//!
//! `cargo run --release -p stowage-memory --example embed [-- --steps N --policy auto|optimal|lru]`

use stowage_memory::{
    ChunkRef, ChunkSize, DType, DeviceChoice, Manager, ManagerConfig, Mode, PolicyKind, Role, TensorId, TiersConfig,
};

const WIDTH: usize = 256;
const LAYERS: usize = 8;
const BATCH: usize = 32;
const LR: f32 = 1e-3;

/// A tiny deterministic generator (xorshift) for weights and data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// y = tanh(W x + b) for a batch (row-major, `x` is BATCH x WIDTH).
fn layer_forward(w: &[f32], b: &[f32], x: &[f32], last: bool) -> Vec<f32> {
    let mut y = vec![0f32; BATCH * WIDTH];
    for n in 0..BATCH {
        let xr = &x[n * WIDTH..(n + 1) * WIDTH];
        for o in 0..WIDTH {
            let wr = &w[o * WIDTH..(o + 1) * WIDTH];
            let s: f32 = wr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>() + b[o];
            y[n * WIDTH + o] = if last { s } else { s.tanh() };
        }
    }
    y
}

fn main() -> stowage_memory::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let steps: usize = arg("--steps").and_then(|s| s.parse().ok()).unwrap_or(300);
    let policy = match arg("--policy").as_deref() {
        Some("auto") => PolicyKind::Auto,
        Some("lru") => PolicyKind::Lru,
        _ => PolicyKind::Optimal,
    };

    let per_layer = WIDTH * WIDTH + WIDTH;
    let roles = [
        (Role::Param, DType::F32),
        (Role::Grad, DType::F32),
        (Role::Moment1, DType::F32),
        (Role::Moment2, DType::F32),
    ];
    let model_bytes = (LAYERS * per_layer * 4 * roles.len()) as u64;
    // The device holds about a third of the model: everything else streams.
    let device_budget = model_bytes / 3;
    let cfg = ManagerConfig {
        tiers: TiersConfig::default()
            .with_device(DeviceChoice::Simulated, device_budget)
            .with_host_budget(2 * model_bytes),
        policy,
        chunk_size: ChunkSize::Fixed(per_layer),
        prefetch_depth: 8,
        trace: false,
    };
    let mut b = Manager::builder(cfg);
    let g = b.group("mlp", &roles);
    let mut w = Vec::new();
    let mut bias = Vec::new();
    for l in 0..LAYERS {
        w.push(b.tensor(g, &format!("layer{l}.weight"), &[WIDTH, WIDTH]));
        bias.push(b.tensor(g, &format!("layer{l}.bias"), &[WIDTH]));
    }
    let m = b.build()?;
    let chunk = |t: TensorId, r: Role| m.chunk_of(t, r);
    println!(
        "model: {LAYERS} layers x {WIDTH}x{WIDTH}, {:.1} MiB in {} chunks per role ({:.1}% used); device budget {:.1} MiB; policy {}",
        model_bytes as f64 / 1048576.0,
        m.layout(g).chunk_sizes.len(),
        m.layout(g).utilisation() * 100.0,
        device_budget as f64 / 1048576.0,
        policy.name()
    );

    // Initialise the student in its chunks; the teacher stays in plain memory.
    let mut rng = Rng(0x5eed);
    let scale = 1.0 / (WIDTH as f32).sqrt();
    for l in 0..LAYERS {
        let mut a = m.access(&[chunk(w[l], Role::Param)], Mode::Write)?;
        a.slice_mut::<f32>(w[l], Role::Param)?.iter_mut().for_each(|x| *x = rng.next() * scale);
        a.slice_mut::<f32>(bias[l], Role::Param)?.fill(0.0);
    }
    let teacher: Vec<(Vec<f32>, Vec<f32>)> = (0..LAYERS)
        .map(|_| {
            let tw = (0..WIDTH * WIDTH).map(|_| rng.next() * scale * 1.5).collect();
            let tb = (0..WIDTH).map(|_| rng.next() * 0.1).collect();
            (tw, tb)
        })
        .collect();

    // The access order of one step, declared for the optimal policy.
    let mut schedule: Vec<ChunkRef> = (0..LAYERS).map(|l| chunk(w[l], Role::Param)).collect();
    for &wl in w.iter().rev() {
        schedule.push(chunk(wl, Role::Param));
        schedule.push(chunk(wl, Role::Grad));
    }
    for &wl in &w {
        schedule.extend([Role::Param, Role::Grad, Role::Moment1, Role::Moment2].map(|r| chunk(wl, r)));
    }
    m.set_schedule(&schedule);

    let mut first_loss = None;
    let mut last_loss = 0.0;
    for step in 1..=steps {
        let x: Vec<f32> = (0..BATCH * WIDTH).map(|_| rng.next()).collect();
        let mut target = x.clone();
        for (l, (tw, tb)) in teacher.iter().enumerate() {
            target = layer_forward(tw, tb, &target, l == LAYERS - 1);
        }
        // Forward, keeping each layer's input (activations are non-model memory).
        let mut acts = vec![x];
        for l in 0..LAYERS {
            let a = m.access(&[chunk(w[l], Role::Param)], Mode::Read)?;
            let y = layer_forward(a.slice(w[l], Role::Param)?, a.slice(bias[l], Role::Param)?, &acts[l], l == LAYERS - 1);
            acts.push(y);
            m.set_non_model_bytes((acts.len() * BATCH * WIDTH * 4) as u64);
        }
        let out = &acts[LAYERS];
        let loss: f32 = out.iter().zip(&target).map(|(o, t)| (o - t) * (o - t)).sum::<f32>() / out.len() as f32;
        let mut dy: Vec<f32> = out.iter().zip(&target).map(|(o, t)| 2.0 * (o - t) / out.len() as f32).collect();
        // Backward: parameters read, gradients written, one layer at a time.
        for l in (0..LAYERS).rev() {
            if l != LAYERS - 1 {
                // Through tanh: acts[l + 1] = tanh(z).
                for (d, y) in dy.iter_mut().zip(&acts[l + 1]) {
                    *d *= 1.0 - y * y;
                }
            }
            let p = m.access(&[chunk(w[l], Role::Param)], Mode::Read)?;
            let mut gr = m.access(&[chunk(w[l], Role::Grad)], Mode::Write)?;
            let wl = p.slice::<f32>(w[l], Role::Param)?;
            let x = &acts[l];
            let gw = gr.slice_mut::<f32>(w[l], Role::Grad)?;
            gw.fill(0.0);
            for n in 0..BATCH {
                for o in 0..WIDTH {
                    let d = dy[n * WIDTH + o];
                    let row = &mut gw[o * WIDTH..(o + 1) * WIDTH];
                    for (gv, xv) in row.iter_mut().zip(&x[n * WIDTH..(n + 1) * WIDTH]) {
                        *gv += d * xv;
                    }
                }
            }
            let mut dx = vec![0f32; BATCH * WIDTH];
            for n in 0..BATCH {
                for o in 0..WIDTH {
                    let d = dy[n * WIDTH + o];
                    for (dxv, wv) in dx[n * WIDTH..(n + 1) * WIDTH].iter_mut().zip(&wl[o * WIDTH..(o + 1) * WIDTH]) {
                        *dxv += d * wv;
                    }
                }
            }
            let gb = gr.slice_mut::<f32>(bias[l], Role::Grad)?;
            for (o, gbv) in gb.iter_mut().enumerate() {
                *gbv = (0..BATCH).map(|n| dy[n * WIDTH + o]).sum();
            }
            dy = dx;
        }
        // Adam, chunk by chunk: parameter, gradient and both moments of a layer together.
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
        for l in 0..LAYERS {
            let refs = [Role::Param, Role::Moment1, Role::Moment2].map(|r| chunk(w[l], r));
            let mut st = m.access(&refs, Mode::Write)?;
            let gr = m.access(&[chunk(w[l], Role::Grad)], Mode::Read)?;
            for t in [w[l], bias[l]] {
                let gv = gr.slice::<f32>(t, Role::Grad)?.to_vec();
                let mut mv = st.slice_mut::<f32>(t, Role::Moment1)?.to_vec();
                let mut vv = st.slice_mut::<f32>(t, Role::Moment2)?.to_vec();
                let pv = st.slice_mut::<f32>(t, Role::Param)?;
                for k in 0..pv.len() {
                    mv[k] = b1 * mv[k] + (1.0 - b1) * gv[k];
                    vv[k] = b2 * vv[k] + (1.0 - b2) * gv[k] * gv[k];
                    pv[k] -= LR * (mv[k] / c1) / ((vv[k] / c2).sqrt() + eps);
                }
                st.slice_mut::<f32>(t, Role::Moment1)?.copy_from_slice(&mv);
                st.slice_mut::<f32>(t, Role::Moment2)?.copy_from_slice(&vv);
            }
        }
        m.end_iteration();
        first_loss.get_or_insert(loss);
        last_loss = loss;
        if step == 1 || step % (steps / 10).max(1) == 0 {
            println!("step {step:4}  loss {loss:.5}");
        }
    }
    m.quiesce();
    let s = m.stats();
    println!("loss {:.5} -> {last_loss:.5}", first_loss.unwrap_or(0.0));
    println!("bytes moved per link:");
    for (link, l) in &s.links {
        println!("  {link:14} {:10.1} MiB in {:6} moves", l.bytes as f64 / 1048576.0, l.moves);
    }
    let dev = &s.tiers["device"];
    println!(
        "device peak {:.1} MiB of {:.1} MiB budget; stalls {:.1} ms over {} accesses ({} hits, {} prefetches)",
        dev.peak as f64 / 1048576.0,
        dev.capacity as f64 / 1048576.0,
        s.stall_us as f64 / 1e3,
        s.accesses,
        s.hits,
        s.prefetches
    );
    Ok(())
}
