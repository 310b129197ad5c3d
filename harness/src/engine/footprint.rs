//! What a chunked model's state takes per role and at once, and whether the tier budgets can
//! hold it (refused with the bytes needed per tier otherwise).

use std::collections::BTreeMap;

use stowage_memory::{DType, Manager, Role, TiersConfig};

use crate::error::{HarnessError, Result};

/// Bytes of every chunk role, for fit checks and reports.
#[derive(Debug, Clone, Default)]
pub struct Footprint {
    /// Total chunk bytes per role name.
    pub per_role: BTreeMap<String, u64>,
    pub total: u64,
    /// Device bytes a backward unit needs at once (parameter and gradient chunks).
    pub unit_max: u64,
    /// Device bytes one chunk's update needs (every role).
    pub update_max: u64,
    pub largest_chunk: u64,
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Param => "param",
        Role::Grad => "grad",
        Role::Master => "master",
        Role::Moment1 => "exp_avg",
        Role::Moment2 => "exp_avg_sq",
    }
}

/// Bytes for people: B, KiB, MiB or GiB.
pub fn human(b: u64) -> String {
    let f = b as f64;
    if f >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", f / (1u64 << 30) as f64)
    } else if f >= (1u64 << 20) as f64 {
        format!("{:.2} MiB", f / (1u64 << 20) as f64)
    } else if f >= 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{b} B")
    }
}

impl Footprint {
    /// The figures of a manager's `groups` groups; `unit_chunks` per execution unit as (group,
    /// index); `train` the trainable group and its `roles`.
    pub(crate) fn measure(mgr: &Manager, groups: usize, unit_chunks: &[Vec<(usize, usize)>], train: Option<usize>, roles: &[(Role, DType)]) -> Self {
        let bytes = |g: usize, i: usize, r: Role| mgr.layout(g).chunk_bytes(i, r).unwrap_or(0) as u64;
        let mut fp = Footprint::default();
        for g in 0..groups {
            let layout = mgr.layout(g);
            let n = layout.chunk_sizes.len();
            for r in [Role::Param, Role::Grad, Role::Master, Role::Moment1, Role::Moment2] {
                if layout.dtype(r).is_none() {
                    continue;
                }
                let t: u64 = (0..n).map(|i| bytes(g, i, r)).sum();
                *fp.per_role.entry(role_name(r).into()).or_default() += t;
                fp.total += t;
                fp.largest_chunk = fp.largest_chunk.max((0..n).map(|i| bytes(g, i, r)).max().unwrap_or(0));
            }
        }
        fp.unit_max = unit_chunks.iter().map(|cs| cs.iter().map(|&(g, i)| bytes(g, i, Role::Param) + bytes(g, i, Role::Grad)).sum()).max().unwrap_or(0);
        fp.update_max = train.map_or(0, |g| (0..mgr.layout(g).chunk_sizes.len()).map(|i| roles.iter().map(|&(r, _)| bytes(g, i, r)).sum()).max().unwrap_or(0));
        fp
    }

    /// Checks the budgets can hold the state; returns the device budget.
    pub(crate) fn check(&self, t: &TiersConfig) -> Result<u64> {
        let fp = self;
        let device_budget = if t.device.choice == stowage_memory::DeviceChoice::None { 0 } else { t.device.budget };
        let need_device = fp.unit_max.max(fp.update_max);
        let nvme_budget = t.nvme.as_ref().map(|n| n.budget);
        let roles_list = fp.per_role.iter().map(|(k, v)| format!("{k} {}", human(*v))).collect::<Vec<_>>().join(", ");
        if need_device > device_budget {
            return Err(HarnessError::DoesNotFit(format!(
                "the device needs at least {} at once (a block's parameter and gradient chunks: {}; one chunk's optimizer set: {}), its budget is {}; raise --device-budget or use a smaller --chunk-elems",
                human(need_device),
                human(fp.unit_max),
                human(fp.update_max),
                human(device_budget)
            )));
        }
        let below = t.host_budget.saturating_add(nvme_budget.unwrap_or(0));
        if fp.total > device_budget.saturating_add(below) {
            return Err(HarnessError::DoesNotFit(format!(
                "model state needs {} ({roles_list}); budgets: device {}, host {}, nvme {}; {}",
                human(fp.total),
                human(device_budget),
                human(t.host_budget),
                nvme_budget.map_or("none".into(), human),
                if nvme_budget.is_none() { "give --nvme-dir or raise --host-budget" } else { "raise the budgets" }
            )));
        }
        if nvme_budget.is_some() && t.host_budget < 2 * fp.largest_chunk {
            return Err(HarnessError::DoesNotFit(format!(
                "moves to and from NVMe stage through the host: it needs at least {} (two of the largest chunk), its budget is {}",
                human(2 * fp.largest_chunk),
                human(t.host_budget)
            )));
        }
        Ok(device_budget)
    }
}
