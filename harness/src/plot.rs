//! PNG charts of a run's `metrics.jsonl`: losses, rewards and KL against the step, one panel per
//! curve family, drawn with plotters and an embedded DejaVu font (no system font libraries).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use serde_json::Value;

use crate::error::{HarnessError, Result};

/// One curve: a label and its (step, value) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A panel: a title and the curves drawn on it.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

const FONT: &str = "sans-serif";
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font shipped in the crate; a failure would only mean a
        // chart without text, which plotters reports when drawing.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> HarnessError {
    HarnessError::io("drawing chart", path, std::io::Error::other(e.to_string()))
}

/// The points of `key` on the lines of `stage`, in file order, finite values only. A resumed run
/// appends to its metrics file, so a step seen again replaces the earlier point.
pub fn series(lines: &[Value], stage: &str, key: &str, label: &str) -> Series {
    let mut by_step: BTreeMap<u64, f64> = BTreeMap::new();
    for l in lines.iter().filter(|l| l["stage"] == stage) {
        if let (Some(s), Some(v)) = (l["step"].as_u64(), l[key].as_f64()) {
            if v.is_finite() {
                by_step.insert(s, v);
            }
        }
    }
    Series {
        label: label.to_string(),
        points: by_step.into_iter().map(|(s, v)| (s as f64, v)).collect(),
    }
}

/// Draws `panels` stacked vertically into a PNG at `path`; panels without points are left out.
/// Returns false (and writes nothing) when no panel has a point.
pub fn chart(path: &Path, panels: &[Panel]) -> Result<bool> {
    let panels: Vec<&Panel> = panels.iter().filter(|p| p.series.iter().any(|s| !s.points.is_empty())).collect();
    if panels.is_empty() {
        return Ok(false);
    }
    register_font();
    let height = 280 * panels.len() as u32;
    {
        let root = BitMapBackend::new(path, (900, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(&panels) {
            draw_panel(area, panel).map_err(|e| plot_err(path, e))?;
        }
        root.present().map_err(|e| plot_err(path, e))?;
    }
    Ok(true)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_panel(area: &Area<'_>, p: &Panel) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let pts = p.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 > y0 { (y1 - y0) * 0.05 } else { y0.abs().max(1.0) * 0.1 };
    let mut c = ChartBuilder::on(area)
        .caption(&p.title, (FONT, 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    c.configure_mesh().x_desc("step").x_label_formatter(&|x| format!("{x:.0}")).label_style((FONT, 13)).light_line_style(WHITE.mix(0.0)).draw()?;
    // Colours follow a series' place in the panel, so a curve keeps its colour when another is
    // empty; empty ones get no legend entry.
    for (i, s) in p.series.iter().enumerate().filter(|(_, s)| !s.points.is_empty()) {
        let color = COLORS[i % COLORS.len()];
        let style = ShapeStyle::from(&color).stroke_width(2);
        // One or two points (a before/after pair): markers alone, a line would invent a path.
        let anno = if s.points.len() <= 2 {
            c.draw_series(s.points.iter().map(|&pt| Circle::new(pt, 4, style.filled())))?
        } else if s.points.len() <= 12 {
            // Sparse evaluations: markers on the line.
            c.draw_series(s.points.iter().map(|&pt| Circle::new(pt, 4, style.filled())))?;
            c.draw_series(LineSeries::new(s.points.iter().copied(), style))?
        } else {
            // Long noisy curves: the raw values faint, a moving average over them.
            c.draw_series(LineSeries::new(s.points.iter().copied(), ShapeStyle::from(&color.mix(0.3)).stroke_width(1)))?;
            c.draw_series(LineSeries::new(moving_average(&s.points, (s.points.len() / 25).max(3)), style))?
        };
        anno.label(s.label.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], ShapeStyle::from(&color).stroke_width(2)));
    }
    c.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font((FONT, 13)).draw()?;
    Ok(())
}

/// Centred moving average over `w` points (shorter at the ends).
pub fn moving_average(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let h = w / 2;
    (0..points.len())
        .map(|i| {
            let (a, b) = (i.saturating_sub(h), (i + h + 1).min(points.len()));
            let m = points[a..b].iter().map(|p| p.1).sum::<f64>() / (b - a) as f64;
            (points[i].0, m)
        })
        .collect()
}

/// Reads a metrics file's JSON lines (lines that do not parse are skipped: charts are a view,
/// the file is the record).
pub fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| HarnessError::io("reading", path, e))?;
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// Writes the charts for the stages found in `DIR/metrics.jsonl`: `loss.png` (SFT, RM and PPO
/// losses), and for PPO `reward.png` (reward-model score, gold reward) and `kl.png` (KL to the
/// reference and beta). Returns the files written.
pub fn plot_run(dir: &Path) -> Result<Vec<PathBuf>> {
    let lines = read_metrics(&dir.join("metrics.jsonl"))?;
    let panel = |title: &str, s: Vec<Series>| Panel {
        title: title.to_string(),
        series: s,
    };
    let loss = vec![
        panel("SFT: training loss, held-out exact match", vec![series(&lines, "sft", "loss", "loss"), series(&lines, "sft", "heldout_exact_match", "held-out exact match")]),
        panel("reward model: training loss, held-out accuracy", vec![series(&lines, "rm", "loss", "loss"), series(&lines, "rm", "heldout_accuracy", "held-out pairwise accuracy")]),
        panel("PPO: policy loss", vec![series(&lines, "ppo", "policy_loss", "policy loss")]),
        panel("PPO: value loss", vec![series(&lines, "ppo", "value_loss", "value loss")]),
    ];
    let reward = vec![
        panel("PPO: reward-model score (batch mean)", vec![series(&lines, "ppo", "reward_mean", "score")]),
        panel(
            "PPO: gold reward (built-in tasks)",
            vec![series(&lines, "ppo", "gold_reward_train", "batch"), series(&lines, "ppo", "gold_reward_heldout", "held-out")],
        ),
        panel("PPO: correlation of score and gold reward (batch)", vec![series(&lines, "ppo", "rm_gold_correlation", "Pearson r")]),
    ];
    let kl = vec![
        panel("PPO: KL to the reference (per sequence)", vec![series(&lines, "ppo", "kl", "KL"), series(&lines, "ppo", "approx_kl", "approx KL (update)")]),
        panel("PPO: KL coefficient", vec![series(&lines, "ppo", "beta", "beta")]),
    ];
    let mut out = Vec::new();
    for (name, panels) in [("loss.png", loss), ("reward.png", reward), ("kl.png", kl)] {
        let p = dir.join(name);
        if chart(&p, &panels)? {
            out.push(p);
        }
    }
    Ok(out)
}

/// The capacity benchmark's chart: parameters per model (log) against peak memory, one
/// colour per strategy, filled markers for runs that fit, hollow ones for runs that did not (at
/// the memory they had reached), and the budget as a horizontal line.
pub fn capacity_chart(path: &Path, runs: &[crate::bench::RunRecord], budget: u64) -> Result<()> {
    let pts: Vec<&crate::bench::RunRecord> = runs.iter().filter(|r| r.peak_bytes > 0).collect();
    if pts.is_empty() {
        return Ok(());
    }
    register_font();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let (mut y0, mut y1) = (gib(budget), gib(budget));
    for r in &pts {
        (x0, x1) = (x0.min(r.params as f64), x1.max(r.params as f64));
        (y0, y1) = (y0.min(gib(r.peak_bytes)), y1.max(gib(r.peak_bytes)));
    }
    let (x0, x1, y0, y1) = (x0 / 1.5, x1 * 1.5, 0.0, y1 * 1.15);
    let _ = y0;
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut c = ChartBuilder::on(&root)
            .caption("peak memory against model size", (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((x0..x1).log_scale(), y0..y1)?;
        c.configure_mesh()
            .x_desc("parameters per model (log scale)")
            .y_desc("peak memory, GiB")
            .x_labels(8)
            .y_labels(8)
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|x| if *x >= 1e9 { format!("{:.1}B", x / 1e9) } else { format!("{:.0}M", x / 1e6) })
            .y_label_formatter(&|y| format!("{y:.2}"))
            .label_style((FONT, 13))
            .draw()?;
        let mut names: Vec<&str> = pts.iter().map(|r| r.strategy.as_str()).collect();
        names.dedup();
        names.sort_unstable();
        names.dedup();
        for (i, name) in names.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let mine: Vec<&&crate::bench::RunRecord> = pts.iter().filter(|r| r.strategy == *name).collect();
            let fit: Vec<(f64, f64)> = mine.iter().filter(|r| r.fits).map(|r| (r.params as f64, gib(r.peak_bytes))).collect();
            let style = ShapeStyle::from(&color).stroke_width(2);
            c.draw_series(LineSeries::new(fit.iter().copied(), style))?
                .label(name.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], ShapeStyle::from(&color).stroke_width(2)));
            c.draw_series(fit.iter().map(|&p| Circle::new(p, 5, style.filled())))?;
            c.draw_series(mine.iter().filter(|r| !r.fits).map(|r| Circle::new((r.params as f64, gib(r.peak_bytes)), 6, style)))?;
        }
        let b = gib(budget);
        c.draw_series(LineSeries::new([(x0, b), (x1, b)], ShapeStyle::from(&BLACK).stroke_width(1)))?
            .label("budget")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], ShapeStyle::from(&BLACK).stroke_width(1)));
        c.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE.mix(0.85)).border_style(BLACK).label_font((FONT, 13)).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| plot_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn series_keeps_the_stage_s_finite_points_and_the_last_of_a_repeated_step() {
        let lines = vec![
            json!({"stage": "sft", "step": 1, "loss": 3.0}),
            json!({"stage": "rm", "step": 1, "loss": 9.0}),
            json!({"stage": "sft", "step": 2, "loss": 2.0}),
            json!({"stage": "sft", "step": 2, "heldout_exact_match": 0.5}),
            json!({"stage": "sft", "step": 3, "loss": f64::NAN}),
            // A resumed run logs step 2 again.
            json!({"stage": "sft", "step": 2, "loss": 1.5}),
        ];
        assert_eq!(series(&lines, "sft", "loss", "l").points, vec![(1.0, 3.0), (2.0, 1.5)]);
        assert_eq!(series(&lines, "rm", "loss", "l").points, vec![(1.0, 9.0)]);
    }

    #[test]
    fn moving_average_by_hand() {
        let p: Vec<(f64, f64)> = [1.0, 2.0, 6.0, 3.0].iter().enumerate().map(|(i, &v)| (i as f64, v)).collect();
        assert_eq!(moving_average(&p, 3), vec![(0.0, 1.5), (1.0, 3.0), (2.0, 11.0 / 3.0), (3.0, 4.5)]);
    }

    /// Pixels of a chart that are exactly a series colour.
    fn colored(path: &Path, c: RGBColor) -> usize {
        let img = image_rgb(path);
        img.chunks(3).filter(|p| p[0] == c.0 && p[1] == c.1 && p[2] == c.2).count()
    }

    fn image_rgb(path: &Path) -> Vec<u8> {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
        image::load_from_memory(&bytes).unwrap().to_rgb8().into_raw()
    }

    #[test]
    fn a_run_s_charts_are_pngs_with_each_curve_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for s in 1..=50u64 {
            text += &format!("{}\n", json!({"stage": "ppo", "step": s, "reward_mean": s as f64 * 0.1, "kl": (s as f64).sqrt(), "beta": 0.05, "policy_loss": -0.01, "value_loss": 1.0 / s as f64}));
        }
        text += "not json\n";
        std::fs::write(dir.path().join("metrics.jsonl"), text).unwrap();
        let files = plot_run(dir.path()).unwrap();
        let names: Vec<_> = files.iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(names, ["loss.png", "reward.png", "kl.png"]);
        // Two panels of PPO losses (the SFT and RM panels have no points and are left out).
        let loss = image::open(&files[0]).unwrap();
        assert_eq!((loss.width(), loss.height()), (900, 560));
        // One panel (the score): no gold rewards, no correlation.
        let reward = image::open(&files[1]).unwrap();
        assert_eq!(reward.height(), 280);
        assert!(colored(&files[1], COLORS[0]) > 500, "the reward curve is drawn");
        assert_eq!(colored(&files[1], COLORS[1]), 0, "no second curve");
    }

    #[test]
    fn no_points_no_chart_and_a_bad_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Panel {
            title: "t".into(),
            series: vec![Series { label: "x".into(), points: vec![] }],
        };
        assert!(!chart(&dir.path().join("a.png"), std::slice::from_ref(&empty)).unwrap());
        assert!(!dir.path().join("a.png").exists());
        let one = Panel {
            title: "t".into(),
            series: vec![Series { label: "x".into(), points: vec![(1.0, 2.0)] }],
        };
        let err = chart(&dir.path().join("missing/a.png"), &[one]).unwrap_err();
        assert!(err.to_string().contains("missing/a.png"), "{err}");
    }
}

