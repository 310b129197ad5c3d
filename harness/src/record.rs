//! What a run leaves behind: `metrics.jsonl` with a progress bar (`Run`), `report.json`
//! sections, memory figures, the merged Chrome trace of several engines with the share of
//! transfer time hidden under compute, and the PNG charts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::engine::Engine;
use crate::error::{HarnessError, Result};
use crate::train::TrainArgs;

/// The engines' timelines as one Chrome trace, one process per model, and the transfer/compute
/// overlap over all of them (one model's transfers hidden under another's compute count);
/// None when no engine recorded one.
pub fn merged_trace(engines: &[(&str, &dyn Engine)]) -> Option<(Value, stowage_memory::manager::trace::Overlap)> {
    let mut events = Vec::new();
    for (pid, (name, e)) in engines.iter().enumerate() {
        let Some(trace) = e.trace() else { continue };
        let pid = pid as u64 + 1;
        events.push(json!({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}));
        for mut ev in trace["traceEvents"].as_array().cloned().unwrap_or_default() {
            ev["pid"] = json!(pid);
            events.push(ev);
        }
    }
    if events.is_empty() {
        return None;
    }
    let total = trace_overlap(&events, f64::MIN, f64::MAX);
    Some((json!({"traceEvents": events, "displayTimeUnit": "ms"}), total))
}

/// The overlap of the transfers that start in `[from_us, to_us)` with every compute span, over
/// Chrome-trace `events` (`cat` "compute" or "transfer"; times in the shared trace time base;
/// a transfer's link is its track's name, every model's moves over a link counted together).
pub fn trace_overlap(events: &[Value], from_us: f64, to_us: f64) -> stowage_memory::manager::trace::Overlap {
    let span = |e: &Value| -> Option<(f64, f64)> {
        let ts = e["ts"].as_f64()?;
        Some((ts, ts + e["dur"].as_f64()?))
    };
    let track = |e: &Value| (e["pid"].as_u64().unwrap_or(0), e["tid"].as_u64().unwrap_or(0));
    let names: std::collections::HashMap<(u64, u64), &str> =
        events.iter().filter(|e| e["ph"] == "M" && e["name"] == "thread_name").filter_map(|e| Some((track(e), e["args"]["name"].as_str()?))).collect();
    let compute: Vec<(f64, f64)> = events.iter().filter(|e| e["cat"] == "compute").filter_map(span).collect();
    // The spans of link tracks ("host->device", ...), as the manager counts them: traces written
    // before waits had a category of their own marked a release's wait ("give back") a transfer.
    let transfers = events
        .iter()
        .filter(|e| e["cat"] == "transfer")
        .filter_map(|e| Some((names.get(&track(e)).copied().filter(|n| stowage_memory::manager::trace::is_link(n))?, span(e)?)))
        .filter(|(_, s)| s.0 >= from_us && s.0 < to_us)
        .map(|(l, (a, b))| (l, a, b));
    stowage_memory::manager::trace::overlap_of(compute, transfers)
}

/// Writes `a.trace` (when asked) from `engines`' timelines, one Chrome-trace process per model,
/// prints the hidden share and returns it for the report (None without transfers).
pub fn write_trace(a: &TrainArgs, engines: &[(&str, &dyn Engine)], run: &Run) -> Result<Option<f64>> {
    let Some(path) = &a.trace else { return Ok(None) };
    let Some((trace, total)) = merged_trace(engines) else {
        eprintln!("note: --trace: no chunk transfers to trace (the naive strategy keeps everything on the device)");
        return Ok(None);
    };
    let body = serde_json::to_vec(&trace).map_err(|e| HarnessError::Config(e.to_string()))?;
    crate::ckpt::write_atomic(path, &body)?;
    let share = total.share();
    let line = match share {
        Some(s) => format!("trace {}: {:.1}% of transfer time hidden under compute ({:.0} of {:.0} ms)", path.display(), 100.0 * s, total.hidden_us / 1e3, total.transfer_us / 1e3),
        None => format!("trace {}: no transfers", path.display()),
    };
    run.say(&line);
    Ok(share)
}

/// Peak resident memory of this process (VmHWM), bytes.
pub fn peak_rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

/// Merges `section` into `DIR/report.json` (other stages' sections stay).
pub fn update_report(dir: &Path, key: &str, section: Value, memory: Value) -> Result<()> {
    let p = dir.join("report.json");
    let mut r: serde_json::Map<String, Value> = std::fs::read_to_string(&p).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    r.insert(key.into(), section);
    // Peaks only grow across the stages of one run.
    let mut mem = memory;
    if let (Some(old), Some(new)) = (r.get("memory").cloned(), mem.as_object_mut()) {
        for k in ["peak_rss_bytes", "device_peak_bytes"] {
            let o = old.get(k).and_then(Value::as_u64).unwrap_or(0);
            let n = new.get(k).and_then(Value::as_u64).unwrap_or(0);
            new.insert(k.into(), json!(o.max(n)));
        }
    }
    r.insert("memory".into(), mem);
    let s = serde_json::to_vec_pretty(&Value::Object(r)).map_err(|e| HarnessError::Config(e.to_string()))?;
    crate::ckpt::write_atomic(&p, &s)
}

/// The memory section of a report.
pub fn memory_json(e: &dyn Engine) -> Value {
    let m = e.memory();
    json!({
        "peak_rss_bytes": peak_rss_bytes(),
        "device_peak_bytes": m.device_peak_bytes,
        "bytes_moved": m.bytes_moved,
        "tiers": m.tiers,
    })
}

/// A run's output directory, metrics file and progress bar.
pub struct Run {
    pub dir: PathBuf,
    metrics: std::fs::File,
    pub bar: indicatif::ProgressBar,
    pub started: Instant,
}

impl Run {
    pub fn open(dir: &Path, steps: u64, quiet: bool, stage: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| HarnessError::io("creating output directory", dir, e))?;
        let p = dir.join("metrics.jsonl");
        let metrics = std::fs::OpenOptions::new().create(true).append(true).open(&p).map_err(|e| HarnessError::io("opening", &p, e))?;
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let b = indicatif::ProgressBar::new(steps);
            b.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_prefix(stage.to_string());
            b
        };
        Ok(Run {
            dir: dir.into(),
            metrics,
            bar,
            started: Instant::now(),
        })
    }

    /// Draws the PNG charts of the run's metrics (`loss.png`, and for PPO `reward.png`,
    /// `kl.png`). A failure is reported, not fatal: the metrics file is the record.
    pub fn charts(&self) {
        draw_charts(&self.dir);
    }

    /// Prints a line for the user: above the progress bar, or on stderr when there is none
    /// (`--quiet`, or stderr is not a terminal), so notes reach logs too.
    pub fn say(&self, line: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}", line.as_ref());
        } else {
            self.bar.println(line.as_ref());
        }
    }

    pub fn log(&mut self, v: Value) -> Result<()> {
        writeln!(self.metrics, "{v}").map_err(|e| HarnessError::io("writing", self.dir.join("metrics.jsonl"), e))
    }
}

/// Draws the charts of `dir/metrics.jsonl`, warning on failure.
pub fn draw_charts(dir: &Path) {
    if let Err(e) = crate::plot::plot_run(dir) {
        eprintln!("warning: charts not drawn: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two models' merged events: metadata naming each track, compute and transfer spans.
    fn events() -> Vec<Value> {
        let meta = |pid: u64, tid: u64, name: &str| json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}});
        let span = |pid: u64, tid: u64, cat: &str, ts: f64, dur: f64| json!({"name": "x", "cat": cat, "ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur});
        vec![
            meta(1, 0, "compute"),
            meta(1, 5, "nvme->device"),
            meta(2, 0, "compute"),
            meta(2, 3, "nvme->device"),
            meta(2, 4, "host->nvme"),
            // Model 1 computes [100, 200), model 2 [300, 400).
            span(1, 0, "compute", 100.0, 100.0),
            span(2, 0, "compute", 300.0, 100.0),
            // Both models read over nvme->device at once, [150, 250) and [180, 260): the link is
            // busy [150, 260), 50 of it under compute.
            span(1, 5, "transfer", 150.0, 100.0),
            span(2, 3, "transfer", 180.0, 80.0),
            // Another link, later: [350, 450), 50 under compute.
            span(2, 4, "transfer", 350.0, 100.0),
            // A stall is no transfer, nor is a release waiting for its evictions (marked a
            // transfer in older traces).
            span(2, 3, "stall", 0.0, 1000.0),
            meta(2, 6, "give back"),
            span(2, 6, "transfer", 500.0, 100.0),
        ]
    }

    #[test]
    fn transfer_time_is_the_time_each_link_is_busy_and_windows_take_the_moves_starting_in_them() {
        let ev = events();
        let all = trace_overlap(&ev, f64::MIN, f64::MAX);
        assert!((all.transfer_us - 210.0).abs() < 1e-9, "{all:?}");
        assert!((all.hidden_us - 100.0).abs() < 1e-9, "{all:?}");
        // A window (a phase, the steady state) counts the moves that start in it, whole.
        let first = trace_overlap(&ev, 0.0, 300.0);
        assert!((first.transfer_us - 110.0).abs() < 1e-9 && (first.hidden_us - 50.0).abs() < 1e-9, "{first:?}");
        let second = trace_overlap(&ev, 300.0, 1000.0);
        assert!((second.transfer_us - 100.0).abs() < 1e-9 && (second.hidden_us - 50.0).abs() < 1e-9, "{second:?}");
        assert_eq!(trace_overlap(&ev, 500.0, 600.0).share(), None, "no moves, no share");
    }
}
