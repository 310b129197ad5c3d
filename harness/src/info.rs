//! `stowage info`: what memory tiers this machine offers.

use std::path::Path;

use stowage_memory::{DeviceChoice, DeviceKind, EngineKind, NvmeConfig, Tiers, TiersConfig};

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
    let report = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "device": device,
        "host": { "page_locked": tiers.device_kind() == Some(DeviceKind::Cuda), "slot_align": tiers.slot_align() },
        "nvme": nvme,
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
    println!("host:   {pinned}, slots aligned to {} bytes", tiers.slot_align());
    match tiers.nvme_engine() {
        Some((e, direct, dir)) => println!(
            "nvme:   {} engine on {}, {}",
            e,
            dir.display(),
            if direct { "O_DIRECT" } else { "buffered" }
        ),
        None => println!("nvme:   not configured (pass --nvme-dir DIR)"),
    }
    println!(
        "torch:  libtorch linked, CUDA {}",
        if tch::Cuda::is_available() { format!("available ({} devices)", tch::Cuda::device_count()) } else { "not available".into() }
    );
    for n in tiers.notes() {
        println!("note:   {n}");
    }
    Ok(())
}
