//! The adapters a server knows (from the catalog, `--lora`, the adapter
//! directories or the admin API) and the ones resident in memory. Adapters
//! load on first use; past the caps (count and bytes) the least recently
//! used idle adapter is dropped, and a dropped adapter's memory is returned
//! as soon as the last request running with it ends.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

pub use crate::lora::check_name;
use crate::lora::{Adapter, InvalidName, UnmergedAdapter};
use crate::models::LoadedModel;

/// How long a load waits for a resident adapter to become idle when the
/// caps are reached and every resident adapter is in use.
const WAIT_FOR_IDLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Where an adapter was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Catalog,
    CommandLine,
    /// Found in an adapter directory by name on first use.
    Directory,
    AdminApi,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdapterSpec {
    pub name: String,
    /// The served model id the adapter runs on.
    pub base: String,
    pub path: PathBuf,
    pub origin: Origin,
    /// The tenant that loaded it; shared adapters (catalog, command line,
    /// adapter directories, admins) have none.
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct AdapterLimits {
    /// Adapters resident at once.
    pub max_resident: usize,
    /// Bytes of factors resident at once.
    pub max_bytes: usize,
}

impl Default for AdapterLimits {
    fn default() -> Self {
        Self {
            max_resident: 16,
            max_bytes: 1 << 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    #[error("the adapter '{0}' is already registered; unload it first")]
    Exists(String),
    #[error("{0}")]
    OutsideRoots(String),
    #[error("the adapter '{name}' cannot be loaded: {reason}")]
    Invalid { name: String, reason: String },
    #[error("the adapter takes {bytes} bytes, more than the {limit} bytes allowed for adapters")]
    TooLarge { bytes: usize, limit: usize },
    #[error(
        "adapter memory is full ({resident} adapters, {bytes} bytes, all in use); try again when requests finish"
    )]
    Full { resident: usize, bytes: usize },
}

/// One adapter as `GET /v1/adapters` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterStatus {
    #[serde(flatten)]
    pub spec: AdapterSpec,
    pub resident: bool,
    pub bytes: usize,
    /// Requests running with it now.
    pub in_use: usize,
}

struct Resident {
    weights: Arc<UnmergedAdapter>,
    last_used: u64,
}

#[derive(Default)]
struct State {
    known: BTreeMap<String, AdapterSpec>,
    resident: HashMap<String, Resident>,
    clock: u64,
}

impl State {
    fn bytes(&self) -> usize {
        self.resident.values().map(|r| r.weights.bytes()).sum()
    }
}

pub struct AdapterRegistry {
    /// Canonical adapter directories: where adapters are found by name, and
    /// the only places the admin API may load from.
    roots: Vec<PathBuf>,
    limits: AdapterLimits,
    state: Mutex<State>,
    /// One load at a time, so concurrent first requests load an adapter once.
    loading: Mutex<()>,
}

impl AdapterRegistry {
    /// Directories that do not exist are skipped.
    pub fn new(roots: &[PathBuf], limits: AdapterLimits) -> Self {
        Self {
            roots: roots
                .iter()
                .filter_map(|r| std::fs::canonicalize(r).ok())
                .collect(),
            limits,
            state: Mutex::default(),
            loading: Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `path` made canonical, refused unless it lies in an adapter directory.
    pub fn inside_roots(&self, path: &Path) -> Result<PathBuf, RegistryError> {
        let outside = || {
            RegistryError::OutsideRoots(format!(
                "{} is not inside an adapter directory ({})",
                path.display(),
                if self.roots.is_empty() {
                    "none configured".to_string()
                } else {
                    self.roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ))
        };
        let resolved = match path.is_absolute() {
            true => std::fs::canonicalize(path),
            false => self
                .roots
                .iter()
                .map(|root| std::fs::canonicalize(root.join(path)))
                .find(Result::is_ok)
                .unwrap_or_else(|| std::fs::canonicalize(path)),
        }
        .map_err(|_| RegistryError::OutsideRoots(format!("{} does not exist", path.display())))?;
        if self.roots.iter().any(|root| resolved.starts_with(root)) {
            Ok(resolved)
        } else {
            Err(outside())
        }
    }

    /// Whether a resolved `path` lies in `<root>/<tenant>/` of an adapter directory.
    pub fn inside_tenant_dir(&self, path: &Path, tenant: &str) -> bool {
        self.roots
            .iter()
            .any(|root| path.starts_with(root.join(tenant)))
    }

    /// Declares an adapter (loaded on first use). Names are unique.
    pub fn register(&self, spec: AdapterSpec) -> Result<(), RegistryError> {
        check_name(&spec.name)?;
        let mut state = self.state();
        if state.known.contains_key(&spec.name) {
            return Err(RegistryError::Exists(spec.name));
        }
        state.known.insert(spec.name.clone(), spec);
        Ok(())
    }

    /// The adapter declared as `name`, or one found by that name in an
    /// adapter directory (then declared for `base`).
    pub fn find(&self, name: &str, base: Option<&str>) -> Option<AdapterSpec> {
        if let Some(spec) = self.state().known.get(name) {
            return Some(spec.clone());
        }
        let base = base?;
        check_name(name).ok()?;
        let path = self
            .roots
            .iter()
            .map(|root| root.join(name))
            .find(|dir| dir.join("adapter_config.json").is_file())?;
        let spec = AdapterSpec {
            name: name.to_string(),
            base: base.to_string(),
            path,
            origin: Origin::Directory,
            owner: None,
        };
        let mut state = self.state();
        Some(state.known.entry(name.to_string()).or_insert(spec).clone())
    }

    /// Declares an adapter and loads it at once; when it does not load,
    /// nothing of it is kept. Blocking.
    pub fn register_and_load(
        &self,
        spec: AdapterSpec,
        model: &LoadedModel,
    ) -> Result<Arc<UnmergedAdapter>, RegistryError> {
        self.register(spec.clone())?;
        self.acquire(&spec, model).inspect_err(|_| {
            self.unload(&spec.name);
        })
    }

    /// The adapter's weights laid out for `model`, loaded if not resident.
    /// An adapter found in a directory by name stays declared only once it
    /// loads. Blocking: run it off the async threads.
    pub fn acquire(
        &self,
        spec: &AdapterSpec,
        model: &LoadedModel,
    ) -> Result<Arc<UnmergedAdapter>, RegistryError> {
        let acquired = self.load(spec, model);
        if let Err(RegistryError::Invalid { .. }) = &acquired
            && spec.origin == Origin::Directory
        {
            self.unload(&spec.name);
        }
        acquired
    }

    fn load(
        &self,
        spec: &AdapterSpec,
        model: &LoadedModel,
    ) -> Result<Arc<UnmergedAdapter>, RegistryError> {
        if let Some(weights) = self.touch(&spec.name) {
            return Ok(weights);
        }
        let _loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(weights) = self.touch(&spec.name) {
            return Ok(weights);
        }
        let invalid = |reason: String| RegistryError::Invalid {
            name: spec.name.clone(),
            reason,
        };
        let started = std::time::Instant::now();
        let adapter = Adapter::load(&spec.path).map_err(invalid)?;
        let weights = model.prepare_adapter(&adapter).map_err(invalid)?;
        drop(adapter);
        if weights.bytes() > self.limits.max_bytes {
            return Err(RegistryError::TooLarge {
                bytes: weights.bytes(),
                limit: self.limits.max_bytes,
            });
        }
        // Requests finishing with an adapter release it a moment after
        // their response: wait a little for one to become idle.
        let deadline = std::time::Instant::now() + WAIT_FOR_IDLE;
        let mut state = loop {
            let mut state = self.state();
            if !state.known.contains_key(&spec.name) {
                return Err(invalid("it was unloaded while loading".to_string()));
            }
            match self.make_room(&mut state, weights.bytes()) {
                Ok(()) => break state,
                Err(full) if std::time::Instant::now() >= deadline => return Err(full),
                Err(_) => {
                    drop(state);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        };
        state.clock += 1;
        let last_used = state.clock;
        state.resident.insert(
            spec.name.clone(),
            Resident {
                weights: weights.clone(),
                last_used,
            },
        );
        tracing::info!(
            adapter = %spec.name,
            base = %spec.base,
            bytes = weights.bytes(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "adapter loaded"
        );
        publish(&state);
        Ok(weights)
    }

    fn touch(&self, name: &str) -> Option<Arc<UnmergedAdapter>> {
        let mut state = self.state();
        state.clock += 1;
        let clock = state.clock;
        let resident = state.resident.get_mut(name)?;
        resident.last_used = clock;
        Some(resident.weights.clone())
    }

    /// Drops idle adapters, least recently used first, until one of
    /// `incoming` bytes fits both caps.
    fn make_room(&self, state: &mut State, incoming: usize) -> Result<(), RegistryError> {
        loop {
            let fits = state.resident.len() < self.limits.max_resident
                && state.bytes() + incoming <= self.limits.max_bytes;
            if fits {
                return Ok(());
            }
            let idle = state
                .resident
                .iter()
                .filter(|(_, r)| Arc::strong_count(&r.weights) == 1)
                .min_by_key(|(_, r)| r.last_used)
                .map(|(name, _)| name.clone());
            match idle {
                Some(name) => {
                    state.resident.remove(&name);
                    tracing::info!(adapter = %name, "adapter evicted (least recently used)");
                }
                None => {
                    return Err(RegistryError::Full {
                        resident: state.resident.len(),
                        bytes: state.bytes(),
                    });
                }
            }
        }
    }

    /// Forgets an adapter. Requests running with it finish with it; its
    /// memory is returned when the last of them ends. Returns its status
    /// as it was, or None when unknown.
    pub fn unload(&self, name: &str) -> Option<AdapterStatus> {
        let mut state = self.state();
        let spec = state.known.remove(name)?;
        let resident = state.resident.remove(name);
        publish(&state);
        Some(AdapterStatus {
            spec,
            resident: resident.is_some(),
            bytes: resident.as_ref().map_or(0, |r| r.weights.bytes()),
            in_use: resident.map_or(0, |r| Arc::strong_count(&r.weights) - 1),
        })
    }

    pub fn list(&self) -> Vec<AdapterStatus> {
        let state = self.state();
        state
            .known
            .values()
            .map(|spec| {
                let resident = state.resident.get(&spec.name);
                AdapterStatus {
                    spec: spec.clone(),
                    resident: resident.is_some(),
                    bytes: resident.map_or(0, |r| r.weights.bytes()),
                    in_use: resident.map_or(0, |r| Arc::strong_count(&r.weights) - 1),
                }
            })
            .collect()
    }

    pub fn status(&self, name: &str) -> Option<AdapterStatus> {
        self.list().into_iter().find(|s| s.spec.name == name)
    }
}

fn publish(state: &State) {
    metrics::gauge!("qpai_adapters_resident").set(state.resident.len() as f64);
    metrics::gauge!("qpai_adapter_bytes").set(state.bytes() as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["house-style", "a", "v1.2_x"] {
            check_name(good).unwrap();
        }
        for bad in ["", "../x", "a/b", ".hidden", "a:b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_outside_the_adapter_directories_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        let registry = AdapterRegistry::new(&[root.path().to_path_buf()], Default::default());
        registry.inside_roots(Path::new("a")).unwrap();
        registry.inside_roots(&root.path().join("a")).unwrap();
        for outside in [
            other.path().to_path_buf(),
            root.path().join("a/../.."),
            PathBuf::from("../../etc"),
        ] {
            let error = registry.inside_roots(&outside).unwrap_err();
            assert!(matches!(error, RegistryError::OutsideRoots(_)), "{error}");
        }
    }
}
