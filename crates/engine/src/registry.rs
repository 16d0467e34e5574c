//! The workflows herald runs: the current set loaded from `workflows/*.yaml` (and the templates
//! they reference), plus every older version a live run is still pinned to. A reload that does
//! not check is refused as a whole and the running set stays.

use herald_core::workflow::{self, CompiledWorkflow, Diagnostic, Severity, WorkflowBundle};
use herald_store::{Signals, Store, Timestamp, WorkflowId};
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
    // Every diagnostic, in file order: warnings are shown beside errors, not dropped.
    let mut diagnostics = Vec::new();
    for bundle in bundles {
        match workflow::compile(bundle, custom_values) {
            Ok((wf, w)) => {
                diagnostics.extend(w);
                compiled.push(wf);
            }
            Err(d) => diagnostics.extend(d),
        }
    }
    if diagnostics.iter().any(|d| d.severity == Severity::Error) {
        Err(diagnostics)
    } else {
        Ok((compiled, diagnostics))
    }
}

/// An immutable view of the loaded workflows, swapped whole on reload.
#[derive(Default)]
pub struct Snapshot {
    /// The current version of each workflow, by id (sorted, so matching order is stable).
    pub current: BTreeMap<String, Arc<CompiledWorkflow>>,
    /// Every known version, by (id, version): current ones and those live runs are pinned to.
    pub versions: HashMap<(String, String), Arc<CompiledWorkflow>>,
    /// Enabled states recorded in the database by another process's reload, where they differ
    /// from this process's files: the database is the one truth between processes.
    pub stored_states: HashMap<String, bool>,
}

impl Snapshot {
    /// Whether a loaded version's filters or conditions read the contact's state, which is then
    /// loaded for dispatch.
    pub fn reads_contact_state(&self) -> bool {
        self.versions.values().any(|wf| wf.reads_contact_state)
    }

    pub fn version(&self, id: &str, version: &str) -> Option<&Arc<CompiledWorkflow>> {
        self.versions.get(&(id.to_owned(), version.to_owned()))
    }

    /// Whether the workflow `id` is currently enabled (a removed workflow counts as enabled, so
    /// its live runs finish on the version they are pinned to).
    pub fn is_enabled(&self, id: &str) -> bool {
        self.stored_states
            .get(id)
            .copied()
            .unwrap_or_else(|| self.current.get(id).is_none_or(|w| w.enabled))
    }
}

pub struct Registry {
    sources: Sources,
    custom_values: Vec<String>,
    store: Store,
    snapshot: RwLock<Arc<Snapshot>>,
    /// One reload at a time (SIGHUP, the admin API and other processes' announcements may
    /// race): the last to start wins.
    reloading: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Loads the workflows on disk and the versions live runs are pinned to. Fails if the files
    /// do not check.
    pub async fn load(
        sources: Sources,
        custom_values: Vec<String>,
        store: Store,
        now: Timestamp,
    ) -> Result<Self, RegistryError> {
        let registry = Self {
            sources,
            custom_values,
            store,
            snapshot: RwLock::new(Arc::default()),
            reloading: tokio::sync::Mutex::new(()),
        };
        registry.load_live_versions().await?;
        registry.reload(now).await?;
        Ok(registry)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("registry lock").clone()
    }

    /// Re-reads the files. On success the new set becomes current (its versions stored first, so
    /// a run can always find its version), runs of workflows whose enabled state differs from
    /// the one stored are parked or resumed, and the other processes on the database are told.
    /// Returns the warnings.
    pub async fn reload(&self, now: Timestamp) -> Result<Vec<Diagnostic>, RegistryError> {
        let _one_at_a_time = self.reloading.lock().await;
        let (compiled, warnings) = self.read_and_store(now).await?;
        let states = compiled
            .iter()
            .map(|w| (WorkflowId::from(w.id.as_str()), w.enabled))
            .collect();
        self.swap(compiled, HashMap::new());
        // Enabled or disabled is kept in the database: a workflow whose state there differs
        // from its file (toggled now, or while this process was down, or by another process's
        // files) has its runs parked or resumed.
        for (id, enabled, runs) in self.store.sync_workflow_states(states, now).await? {
            tracing::info!(workflow = %id, enabled, runs, "workflow toggled");
        }
        self.store.announce(Signals::WORKFLOWS);
        Ok(warnings)
    }

    /// Takes in another process's reload: re-reads this process's own files (a version it does
    /// not have on disk is loaded from the database when a run needs it, see
    /// [`Registry::ensure_versions`]) and adopts the enabled states that reload recorded. It
    /// records nothing itself, so processes with different files do not undo each other.
    pub async fn refresh(&self, now: Timestamp) -> Result<(), RegistryError> {
        let _one_at_a_time = self.reloading.lock().await;
        let compiled = match self.read_and_store(now).await {
            Ok((compiled, _)) => Some(compiled),
            Err(RegistryError::Invalid(d)) => {
                tracing::warn!(
                    errors = d
                        .iter()
                        .filter(|d| d.severity == herald_core::workflow::Severity::Error)
                        .count(),
                    "this process's workflow files do not check; it keeps its running set and adopts the stored states only"
                );
                None
            }
            Err(e) => return Err(e),
        };
        self.adopt_stored(compiled).await
    }

    /// Takes in what other processes recorded (enabled states, versions live runs are pinned to)
    /// without re-reading this process's files. For when this process begins to listen: it read
    /// its files when it loaded, and reading them again then would take live whatever an
    /// operator is halfway through editing, with no reload asked for.
    pub async fn catch_up(&self) -> Result<(), RegistryError> {
        let _one_at_a_time = self.reloading.lock().await;
        self.adopt_stored(None).await
    }

    /// Makes `compiled` (if any; else the running set stays) current with the enabled states
    /// stored in the database, and loads the versions live runs are pinned to.
    async fn adopt_stored(
        &self,
        compiled: Option<Vec<CompiledWorkflow>>,
    ) -> Result<(), RegistryError> {
        let stored: HashMap<String, bool> = self
            .store
            .workflow_states()
            .await?
            .into_iter()
            .map(|(id, enabled)| (id.into(), enabled))
            .collect();
        match compiled {
            Some(compiled) => self.swap(compiled, stored),
            None => {
                let old = self.snapshot();
                let next = Snapshot {
                    current: old.current.clone(),
                    versions: old.versions.clone(),
                    stored_states: stored,
                };
                *self.snapshot.write().expect("registry lock") = Arc::new(next);
            }
        }
        self.load_live_versions().await
    }

    /// Makes sure each (id, version) is loaded, reading the ones this process lacks from the
    /// database (started by another process, from files this one does not have).
    pub async fn ensure_versions(&self, wanted: &[(String, String)]) -> Result<(), RegistryError> {
        let missing: Vec<&(String, String)> = {
            let snapshot = self.snapshot();
            wanted
                .iter()
                .filter(|k| !snapshot.versions.contains_key(*k))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut loaded = Vec::new();
        for (id, version) in missing {
            if let Some(bundle) = self
                .store
                .workflow_version(id.as_str().into(), version.clone())
                .await?
            {
                loaded.push(self.compile_stored(id, version, &bundle)?);
            }
        }
        self.add_versions(loaded);
        Ok(())
    }

    /// Every version a live run is pinned to, from the database.
    async fn load_live_versions(&self) -> Result<(), RegistryError> {
        let known = self.snapshot();
        let mut loaded = Vec::new();
        for (id, version, bundle) in self.store.live_workflow_versions().await? {
            if known.version(&id, &version).is_none() {
                loaded.push(self.compile_stored(&id, &version, &bundle)?);
            }
        }
        self.add_versions(loaded);
        Ok(())
    }

    fn compile_stored(
        &self,
        id: &str,
        version: &str,
        bundle: &str,
    ) -> Result<Arc<CompiledWorkflow>, RegistryError> {
        let bad = |e: String| RegistryError::BadStoredVersion(id.to_owned(), version.to_owned(), e);
        let bundle: WorkflowBundle =
            serde_json::from_str(bundle).map_err(|e| bad(e.to_string()))?;
        let (wf, _) = workflow::compile(bundle, &self.custom_values).map_err(|d| bad(join(&d)))?;
        Ok(Arc::new(wf))
    }

    fn add_versions(&self, loaded: Vec<Arc<CompiledWorkflow>>) {
        if loaded.is_empty() {
            return;
        }
        let mut slot = self.snapshot.write().expect("registry lock");
        let mut versions = slot.versions.clone();
        for wf in loaded {
            versions.insert((wf.id.clone(), wf.version.clone()), wf);
        }
        *slot = Arc::new(Snapshot {
            current: slot.current.clone(),
            versions,
            stored_states: slot.stored_states.clone(),
        });
    }

    /// Reads and checks the files, all or nothing, and stores their versions.
    async fn read_and_store(
        &self,
        now: Timestamp,
    ) -> Result<(Vec<CompiledWorkflow>, Vec<Diagnostic>), RegistryError> {
        let bundles = read_bundles(&self.sources)?;
        let (compiled, warnings) =
            compile_all(bundles, &self.custom_values).map_err(RegistryError::Invalid)?;
        let rows = compiled
            .iter()
            .map(|w| {
                (
                    WorkflowId::from(w.id.as_str()),
                    w.version.clone(),
                    serde_json::to_string(&w.bundle).expect("bundle serializes"),
                )
            })
            .collect();
        self.store.save_workflow_versions(rows, now).await?;
        Ok((compiled, warnings))
    }

    /// Makes `compiled` the current set; `stored_states` as in [`Snapshot`] (the ones equal to
    /// the files' are dropped).
    fn swap(&self, compiled: Vec<CompiledWorkflow>, mut stored_states: HashMap<String, bool>) {
        let mut slot = self.snapshot.write().expect("registry lock");
        let mut next = Snapshot {
            current: BTreeMap::new(),
            versions: slot.versions.clone(),
            stored_states: HashMap::new(),
        };
        for wf in compiled {
            let wf = Arc::new(wf);
            next.versions
                .insert((wf.id.clone(), wf.version.clone()), wf.clone());
            next.current.insert(wf.id.clone(), wf);
        }
        stored_states
            .retain(|id, enabled| next.current.get(id).is_some_and(|w| w.enabled != *enabled));
        next.stored_states = stored_states;
        *slot = Arc::new(next);
    }
}
