//! Streaming the update of optimizer state that lives on NVMe: each chunk's fp32 master and
//! moments are read into host slots, updated, and written back to fresh NVMe slots, with the
//! next chunk's reads in flight while the current one updates and the previous one's writes
//! draining. Host memory stays at three chunks' worth of slots, whatever the state's size.
//!
//! Writes go to new slots and the old ones are released only once the write completed, so a
//! failed write (a full disk) leaves the previous state readable.

use crate::error::{Error, Result};
use crate::pool::Slot;
use crate::tier::{ChunkId, Tier};
use crate::tiers::Tiers;
use crate::transfer::Transfer;

use super::{CpuAdam, Grads, ParamsOut};

/// One chunk's optimizer state on NVMe: master, first and second moment, with their ids.
#[derive(Debug)]
pub struct NvmeState {
    pub ids: [ChunkId; 3],
    pub slots: [Slot; 3],
}

fn as_f32(s: &mut Slot) -> Result<&mut [f32]> {
    let b = s.bytes_mut().expect("host slots are CPU-addressable");
    bytemuck::try_cast_slice_mut(b).map_err(|e| Error::InvalidState(format!("state slot is not f32: {e}")))
}

fn wait_all(ts: Vec<Transfer>) -> Result<Vec<(Slot, Slot)>> {
    let mut out = Vec::with_capacity(ts.len());
    let mut first_err = None;
    for t in ts {
        match t.wait() {
            Ok(pair) => out.push(pair),
            Err(f) => {
                first_err.get_or_insert(f.error);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// A chunk's state being written: the writes, the NVMe slots they replace, the ids.
type Writing = (Vec<Transfer>, Vec<Slot>, [ChunkId; 3]);

/// Waits for a chunk's writes, then releases the slots they replace.
fn finish_writes((writes, old, ids): Writing) -> Result<NvmeState> {
    let written = wait_all(writes)?;
    drop(old);
    let slots: Vec<Slot> = written.into_iter().map(|(_host, disk)| disk).collect();
    Ok(NvmeState {
        ids,
        slots: slots.try_into().expect("three slots"),
    })
}

fn read(tiers: &Tiers, s: NvmeState) -> Result<(Vec<Transfer>, [ChunkId; 3])> {
    let mut ts = Vec::with_capacity(3);
    for (id, slot) in s.ids.into_iter().zip(s.slots) {
        if slot.tier() != Tier::Nvme {
            return Err(Error::InvalidState(format!("streamed optimizer state {id} is not on NVMe")));
        }
        let host = tiers.alloc(Tier::Host, slot.len())?;
        ts.push(tiers.copy(id, slot, host));
    }
    Ok((ts, s.ids))
}

/// Updates every chunk of `states` with `opt` (step `step`, gradient multiplier `grad_mult`),
/// `grads[i]` and `outs[i]` belonging to chunk `i`. Returns the new states (fresh NVMe slots).
///
/// On an error the update stops; chunks already written have their new state, the others are
/// lost only if their read failed (their NVMe copies are released only after a successful write).
pub fn update_streamed(
    tiers: &Tiers,
    opt: &CpuAdam,
    step: u64,
    grad_mult: f32,
    states: Vec<NvmeState>,
    grads: &[Grads<'_>],
    mut outs: Vec<ParamsOut<'_>>,
) -> Result<Vec<NvmeState>> {
    if grads.len() != states.len() || outs.len() != states.len() {
        return Err(Error::InvalidState(format!(
            "{} states, {} gradient slices, {} outputs",
            states.len(),
            grads.len(),
            outs.len()
        )));
    }
    let n = states.len();
    let mut pending = states.into_iter();
    let mut next = pending.next().map(|s| read(tiers, s)).transpose()?;
    let mut writing: Option<Writing> = None;
    let mut done = Vec::with_capacity(n);
    for (i, out) in outs.drain(..).enumerate() {
        let (reads, ids) = next.take().expect("one read per chunk");
        // The next chunk's reads go out before this one is waited for.
        next = pending.next().map(|s| read(tiers, s)).transpose()?;
        let pairs = wait_all(reads)?;
        // `old`: the NVMe slots read from, released once the new copies are written.
        let (old, mut host): (Vec<Slot>, Vec<Slot>) = pairs.into_iter().unzip();
        {
            let [p, m, v] = &mut host[..] else { unreachable!("three slots per chunk") };
            let (p, m, v) = (as_f32(p)?, as_f32(m)?, as_f32(v)?);
            let len = grads[i].len();
            if len > p.len() {
                return Err(Error::InvalidState(format!("chunk {i}: {len} gradients for a {}-element state", p.len())));
            }
            opt.update(step, grad_mult, &mut p[..len], &mut m[..len], &mut v[..len], grads[i], out)?;
        }
        // The previous chunk's writes must be on disk before its old slots go.
        if let Some(w) = writing.take() {
            done.push(finish_writes(w)?);
        }
        let mut ws = Vec::with_capacity(3);
        for (id, h) in ids.iter().zip(host) {
            let disk = tiers.alloc(Tier::Nvme, h.len())?;
            ws.push(tiers.copy(*id, h, disk));
        }
        writing = Some((ws, old, ids));
    }
    if let Some(w) = writing.take() {
        done.push(finish_writes(w)?);
    }
    Ok(done)
}
