//! Prefetch overlap: a layer-streamed training loop on the simulated device with a throttled
//! host<->device link and a fixed compute time per block, run with and without prefetching.
//! Prints the stall time (accesses waiting for data) of each and their ratio.
//!
//! `cargo bench -p stowage-benches --bench overlap -- [--json FILE]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use stowage_benches::Table;
use stowage_memory::{ChunkRef, ChunkSize, DType, DeviceChoice, Manager, ManagerConfig, Mode, PolicyKind, Role, TiersConfig};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    json: Option<PathBuf>,
    /// Blocks in the model.
    #[arg(long, default_value_t = 16)]
    blocks: usize,
    /// Chunk size in MiB (one chunk per block).
    #[arg(long, default_value_t = 16)]
    chunk_mib: usize,
    /// Link bandwidth of the simulated device, GiB/s.
    #[arg(long, default_value_t = 4.0)]
    link_gib_s: f64,
    /// Compute time per block as a multiple of one chunk's transfer time.
    #[arg(long, default_value_t = 1.5)]
    compute_ratio: f64,
    /// Device budget in blocks.
    #[arg(long, default_value_t = 4)]
    device_blocks: usize,
    #[arg(long, default_value_t = 3)]
    iterations: usize,
    #[arg(long, hide = true)]
    bench: bool,
}

struct Run {
    stall: Duration,
    wall: Duration,
    prefetches: u64,
    hits: u64,
    accesses: u64,
}

fn run(args: &Args, policy: PolicyKind, prefetch_depth: usize) -> Run {
    let chunk = args.chunk_mib << 20;
    let bw = args.link_gib_s * (1u64 << 30) as f64;
    let compute = Duration::from_secs_f64(args.compute_ratio * chunk as f64 / bw);
    let cfg = ManagerConfig {
        tiers: TiersConfig::default()
            .with_device(DeviceChoice::Simulated, (args.device_blocks * chunk) as u64)
            .with_sim_bandwidth(bw)
            .with_host_budget((args.blocks * chunk * 2) as u64),
        policy,
        chunk_size: ChunkSize::Fixed(chunk / 4),
        prefetch_depth,
        trace: false,
    };
    let mut b = Manager::builder(cfg);
    let g = b.group("model", &[(Role::Param, DType::F32)]);
    for i in 0..args.blocks {
        b.tensor(g, &format!("block{i}"), &[chunk / 4]);
    }
    let m = b.build().expect("manager");
    let blocks: Vec<ChunkRef> = m.chunks(g, Role::Param);
    // Forward 0..L, backward L..0: the access order of layer-streamed training with recompute.
    let schedule: Vec<ChunkRef> = blocks.iter().chain(blocks.iter().rev()).copied().collect();
    m.set_schedule(&schedule);
    // Materialise every chunk once (first touch is not what is measured).
    for &r in &blocks {
        drop(m.access(&[r], Mode::Write).expect("access"));
    }
    m.end_iteration();
    m.quiesce();
    let before = m.stats();
    let t0 = Instant::now();
    for _ in 0..args.iterations {
        for &r in &schedule {
            let a = m.access(&[r], Mode::Read).expect("access");
            std::thread::sleep(compute);
            drop(a);
        }
        m.end_iteration();
    }
    let wall = t0.elapsed();
    let after = m.stats();
    Run {
        stall: Duration::from_micros(after.stall_us - before.stall_us),
        wall,
        prefetches: after.prefetches - before.prefetches,
        hits: after.hits - before.hits,
        accesses: after.accesses - before.accesses,
    }
}

fn main() {
    let args = Args::parse();
    let mut table = Table::new(&["policy", "prefetch", "stall ms", "wall ms", "hits/accesses", "prefetches"]);
    let mut out = serde_json::Map::new();
    for policy in [PolicyKind::Optimal, PolicyKind::Auto] {
        let off = run(&args, policy, 0);
        let on = run(&args, policy, 64);
        for (name, r) in [("off", &off), ("on", &on)] {
            table.row(&[
                policy.name(),
                name,
                &format!("{:.1}", r.stall.as_secs_f64() * 1e3),
                &format!("{:.1}", r.wall.as_secs_f64() * 1e3),
                &format!("{}/{}", r.hits, r.accesses),
                &r.prefetches.to_string(),
            ]);
        }
        let ratio = on.stall.as_secs_f64() / off.stall.as_secs_f64().max(1e-9);
        println!("{}: stall with prefetch / without = {ratio:.4}", policy.name());
        out.insert(
            policy.name().into(),
            json!({
                "stall_ms_without_prefetch": off.stall.as_secs_f64() * 1e3,
                "stall_ms_with_prefetch": on.stall.as_secs_f64() * 1e3,
                "stall_ratio": ratio,
                "wall_ms_without_prefetch": off.wall.as_secs_f64() * 1e3,
                "wall_ms_with_prefetch": on.wall.as_secs_f64() * 1e3,
            }),
        );
    }
    table.print();
    if let Some(path) = &args.json {
        let path = if path.is_absolute() { path.clone() } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path) };
        std::fs::write(&path, serde_json::to_string_pretty(&serde_json::Value::Object(out)).expect("json"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
}
