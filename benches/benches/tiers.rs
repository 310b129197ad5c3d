//! Tier throughput: NVMe write and read per I/O engine, host to (simulated) device copies, and
//! pinned host <-> CUDA copies where a GPU is present, at chunk sizes of 4, 16 and 64 MiB.
//!
//! `cargo bench -p stowage-benches --bench tiers -- --dir DIR --json FILE [--fio SCRIPT]`
//!
//! Every figure includes what a real move costs: checksums on NVMe writes, verification on reads,
//! completion handling. With `--fio`, the anchor script measures the disk's sequential limit on
//! the same directory in the same run and the ratios are reported.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde_json::{json, Value};
use stowage_benches::{fill_pattern, gib_s, run_fio_anchor, Table};
use stowage_memory::{ChunkId, DeviceChoice, DeviceKind, EngineKind, NvmeConfig, Slot, Tier, Tiers, TiersConfig, Transfer};

#[derive(Parser)]
struct Args {
    /// Directory for the NVMe swap files (a local disk).
    #[arg(long)]
    dir: PathBuf,
    /// Where to write the JSON results.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The fio anchor script (shared/anchors/fio_seq.sh) to run on the same directory.
    #[arg(long)]
    fio: Option<PathBuf>,
    /// Bytes moved per measurement, in MiB.
    #[arg(long, default_value_t = 2048)]
    mib: usize,
    /// Bytes kept in flight, in MiB.
    #[arg(long, default_value_t = 256)]
    window_mib: usize,
    /// io_uring queue depth (requests in flight).
    #[arg(long, default_value_t = 32)]
    queue_depth: u32,
    /// Largest single I/O request, in KiB.
    #[arg(long, default_value_t = 4096)]
    segment_kib: usize,
    /// Chunk sizes in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [4usize, 16, 64])]
    sizes: Vec<usize>,
    /// Engines to measure.
    #[arg(long, value_delimiter = ',', default_values_t = ["uring".to_string(), "psync".into(), "mmap".into()])]
    engines: Vec<String>,
    /// Extra arguments for the fio script after DIR (`BLOCK DEPTH SIZE`, e.g. "4M 32" to match
    /// our queue depth); default: the script's own (4M, depth 8, 2G).
    #[arg(long, default_value = "")]
    fio_args: String,
    /// Anchor pairs (fio, then our io_uring engine) to run when `--fio` is given.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const MIB: usize = 1 << 20;

fn engine(name: &str) -> EngineKind {
    match name {
        "uring" => EngineKind::Uring,
        "psync" => EngineKind::Psync,
        "mmap" => EngineKind::Mmap,
        other => {
            eprintln!("unknown engine {other:?} (uring, psync, mmap)");
            std::process::exit(2);
        }
    }
}

/// Runs `count` moves with at most `window` in flight; `start(i, host_slot)` begins move `i`
/// using a recycled host slot and returns its handle; the host side of each finished move is
/// recycled. Returns the elapsed seconds.
fn pipelined(
    count: usize,
    window: usize,
    mut host: Vec<Slot>,
    mut start: impl FnMut(usize, Slot) -> Transfer,
    mut finish: impl FnMut(Slot, Slot) -> Slot,
) -> f64 {
    let t0 = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    for i in 0..count {
        if host.is_empty() || inflight.len() >= window {
            let tr: Transfer = inflight.pop_front().expect("window > 0");
            let (a, b) = tr.wait().unwrap_or_else(|f| panic!("move failed: {f}"));
            host.push(finish(a, b));
        }
        inflight.push_back(start(i, host.pop().expect("a free host slot")));
    }
    for tr in inflight {
        let (a, b) = tr.wait().unwrap_or_else(|f| panic!("move failed: {f}"));
        finish(a, b);
    }
    t0.elapsed().as_secs_f64()
}

fn drop_page_cache(tiers: &Tiers, slots: &[Slot]) {
    use std::os::fd::AsRawFd;
    let mut seen = std::collections::HashSet::new();
    for s in slots {
        if let Some(p) = tiers.nvme_path(s) {
            if seen.insert(p.clone()) {
                if let Ok(f) = std::fs::File::open(&p) {
                    // SAFETY: advisory call on a file we just opened.
                    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                }
            }
        }
    }
}

/// NVMe write then read throughput for one engine and chunk size.
fn nvme(args: &Args, kind: EngineKind, chunk: usize) -> (f64, f64, String) {
    let count = (args.mib * MIB).div_ceil(chunk).max(1);
    let window = (args.window_mib * MIB / chunk).max(2);
    let cfg = TiersConfig::default()
        .with_device(DeviceChoice::None, 0)
        .with_host_budget((window * chunk) as u64)
        .with_arena_bytes(window * chunk)
        .with_nvme(
            NvmeConfig::new(&args.dir)
                .with_engine(kind)
                .with_budget((count * chunk) as u64)
                .with_queue_depth(args.queue_depth)
                .with_segment_bytes(args.segment_kib << 10),
        );
    let tiers = Tiers::new(cfg).unwrap_or_else(|e| panic!("setting up {kind}: {e}"));
    let (used, direct, _) = tiers.nvme_engine().expect("nvme configured");
    let mode = match (used, direct) {
        (EngineKind::Mmap, _) => "mmap (reads from page cache)".to_string(),
        (e, true) => format!("{e}+O_DIRECT"),
        (e, false) => format!("{e} buffered"),
    };
    let host: Vec<Slot> = (0..window)
        .map(|i| {
            let mut s = tiers.alloc(Tier::Host, chunk).expect("host slot");
            fill_pattern(s.bytes_mut().expect("host bytes"), i as u64);
            s
        })
        .collect();
    let mut disk = Vec::with_capacity(count);
    let write_s = pipelined(
        count,
        window,
        host,
        |i, h| tiers.copy(ChunkId(i as u64), h, tiers.alloc(Tier::Nvme, chunk).expect("nvme slot")),
        |h, d| {
            disk.push(d);
            h
        },
    );
    drop_page_cache(&tiers, &disk);
    let host: Vec<Slot> = (0..window).map(|_| tiers.alloc(Tier::Host, chunk).expect("host slot")).collect();
    let mut disk_iter = disk.into_iter().enumerate();
    let read_s = pipelined(
        count,
        window,
        host,
        |_, h| {
            let (i, d) = disk_iter.next().expect("one disk slot per read");
            tiers.copy(ChunkId(i as u64), d, h)
        },
        |_d, h| h,
    );
    let bytes = (count * chunk) as f64;
    (gib_s(bytes, write_s), gib_s(bytes, read_s), mode)
}

/// Host -> device and device -> host copy throughput (CUDA if present, else simulated).
fn device_copies(args: &Args, chunk: usize, choice: DeviceChoice) -> Option<(f64, f64, DeviceKind)> {
    let count = (args.mib * MIB).div_ceil(chunk).max(1);
    let window = (args.window_mib * MIB / chunk).clamp(2, 16);
    let cfg = TiersConfig::default()
        .with_device(choice, (2 * window * chunk) as u64)
        .with_host_budget((2 * window * chunk) as u64)
        .with_arena_bytes(window * chunk);
    let tiers = Tiers::new(cfg).ok()?;
    let kind = tiers.device_kind()?;
    let host: Vec<Slot> = (0..window)
        .map(|i| {
            let mut s = tiers.alloc(Tier::Host, chunk).expect("host slot");
            fill_pattern(s.bytes_mut().expect("host bytes"), i as u64);
            s
        })
        .collect();
    let dev: Vec<Slot> = (0..window).map(|_| tiers.alloc(Tier::Device, chunk).expect("device slot")).collect();
    // Destination slots cycle through a free list shared by the start and finish closures.
    let free_dev = RefCell::new(dev);
    let h2d_s = pipelined(
        count,
        window,
        host,
        |i, h| tiers.copy(ChunkId(i as u64), h, free_dev.borrow_mut().pop().expect("device slot")),
        |h, d| {
            free_dev.borrow_mut().push(d);
            h
        },
    );
    let free_host = RefCell::new((0..window).map(|_| tiers.alloc(Tier::Host, chunk).expect("host slot")).collect::<Vec<_>>());
    let d2h_s = pipelined(
        count,
        window,
        free_dev.into_inner(),
        |i, d| tiers.copy(ChunkId(i as u64), d, free_host.borrow_mut().pop().expect("host slot")),
        |d, h| {
            free_host.borrow_mut().push(h);
            d
        },
    );
    let bytes = (count * chunk) as f64;
    Some((gib_s(bytes, h2d_s), gib_s(bytes, d2h_s), kind))
}

/// `cargo bench` runs benchmarks in the package directory; relative paths are taken from the
/// workspace root instead, where the README's commands are typed.
fn from_root(p: &std::path::Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
    }
}

fn main() {
    let mut args = Args::parse();
    args.dir = from_root(&args.dir);
    args.json = args.json.as_deref().map(from_root);
    args.fio = args.fio.as_deref().map(from_root);
    std::fs::create_dir_all(&args.dir).unwrap_or_else(|e| panic!("creating {}: {e}", args.dir.display()));
    let top = *args.sizes.iter().max().expect("at least one size") * MIB;
    let mut table = Table::new(&["measure", "engine", "chunk MiB", "GiB/s"]);

    // The anchor: fio and our io_uring engine at the largest chunk size, alternated `--repeat`
    // times on the same directory; shared disks drift, so each pair is compared on its own and
    // the median ratio reported.
    let anchor = args.fio.as_ref().map(|script| {
        let mut pairs = Vec::new();
        for _ in 0..args.repeat {
            let fio = run_fio_anchor(script, &args.dir, &args.fio_args);
            let (w, r, _) = nvme(&args, EngineKind::Uring, top);
            println!("anchor pair: fio {fio} / uring write {w:.3} read {r:.3}");
            pairs.push(json!({"fio": fio, "uring_write_gib_s": w, "uring_read_gib_s": r}));
        }
        let median_ratio = |ours: &str, theirs: &str| {
            let mut v: Vec<f64> = pairs
                .iter()
                .filter_map(|p| Some(p[ours].as_f64()? / p["fio"][theirs].as_f64()?))
                .collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied()
        };
        json!({
            "script": script,
            "script_args": args.fio_args,
            "pairs": pairs,
            "median_write_ratio": median_ratio("uring_write_gib_s", "write_gib_s"),
            "median_read_ratio": median_ratio("uring_read_gib_s", "read_gib_s"),
        })
    });

    let mut nvme_json = serde_json::Map::new();
    for name in &args.engines {
        let kind = engine(name);
        let mut per_size = serde_json::Map::new();
        let mut top_figures = (0.0, 0.0);
        for &mib in &args.sizes {
            let (w, r, mode) = nvme(&args, kind, mib * MIB);
            table.row(&["nvme write", &mode, &mib.to_string(), &format!("{w:.3}")]);
            table.row(&["nvme read", &mode, &mib.to_string(), &format!("{r:.3}")]);
            per_size.insert(mib.to_string(), json!({"write_gib_s": w, "read_gib_s": r, "mode": mode}));
            if mib * MIB == top {
                top_figures = (w, r);
            }
        }
        nvme_json.insert(
            kind.name().into(),
            json!({"write_gib_s": top_figures.0, "read_gib_s": top_figures.1, "per_size_mib": per_size}),
        );
    }

    let mut host_per_size = serde_json::Map::new();
    let mut host_copy = 0.0;
    for &mib in &args.sizes {
        if let Some((h2d, d2h, _)) = device_copies(&args, mib * MIB, DeviceChoice::Simulated) {
            table.row(&["host->sim device", "memcpy", &mib.to_string(), &format!("{h2d:.3}")]);
            table.row(&["sim device->host", "memcpy", &mib.to_string(), &format!("{d2h:.3}")]);
            host_per_size.insert(mib.to_string(), json!({"h2d_gib_s": h2d, "d2h_gib_s": d2h}));
            if mib * MIB == top {
                host_copy = h2d;
            }
        }
    }

    let mut cuda = Value::Null;
    let mut cuda_per_size = serde_json::Map::new();
    for &mib in &args.sizes {
        if let Some((h2d, d2h, DeviceKind::Cuda)) = device_copies(&args, mib * MIB, DeviceChoice::Cuda) {
            table.row(&["pinned host->cuda", "copy stream", &mib.to_string(), &format!("{h2d:.3}")]);
            table.row(&["cuda->pinned host", "copy stream", &mib.to_string(), &format!("{d2h:.3}")]);
            cuda_per_size.insert(mib.to_string(), json!({"h2d_gib_s": h2d, "d2h_gib_s": d2h}));
            if mib * MIB == top {
                cuda = json!({"h2d_gib_s": h2d, "d2h_gib_s": d2h});
            }
        }
    }
    if let Value::Object(m) = &mut cuda {
        m.insert("per_size_mib".into(), Value::Object(cuda_per_size));
    } else {
        println!("cuda: no usable GPU here; CUDA copies not measured");
    }

    let mut out = json!({
        "nvme": nvme_json,
        "host_copy_gib_s": host_copy,
        "host_copy_per_size_mib": host_per_size,
        "cuda": cuda,
        "bytes_per_measurement": args.mib * MIB,
        "window_bytes": args.window_mib * MIB,
    });
    if let Some(anchor) = anchor {
        println!(
            "uring / fio at {} MiB chunks, median of {} pairs: write {}, read {}",
            top / MIB,
            args.repeat,
            anchor["median_write_ratio"],
            anchor["median_read_ratio"]
        );
        out["anchor"] = anchor;
    }
    table.print();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out).expect("json")).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
}
