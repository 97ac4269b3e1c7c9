//! Measured quality in the routing catalog. `qpai eval calibrate` keeps a
//! block at the end of the catalog file, below a marker line, with what the
//! evals measured: each deployment's score on a task (cases, 95% interval,
//! the runs behind it) and, when asked, the task's quality floor. The
//! hand-written part above the marker is never touched.
//!
//! ```toml
//! # ---- measured by `qpai eval calibrate` (rewritten by each calibration; edit above this line) ----
//! [[measured]]
//! deployment = "smollm2-house-style"
//! task = "house_style"
//! score = 0.87
//! cases = 100
//! low = 0.82
//! high = 0.91
//! runs = ["eval_4dbbcf7eed7c4067"]
//! measured_at = "2026-12-03T11:53:21Z"
//!
//! [[task]]
//! name = "house_style"
//! min_quality = 0.83
//! ```
//!
//! A measured score takes the place of the typed-in `quality` for its
//! task; a task's floor applies when a request names the task and sets no
//! floor of its own.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The line above the block that calibration rewrites.
pub const MARKER: &str = "# ---- measured by `qpai eval calibrate` (rewritten by each calibration; edit above this line) ----";

/// A deployment's measured score on a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    pub deployment: String,
    pub task: String,
    /// The mean case score, 0 to 1.
    pub score: f64,
    /// Cases behind the score.
    pub cases: u64,
    /// The 95% interval of the score.
    pub low: f64,
    pub high: f64,
    /// The eval runs measured.
    #[serde(default)]
    pub runs: Vec<String>,
    /// When the latest of those runs started (RFC 3339).
    #[serde(default)]
    pub measured_at: String,
}

/// The quality a task's requests need when they set none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFloor {
    pub name: String,
    pub min_quality: f64,
}

/// The calibrated block of a catalog.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    #[serde(default)]
    pub measured: Vec<Measured>,
    #[serde(default)]
    pub task: Vec<TaskFloor>,
}

impl Measured {
    pub fn check(&self) -> Result<(), String> {
        let place = format!("measured {:?} on {:?}", self.deployment, self.task);
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !(unit(self.score) && unit(self.low) && unit(self.high)) {
            return Err(format!("{place}: score and interval must lie in 0..1"));
        }
        if !(self.low <= self.score && self.score <= self.high) {
            return Err(format!(
                "{place}: score {} is outside its interval {}..{}",
                self.score, self.low, self.high
            ));
        }
        if self.cases == 0 {
            return Err(format!("{place}: cases must be > 0"));
        }
        Ok(())
    }
}

impl Calibration {
    /// Puts `measured` in place of the same deployment's score on the
    /// same task.
    pub fn record(&mut self, measured: Measured) {
        self.measured
            .retain(|m| !(m.deployment == measured.deployment && m.task == measured.task));
        self.measured.push(measured);
        self.measured
            .sort_by(|a, b| (&a.task, &a.deployment).cmp(&(&b.task, &b.deployment)));
    }

    pub fn set_floor(&mut self, task: &str, min_quality: f64) {
        self.task.retain(|t| t.name != task);
        self.task.push(TaskFloor {
            name: task.to_string(),
            min_quality,
        });
        self.task.sort_by(|a, b| a.name.cmp(&b.name));
    }
}

/// Puts each measured score on its deployment, and returns the floors;
/// each is checked.
pub(super) fn calibrated(
    deployments: &mut [super::Deployment],
    measured: Vec<Measured>,
    tasks: Vec<TaskFloor>,
) -> Result<BTreeMap<String, f64>, String> {
    for entry in measured {
        entry.check()?;
        let Some(deployment) = deployments.iter_mut().find(|d| d.name == entry.deployment) else {
            return Err(format!(
                "measured {:?} on {:?}: no deployment {:?}",
                entry.deployment, entry.task, entry.deployment
            ));
        };
        let task = entry.task.clone();
        if deployment.measured.insert(task.clone(), entry).is_some() {
            return Err(format!(
                "deployment {:?} is measured on {task:?} twice",
                deployment.name
            ));
        }
    }
    let mut floors = BTreeMap::new();
    for task in tasks {
        if !(0.0..=1.0).contains(&task.min_quality) {
            return Err(format!(
                "task {:?}: min_quality {} is outside 0..1",
                task.name, task.min_quality
            ));
        }
        if floors.insert(task.name.clone(), task.min_quality).is_some() {
            return Err(format!("task {:?} is defined twice", task.name));
        }
    }
    Ok(floors)
}

/// A catalog's text split at the marker: the hand-written part and the
/// calibrated block (empty when there is none).
pub fn split(text: &str) -> (&str, &str) {
    match text.find(MARKER) {
        Some(at) => (&text[..at], &text[at + MARKER.len()..]),
        None => (text, ""),
    }
}

/// Reads the calibrated block of the catalog at `path`, lets `update`
/// change it, and writes the catalog back (whole, through a temporary
/// file) only if the result still parses.
pub fn update(
    path: &Path,
    update: impl FnOnce(&mut Calibration) -> anyhow::Result<()>,
) -> anyhow::Result<Calibration> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let (hand, block) = split(&text);
    let mut calibration: Calibration = toml::from_str(block).map_err(|e| {
        anyhow::anyhow!(
            "{}: the calibrated block below the marker line: {e}",
            path.display()
        )
    })?;
    update(&mut calibration)?;
    let written = format!(
        "{}\n{MARKER}\n{}",
        hand.trim_end(),
        toml::to_string(&calibration)?
    );
    super::RouterCatalog::parse(&written)
        .map_err(|e| anyhow::anyhow!("{}: after calibration: {e}", path.display()))?;
    let temporary = path.with_extension("calibrating");
    std::fs::write(&temporary, &written)?;
    std::fs::rename(&temporary, path)?;
    Ok(calibration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_is_rewritten_and_the_hand_written_part_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.toml");
        let hand = "# prices as of today\n[[deployment]]\nname = \"local\"\nprovider = \"local\"\nmodel = \"m\"\nhost_usd_per_hour = 0.1\ntokens_per_s = 10\ncontext_window = 100\nquality = { general = 0.2 }\n";
        std::fs::write(&path, hand).unwrap();
        let measured = |score: f64| Measured {
            deployment: "local".into(),
            task: "faq".into(),
            score,
            cases: 40,
            low: score - 0.1,
            high: score + 0.1,
            runs: vec!["eval_1".into()],
            measured_at: "2026-12-03T00:00:00Z".into(),
        };
        update(&path, |c| {
            c.record(measured(0.5));
            c.set_floor("faq", 0.45);
            Ok(())
        })
        .unwrap();
        update(&path, |c| {
            c.record(measured(0.7));
            Ok(())
        })
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(hand.trim_end()), "{text}");
        assert_eq!(text.matches(MARKER).count(), 1);
        let catalog = crate::router::RouterCatalog::parse(&text).unwrap();
        let local = catalog.deployment("local").unwrap();
        assert_eq!(local.quality_for(Some("faq")), 0.7);
        assert_eq!(local.quality_for(Some("other")), 0.2);
        assert_eq!(catalog.floor("faq"), Some(0.45));

        // A calibration naming no deployment of the catalog is refused and
        // leaves the file as it was.
        let error = update(&path, |c| {
            c.record(Measured {
                deployment: "gone".into(),
                ..measured(0.9)
            });
            Ok(())
        })
        .unwrap_err();
        assert!(format!("{error:#}").contains("\"gone\""), "{error:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
