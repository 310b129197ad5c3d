//! Packing tensors into chunks.
//!
//! Tensors are registered in first-use order into a *group* (one model, say) whose roles are
//! fixed up front: the parameter in its compute dtype, and optionally its gradient, fp32 master
//! and optimizer moments. All roles of a group share one element layout: tensor `t` sits at the
//! same element offset of chunk `i` in every role. So a parameter chunk and its master and
//! moment chunks are *paired*, and the optimizer walks them in lockstep. Roles differ only in
//! dtype, hence in bytes.
//!
//! Packing is sequential first-fit (a tensor goes into the current chunk if it fits, else opens
//! the next), with offsets aligned for SIMD and DMA; a tensor larger than the chunk gets a chunk
//! of its own. The chunk size is chosen by searching a range for the least waste.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Element types a chunk can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// What a tensor is for. Each role of a group gets its own chunks, paired with the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The parameter in compute precision.
    Param,
    /// Its gradient.
    Grad,
    /// The fp32 master copy.
    Master,
    /// First optimizer moment (Adam's m).
    Moment1,
    /// Second optimizer moment (Adam's v).
    Moment2,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Param, Role::Grad, Role::Master, Role::Moment1, Role::Moment2];

    pub fn index(self) -> usize {
        self as usize
    }

    /// Parameter-side (needed for forward and backward) as opposed to optimizer state.
    pub fn is_optimizer_state(self) -> bool {
        matches!(self, Role::Master | Role::Moment1 | Role::Moment2)
    }
}

/// Elements per tensor offset alignment: 128 bytes for the widest dtype keeps every tensor on a
/// cache line and a full AVX-512 vector.
const ALIGN_BYTES: usize = 128;

/// Where a registered tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Index of the chunk (the same index in every role of the group).
    pub chunk: usize,
    /// Element offset inside the chunk.
    pub offset: usize,
    /// Number of elements.
    pub numel: usize,
}

/// A registered tensor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub placement: Placement,
}

/// The packed layout of one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupLayout {
    /// The roles this group has, with their dtypes.
    pub roles: Vec<(Role, DType)>,
    /// Elements per regular chunk.
    pub chunk_elems: usize,
    /// Elements of each chunk (regular chunks have `chunk_elems`; an oversized tensor's chunk is
    /// its size rounded up to the granule).
    pub chunk_sizes: Vec<usize>,
    pub tensors: Vec<TensorInfo>,
}

impl GroupLayout {
    /// Bytes of chunk `i` in `role`.
    pub fn chunk_bytes(&self, i: usize, role: Role) -> Option<usize> {
        let dt = self.dtype(role)?;
        Some(self.chunk_sizes[i] * dt.size())
    }

    pub fn dtype(&self, role: Role) -> Option<DType> {
        self.roles.iter().find(|r| r.0 == role).map(|r| r.1)
    }

    /// Used elements over chunk elements.
    pub fn utilisation(&self) -> f64 {
        let used: usize = self.tensors.iter().map(|t| t.placement.numel).sum();
        let total: usize = self.chunk_sizes.iter().sum();
        if total == 0 {
            1.0
        } else {
            used as f64 / total as f64
        }
    }

    /// Tensors in chunk `i`, in offset order.
    pub fn tensors_in(&self, i: usize) -> impl Iterator<Item = (usize, &TensorInfo)> {
        self.tensors.iter().enumerate().filter(move |(_, t)| t.placement.chunk == i)
    }
}

/// How the chunk size is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum ChunkSize {
    /// Exactly this many elements (rounded up to the granule).
    Fixed(usize),
    /// The size in `[min, max]` elements, stepping by `step`, that wastes least under
    /// sequential first-fit; ties go to the larger size (fewer, larger transfers).
    Search { min: usize, max: usize, step: usize },
}

/// Element granule: chunk sizes are multiples of it so that every role's chunk is a multiple
/// of `slot_align` bytes.
pub fn granule(slot_align: usize, roles: &[(Role, DType)]) -> usize {
    let smallest = roles.iter().map(|r| r.1.size()).min().unwrap_or(4);
    slot_align.div_ceil(smallest)
}

fn align_elems(roles: &[(Role, DType)]) -> usize {
    let widest = roles.iter().map(|r| r.1.size()).max().unwrap_or(4);
    (ALIGN_BYTES / widest).max(1)
}

/// Packs `numels` (in first-use order) into chunks of `chunk_elems`; returns placements and the
/// elements of each chunk.
fn pack(numels: &[usize], chunk_elems: usize, align: usize, granule: usize) -> (Vec<Placement>, Vec<usize>) {
    let mut placements = Vec::with_capacity(numels.len());
    let mut sizes = Vec::new();
    // The chunk being filled: (index, next free offset).
    let mut open: Option<(usize, usize)> = None;
    for &n in numels {
        if n > chunk_elems {
            sizes.push(n.div_ceil(granule) * granule);
            placements.push(Placement {
                chunk: sizes.len() - 1,
                offset: 0,
                numel: n,
            });
            continue;
        }
        let fits = open.filter(|&(_, used)| used.div_ceil(align) * align + n <= chunk_elems);
        let (chunk, offset) = match fits {
            Some((c, used)) => (c, used.div_ceil(align) * align),
            None => {
                sizes.push(chunk_elems);
                (sizes.len() - 1, 0)
            }
        };
        open = Some((chunk, offset + n));
        placements.push(Placement { chunk, offset, numel: n });
    }
    (placements, sizes)
}

/// Builds the layout of one group.
pub fn plan(
    tensors: &[(String, Vec<usize>)],
    roles: &[(Role, DType)],
    size: ChunkSize,
    slot_align: usize,
) -> Result<GroupLayout> {
    if roles.is_empty() {
        return Err(Error::unsupported("a group with no roles", "give at least the parameter role"));
    }
    let g = granule(slot_align, roles);
    let align = align_elems(roles);
    let numels: Vec<usize> = tensors.iter().map(|(_, s)| s.iter().product::<usize>().max(1)).collect();
    let round = |n: usize| n.max(1).div_ceil(g) * g;
    let chunk_elems = match size {
        ChunkSize::Fixed(n) => round(n),
        ChunkSize::Search { min, max, step } => {
            if min > max || step == 0 {
                return Err(Error::unsupported(
                    format!("chunk size search over [{min}, {max}] by {step}"),
                    "need min <= max and step > 0",
                ));
            }
            let mut best: Option<(usize, usize)> = None; // (waste, size)
            let mut c = round(min);
            while c <= round(max) {
                let (_, sizes) = pack(&numels, c, align, g);
                let waste = sizes.iter().sum::<usize>() - numels.iter().sum::<usize>();
                if best.is_none_or(|(w, _)| waste <= w) {
                    best = Some((waste, c));
                }
                c += round(step).max(g);
            }
            best.map(|b| b.1).unwrap_or(round(min))
        }
    };
    let (placements, chunk_sizes) = pack(&numels, chunk_elems, align, g);
    Ok(GroupLayout {
        roles: roles.to_vec(),
        chunk_elems,
        chunk_sizes,
        tensors: tensors
            .iter()
            .zip(placements)
            .map(|((name, shape), placement)| TensorInfo {
                name: name.clone(),
                shape: shape.clone(),
                placement,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: [(Role, DType); 4] = [
        (Role::Param, DType::BF16),
        (Role::Master, DType::F32),
        (Role::Moment1, DType::F32),
        (Role::Moment2, DType::F32),
    ];

    fn t(sizes: &[usize]) -> Vec<(String, Vec<usize>)> {
        sizes.iter().enumerate().map(|(i, &n)| (format!("t{i}"), vec![n])).collect()
    }

    #[test]
    fn tensors_never_overlap_and_stay_aligned() {
        let l = plan(&t(&[3, 5000, 7, 100_000, 1, 2048]), &ROLES, ChunkSize::Fixed(8192), 4096).unwrap();
        for i in 0..l.chunk_sizes.len() {
            let mut spans: Vec<(usize, usize)> =
                l.tensors_in(i).map(|(_, t)| (t.placement.offset, t.placement.offset + t.placement.numel)).collect();
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[0].1 <= w[1].0, "overlap in chunk {i}: {spans:?}");
            }
            assert!(spans.last().unwrap().1 <= l.chunk_sizes[i]);
            for (_, t) in l.tensors_in(i) {
                assert_eq!(t.placement.offset % (ALIGN_BYTES / 4), 0);
            }
        }
    }

    #[test]
    fn an_oversized_tensor_gets_a_chunk_of_its_own() {
        let l = plan(&t(&[10, 100_000, 10]), &ROLES, ChunkSize::Fixed(8192), 4096).unwrap();
        let big = l.tensors[1].placement;
        assert_eq!(big.offset, 0);
        assert!(l.chunk_sizes[big.chunk] >= 100_000);
        assert_eq!(l.tensors_in(big.chunk).count(), 1);
        // The small ones before and after keep sharing the regular chunk.
        assert_eq!(l.tensors[0].placement.chunk, l.tensors[2].placement.chunk);
    }

    #[test]
    fn every_role_chunk_is_a_whole_number_of_slots() {
        let l = plan(&t(&[1, 2, 3]), &ROLES, ChunkSize::Fixed(1000), 4096).unwrap();
        for i in 0..l.chunk_sizes.len() {
            for (role, _) in ROLES {
                assert_eq!(l.chunk_bytes(i, role).unwrap() % 4096, 0);
            }
        }
        // Paired chunks: same element layout, bytes scale with the dtype.
        assert_eq!(l.chunk_bytes(0, Role::Master).unwrap(), 2 * l.chunk_bytes(0, Role::Param).unwrap());
    }

    #[test]
    fn the_search_finds_less_waste_than_a_bad_fixed_size() {
        // Tensors of 6000 elements: an 8192-element chunk wastes a quarter, 12288 holds two.
        let sizes = [6000usize; 12];
        let fixed = plan(&t(&sizes), &ROLES, ChunkSize::Fixed(8192), 4096).unwrap();
        let searched = plan(
            &t(&sizes),
            &ROLES,
            ChunkSize::Search { min: 8192, max: 65536, step: 2048 },
            4096,
        )
        .unwrap();
        assert!(searched.utilisation() > fixed.utilisation(), "{} vs {}", searched.utilisation(), fixed.utilisation());
        assert!(searched.utilisation() > 0.95, "{}", searched.utilisation());
    }
}
