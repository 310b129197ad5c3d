//! The streamed NVMe optimizer update equals the in-memory update, with a state larger than
//! the host budget.

mod common;

use common::scratch;
use stowage_memory::optim::{update_streamed, AdamConfig, CpuAdam, Grads, NvmeState, ParamsOut};
use stowage_memory::{ChunkId, DeviceChoice, NvmeConfig, Slot, Tier, Tiers, TiersConfig};

const ELEMS: usize = 16 * 1024; // 64 KiB per slot
const CHUNKS: usize = 12;

fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn to_nvme(t: &Tiers, id: ChunkId, data: &[f32]) -> Slot {
    let mut h = t.alloc(Tier::Host, data.len() * 4).unwrap();
    h.bytes_mut().unwrap().copy_from_slice(bytemuck::cast_slice(data));
    let d = t.alloc(Tier::Nvme, data.len() * 4).unwrap();
    t.copy(id, h, d).wait().unwrap().1
}

fn from_nvme(t: &Tiers, id: ChunkId, s: Slot) -> Vec<f32> {
    let h = t.alloc(Tier::Host, s.len()).unwrap();
    let (_, h) = t.copy(id, s, h).wait().unwrap();
    bytemuck::cast_slice(h.bytes().unwrap()).to_vec()
}

#[test]
fn a_state_larger_than_host_memory_streams_to_the_in_memory_result() {
    let dir = scratch();
    let slot = (ELEMS * 4) as u64;
    let t = Tiers::new(
        TiersConfig::default()
            .with_device(DeviceChoice::None, 0)
            // Ten slots of host memory for 36 slots of state.
            .with_host_budget(10 * slot)
            .with_arena_bytes((10 * slot) as usize)
            .with_nvme(NvmeConfig::new(dir.path()).with_budget(200 * slot)),
    )
    .unwrap();
    let opt = CpuAdam::new(AdamConfig::default(), Some(2)).unwrap();
    let id = |c: usize, k: usize| ChunkId((c * 3 + k) as u64);
    // In memory: the oracle.
    let mut mem: Vec<[Vec<f32>; 3]> = (0..CHUNKS).map(|c| [values(c as u64 + 1, ELEMS), vec![0.0; ELEMS], vec![0.0; ELEMS]]).collect();
    let mut states: Vec<NvmeState> = mem
        .iter()
        .enumerate()
        .map(|(c, s)| NvmeState {
            ids: [id(c, 0), id(c, 1), id(c, 2)],
            slots: [to_nvme(&t, id(c, 0), &s[0]), to_nvme(&t, id(c, 1), &s[1]), to_nvme(&t, id(c, 2), &s[2])],
        })
        .collect();
    // The last chunk is only partly used (an unaligned tail).
    let used = |c: usize| if c == CHUNKS - 1 { ELEMS - 77 } else { ELEMS };
    for step in 1..=3u64 {
        let grads: Vec<Vec<f32>> = (0..CHUNKS).map(|c| values(100 * step + c as u64, used(c))).collect();
        let mut outs_mem: Vec<Vec<u16>> = (0..CHUNKS).map(|c| vec![0; used(c)]).collect();
        let mut outs_nvme = outs_mem.clone();
        for (c, s) in mem.iter_mut().enumerate() {
            let [p, m, v] = s;
            let n = used(c);
            opt.update(step, 0.5, &mut p[..n], &mut m[..n], &mut v[..n], Grads::F32(&grads[c]), ParamsOut::BF16(&mut outs_mem[c]))
                .unwrap();
        }
        let g: Vec<Grads<'_>> = grads.iter().map(|g| Grads::F32(g)).collect();
        let outs: Vec<ParamsOut<'_>> = outs_nvme.iter_mut().map(|o| ParamsOut::BF16(o)).collect();
        states = update_streamed(&t, &opt, step, 0.5, states, &g, outs).unwrap();
        assert_eq!(outs_nvme, outs_mem, "step {step}: compute-precision copies");
    }
    let host = t.stats(Tier::Host).unwrap();
    assert!(host.peak <= 10 * slot && host.peak < 36 * slot, "host peak {}", host.peak);
    for (c, s) in states.into_iter().enumerate() {
        for (k, slot) in s.slots.into_iter().enumerate() {
            let got = from_nvme(&t, s.ids[k], slot);
            assert!(got == mem[c][k], "chunk {c} role {k} differs from the in-memory update");
        }
    }
}
