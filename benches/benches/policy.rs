//! Placement policies on access traces, in the pure simulator (no I/O): bytes each policy
//! fetches into the device and writes back, and the ratio to Belady's minimum for the same
//! trace and budget.
//!
//! `cargo bench -p stowage-benches --bench policy -- --json FILE`

use std::path::PathBuf;

use clap::Parser;
use serde_json::{json, Value};
use stowage_benches::Table;
use stowage_memory::manager::sim::{belady, ppo_trace, simulate, transformer_trace, Trace};
use stowage_memory::PolicyKind;

#[derive(Parser)]
struct Args {
    /// Where to write the JSON results (relative to the repository root).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Transformer blocks per model in the traces.
    #[arg(long, default_value_t = 12)]
    blocks: u64,
    /// Iterations per trace.
    #[arg(long, default_value_t = 4)]
    iterations: usize,
    /// Seed of the PPO trace's generation lengths.
    #[arg(long, default_value_t = 17)]
    seed: u64,
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    let chunk = 32 << 20;
    let traces: Vec<Trace> = vec![
        transformer_trace(args.blocks, 2, chunk, args.iterations),
        ppo_trace(args.blocks, 2, chunk, args.iterations, args.seed),
    ];
    let mut table = Table::new(&["trace", "budget", "policy", "fetched GiB", "ratio to min", "written back GiB"]);
    let mut rows = Vec::new();
    for t in &traces {
        let model = t.model_bytes();
        let param_bytes: u64 = t.chunks.iter().filter(|c| !c.2).map(|c| c.1).sum();
        for frac in [0.25, 0.5, 0.75] {
            let cap = (model as f64 * frac) as u64;
            let min = belady(t, cap).expect("belady fits");
            // Static: parameters pinned up to half the budget, the rest streamed.
            let stat = PolicyKind::Static {
                param_frac: (0.5 * cap as f64 / param_bytes as f64).min(1.0),
                optim_frac: 0.0,
            };
            let mut policies = serde_json::Map::new();
            for kind in [PolicyKind::Optimal, PolicyKind::Auto, stat, PolicyKind::Lru] {
                let r = match simulate(t, kind, cap) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("{} at {frac}: {} failed: {e}", t.name, kind.name());
                        continue;
                    }
                };
                let ratio = r.bytes_fetched as f64 / min.bytes_fetched as f64;
                table.row(&[
                    &t.name,
                    &format!("{:.0}%", frac * 100.0),
                    kind.name(),
                    &format!("{:.2}", r.bytes_fetched as f64 / (1u64 << 30) as f64),
                    &format!("{ratio:.3}"),
                    &format!("{:.2}", r.bytes_written_back as f64 / (1u64 << 30) as f64),
                ]);
                policies.insert(
                    kind.name().into(),
                    json!({"bytes_fetched": r.bytes_fetched, "ratio_to_min": ratio, "bytes_written_back": r.bytes_written_back}),
                );
            }
            rows.push(json!({
                "name": t.name,
                "budget_frac": frac,
                "model_bytes": model,
                "min_bytes_fetched": min.bytes_fetched,
                "policies": Value::Object(policies),
            }));
        }
    }
    table.print();
    if let Some(path) = &args.json {
        let path = if path.is_absolute() { path.clone() } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path) };
        std::fs::write(&path, serde_json::to_string_pretty(&json!({"traces": rows})).expect("json"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
}
