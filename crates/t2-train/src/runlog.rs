//! A run's record: one `log.csv` row per step (rewritten after every step, read back on resume) and the
//! accuracy curve drawn from it (`curve.svg`).

use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::plot::{line_chart, Series};
use crate::{Result, TrainError};

/// One row of `log.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub step: usize,
    pub loss: f64,
    pub train_acc: f64,
    pub grad_norm: f64,
    pub kl: f64,
    pub val_acc: Option<f64>,
    /// Wall time since the start of the run.
    pub seconds: f64,
    /// This step's time generating rollouts, and computing and applying the gradient.
    pub rollout_seconds: f64,
    pub update_seconds: f64,
}

const CSV_HEADER: &str =
    "step,loss,train_acc,grad_norm,kl,val_acc,seconds,rollout_seconds,update_seconds";

impl LogRow {
    fn csv(&self) -> String {
        format!(
            "{},{:.6},{:.4},{:.6e},{:.6},{},{:.1},{:.1},{:.1}",
            self.step,
            self.loss,
            self.train_acc,
            self.grad_norm,
            self.kl,
            self.val_acc.map(|v| format!("{v:.4}")).unwrap_or_default(),
            self.seconds,
            self.rollout_seconds,
            self.update_seconds
        )
    }

    pub fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 9 {
            return None;
        }
        Some(Self {
            step: f[0].parse().ok()?,
            loss: f[1].parse().ok()?,
            train_acc: f[2].parse().ok()?,
            grad_norm: f[3].parse().ok()?,
            kl: f[4].parse().ok()?,
            val_acc: if f[5].is_empty() {
                None
            } else {
                Some(f[5].parse().ok()?)
            },
            seconds: f[6].parse().ok()?,
            rollout_seconds: f[7].parse().ok()?,
            update_seconds: f[8].parse().ok()?,
        })
    }
}

pub fn read_log(path: &Path) -> Result<Vec<LogRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io(path.into(), e))?;
    Ok(text.lines().skip(1).filter_map(LogRow::parse).collect())
}

/// Replaces `log.csv` whole (written aside, then renamed: a crash never leaves half a log).
pub fn write_log(path: &Path, log: &[LogRow]) -> Result<()> {
    let tmp = path.with_extension("csv.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| TrainError::Io(tmp.clone(), e))?;
    let mut text = String::from(CSV_HEADER);
    text.push('\n');
    for r in log {
        text.push_str(&r.csv());
        text.push('\n');
    }
    f.write_all(text.as_bytes())
        .map_err(|e| TrainError::Io(tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::Io(path.into(), e))
}

/// The training-batch and validation accuracy of a run, as an SVG chart.
pub fn write_curve(path: &Path, name: &str, task: &str, log: &[LogRow]) -> Result<()> {
    let train: Vec<(f64, f64)> = log
        .iter()
        .filter(|r| r.train_acc.is_finite())
        .map(|r| (r.step as f64, r.train_acc))
        .collect();
    // A moving average reads better than the raw, noisy per-batch accuracy.
    let smooth: Vec<(f64, f64)> = train
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let lo = i.saturating_sub(4);
            let w = &train[lo..=i];
            (x, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect();
    let val: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|r| r.val_acc.map(|v| (r.step as f64, v)))
        .collect();
    let svg = line_chart(
        &format!("{name}: REINFORCE on {task}"),
        "step",
        "accuracy",
        (0.0, 1.0),
        &[
            Series {
                name: "train batch".into(),
                color: "#9ecae1",
                points: train,
            },
            Series {
                name: "train (avg of 5)".into(),
                color: "#3182bd",
                points: smooth,
            },
            Series {
                name: "validation".into(),
                color: "#e6550d",
                points: val,
            },
        ],
    );
    std::fs::write(path, svg).map_err(|e| TrainError::Io(path.into(), e))
}
