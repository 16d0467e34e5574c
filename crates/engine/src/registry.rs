//! The workflows herald runs: the current set loaded from `workflows/*.yaml` (and the templates
//! they reference), plus every older version a live run is still pinned to. A reload that does
//! not check is refused as a whole and the running set stays.

use herald_core::workflow::{self, CompiledWorkflow, Diagnostic, Severity, WorkflowBundle};
use herald_store::Store;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("workflows do not check:\n{}", join(.0))]
    Invalid(Vec<Diagnostic>),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] herald_store::StoreError),
    #[error("stored workflow version {0}@{1} is unreadable: {2}")]
    BadStoredVersion(String, String, String),
}

fn join(d: &[Diagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where workflows and templates live on disk.
#[derive(Debug, Clone)]
pub struct Sources {
    pub workflows: PathBuf,
    pub templates: PathBuf,
}

/// Reads every `*.yaml` of the workflows folder into bundles (with the templates each references).
pub fn read_bundles(sources: &Sources) -> Result<Vec<WorkflowBundle>, RegistryError> {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
        move |source| RegistryError::Io {
            path: path.display().to_string(),
            source,
        }
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&sources.workflows)
        .map_err(io(&sources.workflows))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    let mut bundles = Vec::with_capacity(paths.len());
    for path in paths {
        let yaml = std::fs::read_to_string(&path).map_err(io(&path))?;
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let load = |name: &str| std::fs::read_to_string(sources.templates.join(name)).ok();
        bundles.push(workflow::bundle_from(
            &id,
            &path.display().to_string(),
            &yaml,
            &load,
        ));
    }
    Ok(bundles)
}

/// Compiles bundles; all or nothing. Returns the workflows and every warning.
pub fn compile_all(
    bundles: Vec<WorkflowBundle>,
    custom_values: &[String],
) -> Result<(Vec<CompiledWorkflow>, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut compiled = Vec::new();
    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    for bundle in bundles {
        match workflow::compile(bundle, custom_values) {
            Ok((wf, w)) => {
                warnings.extend(w);
                compiled.push(wf);
            }
            Err(d) => errors.extend(d.into_iter().filter(|d| d.severity == Severity::Error)),
        }
    }
    if errors.is_empty() {
        Ok((compiled, warnings))
    } else {
        Err(errors)
    }
}

/// An immutable view of the loaded workflows, swapped whole on reload.
#[derive(Default)]
pub struct Snapshot {
    /// The current version of each workflow, by id (sorted, so matching order is stable).
    pub current: BTreeMap<String, Arc<CompiledWorkflow>>,
    /// Every known version, by (id, version): current ones and those live runs are pinned to.
    pub versions: HashMap<(String, String), Arc<CompiledWorkflow>>,
}

impl Snapshot {
    pub fn version(&self, id: &str, version: &str) -> Option<&Arc<CompiledWorkflow>> {
        self.versions.get(&(id.to_owned(), version.to_owned()))
    }

    /// Whether the workflow `id` is currently enabled (a removed workflow counts as enabled, so
    /// its live runs finish on the version they are pinned to).
    pub fn is_enabled(&self, id: &str) -> bool {
        self.current.get(id).is_none_or(|w| w.enabled)
    }
}

pub struct Registry {
    sources: Sources,
    custom_values: Vec<String>,
    store: Store,
    snapshot: RwLock<Arc<Snapshot>>,
    /// One reload at a time (SIGHUP and the admin API may race): the last to start wins.
    reloading: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Loads the workflows on disk and the versions live runs are pinned to. Fails if the files
    /// do not check.
    pub async fn load(
        sources: Sources,
        custom_values: Vec<String>,
        store: Store,
        now_ms: i64,
    ) -> Result<Self, RegistryError> {
        let registry = Self {
            sources,
            custom_values,
            store,
            snapshot: RwLock::new(Arc::default()),
            reloading: tokio::sync::Mutex::new(()),
        };
        let mut versions = HashMap::new();
        for (id, version, bundle) in registry.store.live_workflow_versions().await? {
            let bad = |e: String| RegistryError::BadStoredVersion(id.clone(), version.clone(), e);
            let bundle: WorkflowBundle =
                serde_json::from_str(&bundle).map_err(|e| bad(e.to_string()))?;
            let (wf, _) =
                workflow::compile(bundle, &registry.custom_values).map_err(|d| bad(join(&d)))?;
            versions.insert((id, version), Arc::new(wf));
        }
        *registry.snapshot.write().expect("registry lock") = Arc::new(Snapshot {
            current: BTreeMap::new(),
            versions,
        });
        registry.reload(now_ms).await?;
        Ok(registry)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("registry lock").clone()
    }

    /// Re-reads the files. On success the new set becomes current (its versions stored first, so
    /// a run can always find its version) and runs of workflows whose enabled state differs from
    /// the one stored are parked or resumed. Returns the warnings.
    pub async fn reload(&self, now_ms: i64) -> Result<Vec<Diagnostic>, RegistryError> {
        let _one_at_a_time = self.reloading.lock().await;
        let bundles = read_bundles(&self.sources)?;
        let (compiled, warnings) =
            compile_all(bundles, &self.custom_values).map_err(RegistryError::Invalid)?;
        let rows = compiled
            .iter()
            .map(|w| {
                (
                    w.id.clone(),
                    w.version.clone(),
                    serde_json::to_string(&w.bundle).expect("bundle serializes"),
                )
            })
            .collect();
        self.store.save_workflow_versions(rows, now_ms).await?;

        let old = self.snapshot();
        let mut next = Snapshot {
            current: BTreeMap::new(),
            versions: old.versions.clone(),
        };
        for wf in compiled {
            let wf = Arc::new(wf);
            next.versions
                .insert((wf.id.clone(), wf.version.clone()), wf.clone());
            next.current.insert(wf.id.clone(), wf);
        }
        *self.snapshot.write().expect("registry lock") = Arc::new(next);
        // Enabled or disabled is kept in the database: a workflow whose state there differs
        // from its file (toggled now, or while this process was down, or by another process's
        // files) has its runs parked or resumed.
        let states = self
            .snapshot()
            .current
            .values()
            .map(|w| (w.id.clone(), w.enabled))
            .collect();
        for (id, enabled, runs) in self.store.sync_workflow_states(states, now_ms).await? {
            tracing::info!(workflow = %id, enabled, runs, "workflow toggled");
        }
        Ok(warnings)
    }
}
