//! Training metrics: one JSON line per logged step in `metrics.jsonl`, and `loss.svg`, a plot
//! of training and validation loss against the step.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub step: u64,
    pub iter: u64,
    pub loss: f64,
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub peak_rss_mib: Option<f64>,
    /// The run that logged it (absent in lines from before run ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `out/metrics.jsonl` for appending as run `run_id` at step `step` (0 for a new
    /// run). Lines that do not belong to that history (another run's, or steps after `step`
    /// that a killed or diverged attempt logged before its checkpoint) are dropped first, so
    /// the file describes the one run that the checkpoints hold. Returns the log and how
    /// many lines were dropped.
    pub fn open(out: &Path, run_id: &str, step: u64) -> Result<(MetricsLog, usize)> {
        let path = out.join("metrics.jsonl");
        let err = |e: std::io::Error| Error::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        };
        let mut dropped = 0;
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(err)?;
            let mut kept = String::new();
            for line in text.lines() {
                let keep = serde_json::from_str::<Record>(line).is_ok_and(|r| {
                    r.step <= step && r.run_id.as_deref().is_none_or(|id| id == run_id)
                });
                if keep && step > 0 {
                    kept.push_str(line);
                    kept.push('\n');
                } else if !line.trim().is_empty() {
                    dropped += 1;
                }
            }
            if dropped > 0 {
                loratune_model::io::write_atomic(&path, kept.as_bytes())?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err)?;
        Ok((MetricsLog { path, file }, dropped))
    }

    pub fn append(&mut self, r: &Record) -> Result<()> {
        let line = serde_json::to_string(r).expect("serialisable");
        writeln!(self.file, "{line}").map_err(|e| Error::Checkpoint {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads every record of a metrics.jsonl (lines that do not parse are skipped: a run killed
/// mid-write can leave half a line).
pub fn read(path: &Path) -> Vec<Record> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Writes `loss.svg`: training loss (blue) and validation loss (orange dots) against step.
pub fn write_loss_svg(path: &Path, records: &[Record]) -> Result<()> {
    let (w, h, pad) = (640.0f64, 400.0f64, 50.0f64);
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let val: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| {
            r.val_loss
                .filter(|v| v.is_finite())
                .map(|v| (r.step as f64, v))
        })
        .collect();
    let all: Vec<&(f64, f64)> = train.iter().chain(&val).collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (y0, y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let (x0, x1) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (x0, x1.max(x0 + 1.0))
    };
    let (y0, y1) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (y0, y1.max(y0 + 1e-6))
    };
    let sx = |x: f64| pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y0) / (y1 - y0) * (h - 2.0 * pad);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\" font-size=\"12\">step ({x0:.0} to {x1:.0})</text>\n\
         <text x=\"10\" y=\"{pad}\" font-size=\"12\">{y1:.3}</text>\n\
         <text x=\"10\" y=\"{b}\" font-size=\"12\">{y0:.3}</text>\n",
        b = h - pad,
        r = w - pad,
        cx = w / 2.0,
        ty = h - 15.0,
    );
    if !train.is_empty() {
        let pts: Vec<String> = train
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            pts.join(" ")
        ));
    }
    for &(x, y) in &val {
        svg.push_str(&format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#ff7f0e\"/>\n",
            sx(x),
            sy(y)
        ));
    }
    svg.push_str(
        "<text x=\"460\" y=\"20\" font-size=\"12\" fill=\"#1f77b4\">train loss</text>\n\
         <text x=\"540\" y=\"20\" font-size=\"12\" fill=\"#ff7f0e\">val loss</text>\n</svg>\n",
    );
    loratune_model::io::write_atomic(path, svg.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, run: Option<&str>) -> Record {
        Record {
            step,
            iter: step,
            loss: 1.0,
            val_loss: None,
            lr: 1e-3,
            tokens: 10 * step,
            tokens_per_s: 1.0,
            peak_rss_mib: None,
            run_id: run.map(str::to_string),
        }
    }

    #[test]
    fn opening_keeps_only_the_resumed_runs_history() {
        let dir = std::env::temp_dir().join(format!("lt-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut log, dropped) = MetricsLog::open(&dir, "a", 0).unwrap();
        assert_eq!(dropped, 0);
        for s in 1..=4 {
            log.append(&rec(s, Some("a"))).unwrap();
        }
        log.append(&rec(9, Some("b"))).unwrap();
        drop(log);
        // Resuming run a at step 2: steps 3 and 4 (after the checkpoint) and run b go.
        let (log, dropped) = MetricsLog::open(&dir, "a", 2).unwrap();
        assert_eq!(dropped, 3);
        let steps: Vec<u64> = read(log.path()).iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![1, 2]);
        // A fresh run starts an empty history.
        let (log, _) = MetricsLog::open(&dir, "c", 0).unwrap();
        assert!(read(log.path()).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
