//! Statistics and the timeline: bytes and counts per link, stall time, compute spans, and a
//! Chrome trace export (opens in Perfetto) with one track per link and one for compute.

use std::collections::BTreeMap;
use std::sync::OnceLock;
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

/// Whether a trace track is a link (named by [`link_name`]): its spans are transfers.
pub fn is_link(track: &str) -> bool {
    track.contains("->")
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

/// Transfer time and the part of it that ran while compute ran (some access guard was live).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Overlap {
    pub transfer_us: f64,
    pub hidden_us: f64,
}

impl Overlap {
    /// The share of transfer time hidden under compute; None without transfers.
    pub fn share(&self) -> Option<f64> {
        (self.transfer_us > 0.0).then(|| self.hidden_us / self.transfer_us)
    }

}

/// Sums of two runs' figures (e.g. the models of one PPO run).
impl std::ops::Add for Overlap {
    type Output = Overlap;
    fn add(self, o: Overlap) -> Overlap {
        Overlap {
            transfer_us: self.transfer_us + o.transfer_us,
            hidden_us: self.hidden_us + o.hidden_us,
        }
    }
}

/// Time zero of every tracer in the process, so traces of several managers line up.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Microseconds since the process-wide trace origin: the time base of every trace's `ts`.
pub fn now_us() -> f64 {
    origin().elapsed().as_secs_f64() * 1e6
}

/// `transfers` (`(link, start, end)`, microseconds) against the union of `compute` spans: how
/// much transfer time ran while something computed. A link's transfer time is the time it is
/// busy, with at least one move in flight (as a disk's utilisation counts it: moves queued
/// together count once, not once each, so a deeper queue does not inflate it), summed over
/// links. Several managers' traces share one time base, so their spans can be pooled (a PPO
/// run's reward model computing while the actor's chunks arrive hides those transfers too), and
/// their moves over a link of the same name share it.
pub fn overlap_of<'a>(compute: Vec<(f64, f64)>, transfers: impl IntoIterator<Item = (&'a str, f64, f64)>) -> Overlap {
    let cover = union(compute);
    let mut links: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (link, a, b) in transfers {
        links.entry(link).or_default().push((a, b));
    }
    let mut o = Overlap::default();
    for spans in links.into_values() {
        for (a, b) in union(spans) {
            o.transfer_us += b - a;
            o.hidden_us += covered(&cover, a, b);
        }
    }
    o
}

/// Merges `[start, end)` intervals into disjoint sorted ones.
fn union(mut iv: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    iv.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(iv.len());
    for (a, b) in iv {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Length of `[a, b)` covered by the disjoint sorted `cover`.
fn covered(cover: &[(f64, f64)], a: f64, b: f64) -> f64 {
    let first = cover.partition_point(|iv| iv.1 <= a);
    cover[first..].iter().take_while(|iv| iv.0 < b).map(|iv| (iv.1.min(b) - iv.0.max(a)).max(0.0)).sum()
}

/// Records spans for the Chrome trace.
pub(crate) struct Tracer {
    origin: Instant,
    events: Vec<Event>,
    tracks: BTreeMap<String, u32>,
}

impl Tracer {
    /// Forgets the events recorded so far (tracks stay, so track ids remain stable).
    pub(crate) fn clear(&mut self) {
        self.events.clear();
    }

    pub(crate) fn new() -> Self {
        let mut tracks = BTreeMap::new();
        tracks.insert("compute".to_string(), 0);
        Tracer {
            origin: origin(),
            events: Vec::new(),
            tracks,
        }
    }

    fn track(&mut self, name: &str) -> u32 {
        let next = self.tracks.len() as u32;
        *self.tracks.entry(name.to_string()).or_insert(next)
    }

    /// A span on `track`: a link name ("host->device", ...: a transfer), "compute", or a wait
    /// ("stall": an access waiting for data; "give back": a release waiting for its evictions,
    /// whose moves are on their links already).
    pub(crate) fn span(&mut self, track: &str, name: String, start: Instant, dur: Duration) {
        let tid = self.track(track);
        let cat = match track {
            "compute" => "compute",
            "stall" => "stall",
            t if is_link(t) => "transfer",
            _ => "wait",
        };
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

    /// Transfer spans (the link tracks: stalls are waits, not transfers) against the union of
    /// compute spans.
    pub(crate) fn overlap(&self) -> Overlap {
        let compute = self.tracks["compute"];
        let links: BTreeMap<u32, &str> = self.tracks.iter().filter(|(n, _)| is_link(n)).map(|(n, &t)| (t, n.as_str())).collect();
        overlap_of(
            self.events.iter().filter(|e| e.tid == compute).map(|e| (e.ts, e.ts + e.dur)).collect(),
            self.events.iter().filter_map(|e| Some((*links.get(&e.tid)?, e.ts, e.ts + e.dur))),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: &Tracer, us: u64) -> Instant {
        t.origin + Duration::from_micros(us)
    }

    #[test]
    fn overlap_counts_transfer_time_under_the_union_of_compute_spans() {
        let mut t = Tracer::new();
        // Compute [100, 200) and [150, 300) (overlapping accesses) and [400, 500).
        for (a, d) in [(100, 100), (150, 150), (400, 100)] {
            t.span("compute", "c".into(), at(&t, a), Duration::from_micros(d));
        }
        // Transfers: [50, 250) half hidden... 150 of 200; [300, 400) not at all; [450, 460) fully.
        t.span("host->device", "f".into(), at(&t, 50), Duration::from_micros(200));
        t.span("device->host", "e".into(), at(&t, 300), Duration::from_micros(100));
        t.span("nvme->device", "f".into(), at(&t, 450), Duration::from_micros(10));
        // A stall is a wait, not a transfer; so is a release waiting for its evictions.
        t.span("stall", "s".into(), at(&t, 0), Duration::from_micros(1000));
        t.span("give back", "g".into(), at(&t, 600), Duration::from_micros(100));
        let cats: Vec<String> = t.to_json()["traceEvents"].as_array().unwrap().iter().filter(|e| e["name"] == "g").map(|e| e["cat"].to_string()).collect();
        assert_eq!(cats, ["\"wait\""]);
        let o = t.overlap();
        assert!((o.transfer_us - 310.0).abs() < 1e-6, "{o:?}");
        assert!((o.hidden_us - 160.0).abs() < 1e-6, "{o:?}");
        assert!((o.share().unwrap() - 160.0 / 310.0).abs() < 1e-9);
        assert_eq!(Overlap::default().share(), None);
        // Moves queued together on one link count the time it is busy, once: [30, 240) joins
        // [50, 250) on host->device (busy [30, 250): 220, of which 150 under compute); another
        // link's move at the same time counts on its own.
        t.span("host->device", "f".into(), at(&t, 30), Duration::from_micros(210));
        t.span("nvme->host", "p".into(), at(&t, 30), Duration::from_micros(210));
        let o = t.overlap();
        assert!((o.transfer_us - (220.0 + 100.0 + 10.0 + 210.0)).abs() < 1e-6, "{o:?}");
        assert!((o.hidden_us - (150.0 + 0.0 + 10.0 + 140.0)).abs() < 1e-6, "{o:?}");
    }
}
