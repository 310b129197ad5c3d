//! `stowage info`: what memory tiers this machine offers.

use std::path::Path;

use stowage_memory::{DeviceChoice, DeviceKind, EngineKind, NvmeConfig, Tiers, TiersConfig};

/// `MemTotal` and `MemAvailable` from /proc/meminfo, bytes.
fn host_memory() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (get("MemTotal:"), get("MemAvailable:"))
}

/// Free bytes on the file system holding `dir`.
fn disk_free(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer of the right type for statvfs to
    // fill; it is read only after a successful call.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between libc targets (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    Some(free)
}

/// The tiers this machine offers, as JSON: device (CUDA or simulated), host, NVMe engine, and
/// the fallbacks taken with their reasons.
pub fn report(nvme_dir: Option<&Path>, engine: EngineKind) -> stowage_memory::Result<(Tiers, serde_json::Value)> {
    let mut cfg = TiersConfig::default().with_device(DeviceChoice::Auto, 1 << 20);
    if let Some(dir) = nvme_dir {
        cfg = cfg.with_nvme(NvmeConfig::new(dir).with_engine(engine).with_budget(1 << 20));
    }
    let tiers = Tiers::new(cfg)?;
    let device = match (tiers.device_kind(), tiers.cuda_info()) {
        (Some(DeviceKind::Cuda), Some(c)) => serde_json::json!({
            "kind": "cuda", "ordinal": c.ordinal, "name": c.name, "total_bytes": c.total_bytes,
        }),
        _ => serde_json::json!({ "kind": "simulated" }),
    };
    let nvme = tiers.nvme_engine().map(|(engine, direct, dir)| {
        serde_json::json!({ "dir": dir, "engine": engine.name(), "o_direct": direct })
    });
    let (ram_total, ram_available) = host_memory();
    let nvme_free = tiers.nvme_engine().and_then(|(_, _, d)| disk_free(&d));
    let report = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "device": device,
        "host": { "page_locked": tiers.device_kind() == Some(DeviceKind::Cuda), "slot_align": tiers.slot_align(), "ram_total_bytes": ram_total, "ram_available_bytes": ram_available },
        "nvme": nvme,
        "budgets": {
            "device": "--device-budget (default: the model's whole chunk state)",
            "host": "--host-budget (default: the model's whole chunk state)",
            "nvme_free_bytes": nvme_free,
        },
        "libtorch": { "cuda": tch::Cuda::is_available(), "cuda_devices": tch::Cuda::device_count() },
        "notes": tiers.notes(),
    });
    Ok((tiers, report))
}

/// `stowage info`: prints the report as text, or as JSON with `json`.
pub fn run(nvme_dir: Option<&Path>, engine: EngineKind, json: bool) -> stowage_memory::Result<()> {
    let (tiers, report) = report(nvme_dir, engine)?;
    if json {
        println!("{report:#}");
        return Ok(());
    }
    println!("stowage {}", env!("CARGO_PKG_VERSION"));
    match tiers.cuda_info() {
        Some(c) => println!("device: CUDA {} ({}), {:.1} GiB", c.ordinal, c.name, c.total_bytes as f64 / (1u64 << 30) as f64),
        None => println!("device: simulated (host memory standing in for a GPU)"),
    }
    let pinned = if tiers.device_kind() == Some(DeviceKind::Cuda) { "page-locked" } else { "pageable (no CUDA)" };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let (ram_total, ram_available) = host_memory();
    println!("host:   {pinned}, slots aligned to {} bytes; RAM {:.1} GiB, {:.1} GiB available", tiers.slot_align(), gib(ram_total), gib(ram_available));
    match tiers.nvme_engine() {
        Some((e, direct, dir)) => println!(
            "nvme:   {} engine on {}, {}, {}",
            e,
            dir.display(),
            if direct { "O_DIRECT" } else { "buffered" },
            disk_free(&dir).map_or("free space unknown".into(), |b| format!("{:.1} GiB free", gib(b)))
        ),
        None => println!("nvme:   not configured (pass --nvme-dir DIR)"),
    }
    println!(
        "torch:  libtorch linked, CUDA {}",
        if tch::Cuda::is_available() { format!("available ({} devices)", tch::Cuda::device_count()) } else { "not available".into() }
    );
    println!("budgets: --device-budget and --host-budget cap each tier (default: the model's whole chunk state); past them chunks spill to --nvme-dir");
    for n in tiers.notes() {
        println!("note:   {n}");
    }
    Ok(())
}
