//! CPU AdamW throughput on 64M parameters with all threads: ours with fp32 gradients and with
//! bf16 gradients (writing the bf16 parameter copy in the same sweep), against the memory-
//! bandwidth bound (a kernel touching the same 28 bytes per parameter with trivial arithmetic)
//! and, with `--torch-python PY`, torch's fused AdamW on the same machine in the same run
//! (the anchor script `shared/anchors/torch_adamw.py`; an in-process libtorch comparison
//! comes with the libtorch set-up).
//!
//! `cargo bench -p stowage-benches --bench adam -- [--json FILE] [--torch-python PY --anchor SCRIPT]`

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde_json::{json, Value};
use stowage_benches::{fill_pattern, Table};
use stowage_memory::optim::{convert::f32_to_bf16, AdamConfig, CpuAdam, Grads, ParamsOut};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    json: Option<PathBuf>,
    /// Parameters (default 64M).
    #[arg(long, default_value_t = 64 << 20)]
    params: usize,
    /// Timed steps per variant (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Python with torch installed, to run the anchor.
    #[arg(long)]
    torch_python: Option<PathBuf>,
    /// The torch AdamW anchor script.
    #[arg(long, default_value = "../shared/anchors/torch_adamw.py")]
    anchor: PathBuf,
    #[arg(long, hide = true)]
    bench: bool,
}

fn from_root(p: &std::path::Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
    }
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut bytes = vec![0u8; n * 4];
    fill_pattern(&mut bytes, seed);
    bytes
        .chunks_exact(4)
        .map(|b| (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
        .collect()
}

/// The memory-bandwidth bound for Adam's traffic: a kernel that touches exactly what an fp32
/// AdamW step touches (reads p, m, v, g; writes p, m, v: 28 bytes per parameter) with trivial
/// arithmetic, on all threads. Returns (params per second, bytes per second).
fn bandwidth_bound(threads: usize, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) -> (f64, f64) {
    let n = p.len();
    let per = n.div_ceil(threads).div_ceil(64) * 64;
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for (((p, m), v), g) in p.chunks_mut(per).zip(m.chunks_mut(per)).zip(v.chunks_mut(per)).zip(g.chunks(per)) {
                s.spawn(move || {
                    for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                        *p += g;
                        *m += g;
                        *v += g;
                    }
                });
            }
        });
        best = best.max(n as f64 / t.elapsed().as_secs_f64());
    }
    (best, best * 28.0)
}

fn torch_anchor(py: &std::path::Path, script: &std::path::Path, n: usize) -> Value {
    let out = std::process::Command::new(py).arg(script).arg(n.to_string()).output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let get = |name: &str| {
                text.lines()
                    .find(|l| l.starts_with(&format!("torch_adamw_{name} ")))
                    .and_then(|l| l.split("params_per_s=").nth(1))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            };
            json!({"fused_params_per_s": get("fused"), "foreach_params_per_s": get("foreach"), "source": "python anchor"})
        }
        Ok(o) => json!({"error": String::from_utf8_lossy(&o.stderr).trim().to_string()}),
        Err(e) => json!({"error": e.to_string()}),
    }
}

fn main() {
    let args = Args::parse();
    let n = args.params;
    let opt = CpuAdam::new(AdamConfig::default(), None).expect("optimizer threads");
    println!("{} threads, kernel {:?}, {} parameters", opt.threads(), opt.isa(), n);
    let mut p = random(n, 1);
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let g32 = random(n, 2);
    let g16: Vec<u16> = g32.iter().map(|&x| f32_to_bf16(x)).collect();
    let mut out = vec![0u16; n];

    let mut time = |bf16: bool| {
        let mut best = f64::MAX;
        for step in 0..=args.steps {
            let t = Instant::now();
            let (g, o) = if bf16 {
                (Grads::BF16(&g16), ParamsOut::BF16(&mut out))
            } else {
                (Grads::F32(&g32), ParamsOut::None)
            };
            opt.update(step as u64 + 1, 1.0, &mut p, &mut m, &mut v, g, o).expect("update");
            if step > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        n as f64 / best
    };
    let fp32 = time(false);
    let bf16 = time(true);
    // Both variants move 28 bytes per parameter (bf16: 2-byte gradients in, a 2-byte copy out).
    let (bound, bw) = bandwidth_bound(opt.threads(), &mut p, &mut m, &mut v, &g32);
    let torch = args.torch_python.as_ref().map(|py| torch_anchor(py, &from_root(&args.anchor), n));

    let mut t = Table::new(&["variant", "Mparams/s", "of bandwidth bound"]);
    t.row(&["ours, fp32 grads", &format!("{:.0}", fp32 / 1e6), &format!("{:.0}%", 100.0 * fp32 / bound)]);
    t.row(&["ours, bf16 grads + bf16 copy", &format!("{:.0}", bf16 / 1e6), &format!("{:.0}%", 100.0 * bf16 / bound)]);
    t.row(&["bandwidth bound", &format!("{:.0}", bound / 1e6), &format!("{:.1} GB/s at 28 B/param", bw / 1e9)]);
    let torch_fused = torch.as_ref().and_then(|t| t["fused_params_per_s"].as_f64());
    if let Some(c) = torch_fused {
        t.row(&["torch fused AdamW (anchor)", &format!("{:.0}", c / 1e6), &format!("{:.0}%", 100.0 * c / bound)]);
        println!("ratios: fp32/torch {:.2}, bf16/torch {:.2}", fp32 / c, bf16 / c);
    }
    t.print();
    let result = json!({
        "fp32_grads": {"params_per_s": fp32},
        "bf16_grads": {"params_per_s": bf16},
        "torch_fused_adamw": torch.unwrap_or(Value::Null),
        "bandwidth_bound_params_per_s": bound,
        "bandwidth_bytes_per_s": bw,
        "threads": opt.threads(),
        "kernel": format!("{:?}", opt.isa()),
        "params": n,
    });
    if let Some(path) = &args.json {
        let path = from_root(path);
        std::fs::write(&path, serde_json::to_string_pretty(&result).expect("json")).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
}
