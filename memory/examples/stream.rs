//! Read-only passes over a model larger than the device, as generation makes them: every pass
//! reads every parameter chunk in the same order, with a little compute per chunk. Prints, per
//! pass, the chunks read from NVMe and from host memory, the time stalled and the wall time:
//! what the prefetcher keeps resident across passes and what it re-reads.
//!
//! `cargo run --release -p stowage-memory --example stream -- --dir /var/tmp/x [--chunks 93
//! --device 37 --host 35 --mib 8 --compute-ms 4 --passes 8 --depth 64 --policy auto|optimal]`

use std::time::{Duration, Instant};

use stowage_memory::{ChunkSize, DType, DeviceChoice, Manager, ManagerConfig, Mode, NvmeConfig, PolicyKind, Role, TiersConfig};

fn main() -> stowage_memory::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
    };
    let bad = |name: &str| -> ! {
        eprintln!("{name} takes a number");
        std::process::exit(2)
    };
    let num = |name: &str, default: &str| -> u64 { arg(name, default).parse().unwrap_or_else(|_| bad(name)) };
    let (n, dev, host, mib) = (num("--chunks", "93"), num("--device", "37"), num("--host", "35"), num("--mib", "8"));
    let compute_ms: f64 = arg("--compute-ms", "4").parse().unwrap_or_else(|_| bad("--compute-ms"));
    let compute = Duration::from_micros((compute_ms * 1000.0) as u64);
    let passes = num("--passes", "8");
    let dir = std::path::PathBuf::from(arg("--dir", "/var/tmp/stowage-stream"));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("creating --dir {}: {e}", dir.display());
        std::process::exit(2);
    }
    let elems = (mib << 20) as usize / 4;
    let cb = (elems * 4) as u64;
    let cfg = ManagerConfig {
        tiers: TiersConfig::default()
            .with_device(DeviceChoice::Simulated, dev * cb)
            .with_host_budget(host * cb)
            .with_nvme(NvmeConfig::new(&dir).with_budget((n + 4) * cb)),
        policy: if arg("--policy", "auto") == "optimal" { PolicyKind::Optimal } else { PolicyKind::Auto },
        chunk_size: ChunkSize::Fixed(elems),
        prefetch_depth: num("--depth", "64") as usize,
        trace: false,
    };
    let mut b = Manager::builder(cfg);
    let g = b.group("actor", &[(Role::Param, DType::F32)]);
    for i in 0..n {
        b.tensor(g, &format!("w{i}"), &[elems]);
    }
    let m = b.build()?;
    let all = m.chunks(0, Role::Param);
    m.set_schedule(&all);
    // Pass 0 writes the weights (most go to NVMe); the later ones only read.
    for pass in 0..=passes {
        let before = m.stats();
        let t = Instant::now();
        for &r in &all {
            let mode = if pass == 0 { Mode::Write } else { Mode::Read };
            let a = m.access(&[r], mode)?;
            std::thread::sleep(compute);
            drop(a);
        }
        m.end_iteration();
        let s = m.stats();
        let moves = |l: &str| s.links.get(l).map_or(0, |x| x.moves) - before.links.get(l).map_or(0, |x| x.moves);
        println!(
            "pass {pass}: {:.2} s, stalled {:.2} s, nvme->device {}, nvme->host {}, host->device {}, device->host {}, writes to nvme {}",
            t.elapsed().as_secs_f64(),
            (s.stall_us - before.stall_us) as f64 / 1e6,
            moves("nvme->device"),
            moves("nvme->host"),
            moves("host->device"),
            moves("device->host"),
            moves("host->nvme") + moves("device->nvme"),
        );
    }
    Ok(())
}
