//! Checks and preparations when a manager is built: whether the model fits the tiers at all,
//! and its NVMe swap files made up front.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::tier::{ChunkId, Tier};
use crate::tiers::Tiers;

/// Makes the NVMe tier's swap files for every chunk now (at most its budget), writing them
/// through once with `write`: made later, each would stall the disk's requests in flight while
/// the file system allocates it (see [`crate::SwapFiles`]). A disk with less room keeps what was made,
/// and the rest is made as chunks go down (an error then names the disk).
pub(super) fn preallocate(tiers: &Tiers, order: &[(ChunkId, u64, bool)], write: bool) {
    let need: u64 = order.iter().map(|c| c.1).sum();
    let Some(slot) = order.iter().map(|c| c.1).max() else { return };
    let t0 = Instant::now();
    match tiers.reserve(Tier::Nvme, need, slot as usize, write) {
        Ok(got) => log::info!(
            "nvme: {got} bytes of swap files {} for {need} bytes of chunks in {:.2} s",
            if write { "made and written" } else { "reserved" },
            t0.elapsed().as_secs_f64()
        ),
        Err(e) => log::warn!("nvme: making swap files for {need} bytes of chunks up front: {e}; the rest is made as chunks go down"),
    }
}

/// Refuses a model that cannot fit in all tiers together, with the bytes per tier.
pub(super) fn check_fits(tiers: &Tiers, order: &[(ChunkId, u64, bool)]) -> Result<()> {
    let need: u64 = order.iter().map(|c| c.1).sum();
    let biggest = order.iter().map(|c| c.1).max().unwrap_or(0);
    let cap = |t: Tier| tiers.stats(t).map_or(0, |s| s.capacity);
    // Every chunk needs a home below the device, plus room to bring the largest one up.
    let below = cap(Tier::Host) + cap(Tier::Nvme);
    if need > below + cap(Tier::Device) || biggest > cap(Tier::Device) {
        return Err(Error::unsupported(
            format!("a model of {need} bytes in chunks (largest chunk {biggest} bytes)"),
            format!(
                "budgets are device {}, host {}, nvme {} bytes: raise them, add an NVMe tier, or use smaller chunks",
                cap(Tier::Device),
                cap(Tier::Host),
                cap(Tier::Nvme)
            ),
        ));
    }
    Ok(())
}
