//! Statistics and the timeline: bytes and counts per link, stall time, compute spans, and a
//! Chrome trace export (opens in Perfetto) with one track per link and one for compute.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::tier::{Tier, TierStats};

/// Bytes and moves over one link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    pub bytes: u64,
    pub moves: u64,
    /// Summed duration of the moves, submission to completion (overlapping moves add up).
    pub busy_us: u64,
}

/// The manager's counters, as returned by `Manager::stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ManagerStats {
    /// Keyed "host->device", "device->host", "nvme->device", ...
    pub links: BTreeMap<String, LinkStats>,
    /// Time accesses spent waiting for data.
    pub stall_us: u64,
    pub accesses: u64,
    /// Accesses that found every chunk already on the device.
    pub hits: u64,
    pub prefetches: u64,
    /// Evictions that needed a write-back (the chunk had changed).
    pub write_backs: u64,
    /// Evictions that just dropped a copy (a clean copy stayed below).
    pub clean_drops: u64,
    /// Chunk bytes on the device now.
    pub device_model_bytes: u64,
    /// Non-model bytes on the device, as last reported by the trainer.
    pub device_non_model_bytes: u64,
    pub device_non_model_peak: u64,
    /// Per tier accounting, including in-flight and staging slots.
    pub tiers: BTreeMap<String, TierStats>,
}

pub(crate) fn link_name(from: Tier, to: Tier) -> String {
    format!("{from}->{to}")
}

#[derive(Debug, Clone, Serialize)]
struct Event {
    name: String,
    cat: &'static str,
    ph: &'static str,
    ts: f64,
    dur: f64,
    pid: u32,
    tid: u32,
}

/// Records spans for the Chrome trace.
pub(crate) struct Tracer {
    origin: Instant,
    events: Vec<Event>,
    tracks: BTreeMap<String, u32>,
}

impl Tracer {
    pub(crate) fn new() -> Self {
        let mut tracks = BTreeMap::new();
        tracks.insert("compute".to_string(), 0);
        Tracer {
            origin: Instant::now(),
            events: Vec::new(),
            tracks,
        }
    }

    fn track(&mut self, name: &str) -> u32 {
        let next = self.tracks.len() as u32;
        *self.tracks.entry(name.to_string()).or_insert(next)
    }

    /// A span on `track` (a link name, "compute" or "stall").
    pub(crate) fn span(&mut self, track: &str, name: String, start: Instant, dur: Duration) {
        let tid = self.track(track);
        let cat = if track == "compute" { "compute" } else { "transfer" };
        self.events.push(Event {
            name,
            cat,
            ph: "X",
            ts: start.saturating_duration_since(self.origin).as_secs_f64() * 1e6,
            dur: dur.as_secs_f64() * 1e6,
            pid: 1,
            tid,
        });
    }

    /// Chrome trace JSON: `{"traceEvents": [...]}` with a name for each track.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let mut events: Vec<serde_json::Value> = self
            .tracks
            .iter()
            .map(|(name, tid)| {
                serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}})
            })
            .collect();
        events.extend(self.events.iter().map(|e| serde_json::to_value(e).expect("events serialise")));
        serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
    }
}
