//! Operating keylease while it runs: [`Control`], which reloads the configuration (for SIGHUP
//! and `KeyAdmin.Reload`) and edits it, and the admin service `keylease.v1.KeyAdmin` on top.
//! A reload reads the configuration as start-up does, applies what can change live (keys,
//! pools, limits, callers, TLS certificates) without dropping a lease, says what changed and what
//! only a restart would change, and publishes that as an event with the caller's name. Keys are
//! added and removed by rewriting the keys file, limits by rewriting the config file (atomically,
//! keeping its comments), then reloading: the configuration stays the one home of every secret,
//! and a restart finds what an admin did.

mod diff;
mod files;

use diff::{describe_drains, diff};
use files::{keys_file, read, replace_file, with_limits, without_key};

use crate::auth::caller_name;
use crate::config::{self, ConfigError, Overrides, Settings, StateLocation};
use crate::connections::Front;
use crate::key_checks::{CheckError, CheckSetup, Checked, Checker};
use crate::shell::State;
use crate::store::journal::StoreFailed;
use crate::tls::TlsError;
use crate::wire;
use keylease::pb;
use keylease::pb::key_admin_server::KeyAdmin;
use keylease_engine::{
    Command, EngineError, EventKind, KeyView, LimitKind, Reconfigured, SetupError, canonical_model,
};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Where the configuration is read from: what start-up read, read again by each reload.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    /// The process environment at start (`KEYLEASE_…` overrides, `GEMINI_API_KEY…`).
    pub env: HashMap<String, String>,
    pub overrides: Overrides,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Settings, ConfigError> {
        config::load(self.path.as_deref(), &self.env, &self.overrides)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The configuration on disk is not valid: nothing was applied.
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Setup(#[from] SetupError),
    #[error("{0}")]
    Store(#[from] StoreFailed),
    #[error("{0}")]
    Engine(#[from] keylease_engine::EngineError),
    /// Not possible here, and why.
    #[error("{0}")]
    Refused(String),
    /// A field of the request is wrong.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

/// An admin call's failure as a status (the engine's and the store's mapped as the wire maps them).
impl From<AdminError> for Status {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::Engine(error) => wire::engine_status(error),
            AdminError::Store(failure) => failure.into(),
            AdminError::Invalid { .. } => Status::invalid_argument(error.to_string()),
            AdminError::Config(_) | AdminError::Tls(_) | AdminError::Setup(_) => {
                Status::failed_precondition(format!(
                    "the configuration on disk is not valid, nothing changed: {error}"
                ))
            }
            AdminError::Refused(_) => Status::failed_precondition(error.to_string()),
            AdminError::File { .. } => Status::internal(error.to_string()),
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> AdminError {
    AdminError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> AdminError {
    AdminError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub changes: Vec<String>,
    pub needs_restart: Vec<String>,
}

/// The running server as operators steer it: its state, its front (callers, TLS), and the
/// settings in force. One change at a time: each holds the settings until it is done.
pub struct Control {
    source: ConfigSource,
    running: tokio::sync::Mutex<Settings>,
    front: Front,
    state: Arc<State>,
    /// Checks keys with the provider, when `[health]` is configured.
    checker: Option<Arc<Checker>>,
}

impl Control {
    /// Control of `state`, configured by `settings` as read from `source`; its front (callers,
    /// TLS) is made from them.
    pub fn new(
        source: ConfigSource,
        settings: Settings,
        state: Arc<State>,
        checks: Option<CheckSetup>,
    ) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            source,
            front: Front::new(&settings)?,
            running: tokio::sync::Mutex::new(settings),
            checker: checks.map(|setup| Checker::new(state.clone(), setup)),
            state,
        }))
    }

    /// The checker of keys, when `[health]` is configured: whoever serves this state runs it.
    pub fn checker(&self) -> Option<&Arc<Checker>> {
        self.checker.as_ref()
    }

    /// Checks the keys named (all when none is) with the provider now.
    pub async fn check_keys(
        &self,
        by: Option<&Arc<str>>,
        key_ids: Vec<String>,
    ) -> Result<Vec<Checked>, AdminError> {
        let checker = self.checker.as_ref().ok_or_else(|| {
            AdminError::Refused(
                "keys are not checked here: configure [health] (and restart) to check them".into(),
            )
        })?;
        checker
            .check_now(by, key_ids)
            .await
            .map_err(|error| match error {
                CheckError::UnknownKey(id) => AdminError::Engine(EngineError::KeyNotFound(id)),
                CheckError::TooMany(_) => invalid("key_ids", error.to_string()),
                CheckError::Store(failure) => AdminError::Store(failure),
            })
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    pub fn front(&self) -> &Front {
        &self.front
    }

    /// Reads the configuration again and applies it; on an error nothing changes.
    pub async fn reload(&self, by: Option<&Arc<str>>) -> Result<Reloaded, AdminError> {
        let mut running = self.running.lock().await;
        if matches!(running.state, StateLocation::Redis(_)) {
            return Err(AdminError::Refused(
                "each replica reads its own files: send SIGHUP to every replica (this call would reload only the one that leads)".into(),
            ));
        }
        self.reload_locked(by, &mut running).await
    }

    async fn reload_locked(
        &self,
        by: Option<&Arc<str>>,
        running: &mut Settings,
    ) -> Result<Reloaded, AdminError> {
        let read = crate::builder::load_off_the_runtime(self.source.clone()).await?;
        let mut report = diff(running, &read);
        let read_tls = read.tls.clone();
        let loaded = read.keeping_what_needs_a_restart(running);
        let configured = self.state.reconfigure(by, &loaded).await??;
        describe_drains(&configured, &mut report.changes);
        // The report quotes names from the files, where a mistake can put a secret: masked
        // (with the keys just loaded among the secrets) before it is logged, shown or answered.
        for line in report.changes.iter_mut().chain(&mut report.needs_restart) {
            *line = self.state.redact(std::mem::take(line));
        }
        let replication_token = match &running.state {
            StateLocation::Redis(replication) => Some(&replication.token),
            _ => None,
        };
        self.front.gate.replace(&loaded.access, replication_token);
        if let Some(tls) = &self.front.tls
            && read_tls.as_ref() == Some(tls.files())
        {
            tls.reload()?;
            report
                .changes
                .push("TLS certificates read again from their files".into());
        }
        *running = loaded;
        self.state.publish(
            by,
            EventKind::Reloaded {
                changes: report.changes.clone(),
                needs_restart: report.needs_restart.clone(),
            },
        );
        Ok(report)
    }

    /// Adds a key to the keys file and lends it: its status once added.
    pub async fn add_key(
        &self,
        by: Option<&Arc<str>>,
        request: pb::AddKeyRequest,
    ) -> Result<KeyView, AdminError> {
        let mut running = self.running.lock().await;
        self.refuse_with_replicas(&running, "AddKey")?;
        let path = keys_file(&running)?;
        let secret = request.secret.trim();
        if let Some(problem) = crate::config::secret_problem(secret) {
            return Err(invalid("secret", problem));
        }
        if secret.starts_with('#') {
            return Err(invalid("secret", "starts with `#`, which begins a comment"));
        }
        if let Some(existing) = running.keys.iter().find(|k| k.secret.reveal() == secret) {
            return Err(AdminError::Refused(format!(
                "this key is already configured, as {}",
                existing.id
            )));
        }
        let mut line = secret.to_string();
        for (field, name, value) in [
            ("key_id", "id", request.key_id.as_str()),
            ("project", "project", request.project.as_str()),
            ("pool", "pool", request.pool.as_str()),
        ] {
            if value.is_empty() {
                continue;
            }
            if value
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '#')
            {
                return Err(invalid(field, "may not hold white space or `#`"));
            }
            self.check_name(field, value)?;
            line.push_str(&format!(" {name}={value}"));
        }
        if request.max_leases > 0 {
            line.push_str(&format!(" max_leases={}", request.max_leases));
        }
        let before = read(&path)?;
        let mut after = before.clone();
        if !after.is_empty() && !after.ends_with('\n') {
            after.push('\n');
        }
        after.push_str(&line);
        after.push('\n');
        self.rewrite_and_reload(by, &mut running, &path, &before, &after, Some(0o600))
            .await?;
        let Some(id) = running
            .keys
            .iter()
            .find(|k| k.secret.reveal() == secret)
            .map(|k| k.id.clone())
        else {
            // The file read the line as something else: the answer must match the effect,
            // so the file is put back as it was, and what it loads with it.
            replace_file(&path, &before, Some(0o600))?;
            self.reload_locked(by, &mut running).await?;
            return Err(AdminError::Refused(format!(
                "the keys file {} does not read this line back as the key given, so it was not added",
                path.display()
            )));
        };
        Ok(self
            .state
            .read(|engine, now| engine.key_status(now, &id))
            .await??)
    }

    /// Removes a key from the keys file: it drains. How many leases still run on it.
    pub async fn remove_key(
        &self,
        by: Option<&Arc<str>>,
        key_id: &str,
    ) -> Result<usize, AdminError> {
        let mut running = self.running.lock().await;
        self.refuse_with_replicas(&running, "RemoveKey")?;
        let path = keys_file(&running)?;
        let Some(key) = running.keys.iter().find(|k| k.id == key_id).cloned() else {
            return Err(keylease_engine::EngineError::KeyNotFound(key_id.to_string()).into());
        };
        let before = read(&path)?;
        let after = without_key(&before, key.secret.reveal());
        if after.len() == before.len() {
            return Err(AdminError::Refused(format!(
                "key {key_id} is not in the keys file {}: it comes from the config file's [[keys]] or the environment; remove it there, then reload",
                path.display()
            )));
        }
        self.rewrite_and_reload(by, &mut running, &path, &before, &after, Some(0o600))
            .await?;
        let draining = self
            .state
            .read(|engine, now| engine.key_status(now, key_id))
            .await?
            .map_or(0, |key| key.leases.len());
        Ok(draining)
    }

    /// Sets limits of a model (or of one project for it) in the config file, and applies them.
    pub async fn set_limits(
        &self,
        by: Option<&Arc<str>>,
        request: pb::SetLimitsRequest,
    ) -> Result<Reloaded, AdminError> {
        let mut running = self.running.lock().await;
        self.refuse_with_replicas(&running, "SetLimits")?;
        let Some(path) = self.source.path.clone() else {
            return Err(AdminError::Refused(
                "the server was started without a config file: limits live in one".into(),
            ));
        };
        let model = canonical_model(&request.model);
        for (field, name) in [
            ("pool", request.pool.as_str()),
            ("project", request.project.as_str()),
            ("model", model),
        ] {
            self.check_name(field, name)?;
        }
        let pool = keylease_engine::pool_or_default(&request.pool);
        if model.is_empty() {
            return Err(invalid("model", "empty"));
        }
        let engine_pool = running
            .engine
            .pools
            .get(pool)
            .ok_or_else(|| invalid("pool", format!("no pool {pool:?} is configured")))?;
        if !engine_pool.models.contains_key(model) {
            return Err(invalid(
                "model",
                format!("pool {pool} has no model {model:?} (add it to the config file first)"),
            ));
        }
        let changes = [
            ("requests_per_minute", request.requests_per_minute),
            ("tokens_per_minute", request.tokens_per_minute),
            ("requests_per_day", request.requests_per_day),
            ("tokens_per_day", request.tokens_per_day),
        ];
        if changes.iter().all(|(_, value)| value.is_none()) {
            return Err(invalid("requests_per_minute", "no limit given to change"));
        }
        for (field, value) in changes {
            if value.is_some_and(|v| v > i64::MAX as u64) {
                return Err(invalid(field, "above the largest TOML integer"));
            }
        }
        let before = read(&path)?;
        let after = with_limits(&before, pool, &request.project, model, &changes)
            .map_err(|reason| file_error(&path, reason))?;
        let mode = std::fs::metadata(&path)
            .ok()
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
        self.rewrite_and_reload(by, &mut running, &path, &before, &after, mode)
            .await
    }

    /// Writes `after` over `path` and reloads; puts `before` back when the reload fails.
    async fn rewrite_and_reload(
        &self,
        by: Option<&Arc<str>>,
        running: &mut Settings,
        path: &Path,
        before: &str,
        after: &str,
        mode: Option<u32>,
    ) -> Result<Reloaded, AdminError> {
        replace_file(path, after, mode)?;
        match self.reload_locked(by, running).await {
            Ok(report) => Ok(report),
            Err(error) => {
                if let Err(restore) = replace_file(path, before, mode) {
                    tracing::error!(%restore, "putting the file back after a failed reload failed");
                }
                Err(error)
            }
        }
    }

    /// A name an admin call would write into a file (and so into every status reply, metric and
    /// log line about it): bounded, and holding no secret, nor anything shaped like one.
    fn check_name(&self, field: &'static str, name: &str) -> Result<(), AdminError> {
        if let Some(problem) = crate::config::name_problem(name) {
            return Err(invalid(field, problem));
        }
        if self.state.redactor().finds_secret(name) {
            return Err(invalid(
                field,
                "holds a key or looks like one; it is shown to every operator",
            ));
        }
        Ok(())
    }

    fn refuse_with_replicas(&self, running: &Settings, call: &str) -> Result<(), AdminError> {
        if matches!(running.state, StateLocation::Redis(_)) {
            return Err(AdminError::Refused(format!(
                "{call} edits this replica's files only, and each replica has its own: make the change in every replica's configuration, then reload each (SIGHUP)"
            )));
        }
        Ok(())
    }
}

/// The admin service: each call checks its request, runs it through [`Control`] or the engine
/// as the admin who called (the gate let only admins through), and answers.
pub struct KeyAdminService {
    control: Arc<Control>,
}

impl KeyAdminService {
    pub fn new(control: Arc<Control>) -> Self {
        Self { control }
    }

    fn state(&self) -> &Arc<State> {
        self.control.state()
    }

    async fn key_enabled(
        &self,
        by: Option<&Arc<str>>,
        key_id: String,
        enabled: bool,
        reason: String,
    ) -> Result<pb::KeyStatus, Status> {
        let state = self.state();
        let key = state
            .set_key_enabled(by, key_id, enabled, reason)
            .await?
            .map_err(wire::engine_status)?;
        Ok(wire::key_to_pb(key, state.time()))
    }

    fn key_status(&self, key: KeyView) -> pb::KeyStatus {
        wire::key_to_pb(key, self.state().time())
    }
}

fn reload_to_pb(report: Reloaded) -> pb::ReloadResponse {
    pb::ReloadResponse {
        changes: report.changes,
        needs_restart: report.needs_restart,
    }
}

#[tonic::async_trait]
impl KeyAdmin for KeyAdminService {
    async fn add_key(
        &self,
        request: Request<pb::AddKeyRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let by = caller_name(&request);
        let answer = self
            .control
            .add_key(by.as_ref(), request.into_inner())
            .await
            .map(|key| self.key_status(key))
            .map_err(Status::from);
        self.state().outgoing(answer).map(Response::new)
    }

    async fn remove_key(
        &self,
        request: Request<pb::RemoveKeyRequest>,
    ) -> Result<Response<pb::RemoveKeyResponse>, Status> {
        let by = caller_name(&request);
        let key_id = request.into_inner().key_id;
        let answer = self
            .control
            .remove_key(by.as_ref(), &key_id)
            .await
            .map(|draining| pb::RemoveKeyResponse {
                key_id,
                draining_leases: draining as u32,
            })
            .map_err(Status::from);
        self.state().outgoing(answer).map(Response::new)
    }

    async fn disable_key(
        &self,
        request: Request<pb::DisableKeyRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let by = caller_name(&request);
        let request = request.into_inner();
        let answer = self
            .key_enabled(by.as_ref(), request.key_id, false, request.reason)
            .await;
        self.state().outgoing(answer).map(Response::new)
    }

    async fn enable_key(
        &self,
        request: Request<pb::EnableKeyRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let by = caller_name(&request);
        let key_id = request.into_inner().key_id;
        let answer = self
            .key_enabled(by.as_ref(), key_id, true, String::new())
            .await;
        self.state().outgoing(answer).map(Response::new)
    }

    async fn check_keys(
        &self,
        request: Request<pb::CheckKeysRequest>,
    ) -> Result<Response<pb::CheckKeysResponse>, Status> {
        let by = caller_name(&request);
        let key_ids = request.into_inner().key_ids;
        let answer = self
            .control
            .check_keys(by.as_ref(), key_ids)
            .await
            .map(|checked| pb::CheckKeysResponse {
                keys: checked
                    .into_iter()
                    .map(|c| pb::KeyChecked {
                        key_id: c.key_id,
                        check: Some(wire::check_to_pb(&c.check)),
                        key: c.key.map(|key| self.key_status(key)),
                    })
                    .collect(),
            })
            .map_err(Status::from);
        self.state().outgoing(answer).map(Response::new)
    }

    async fn reset_quota_group(
        &self,
        request: Request<pb::ResetQuotaGroupRequest>,
    ) -> Result<Response<pb::QuotaGroupStatus>, Status> {
        let by = caller_name(&request);
        let request = request.into_inner();
        let pool = keylease_engine::pool_or_default(&request.pool).to_string();
        let reset = Command::ResetCooldown {
            pool,
            project: request.project,
            model: request.model,
            forget_learned: request.forget_learned_limits,
        };
        let answer = async {
            let group = self
                .state()
                .run(by.as_ref(), reset)
                .await?
                .into_cooldown_reset()
                .map_err(wire::engine_status)?;
            Ok(wire::group_to_pb(group, self.state().time()))
        }
        .await;
        self.state().outgoing(answer).map(Response::new)
    }

    async fn set_limits(
        &self,
        request: Request<pb::SetLimitsRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let by = caller_name(&request);
        let answer = self
            .control
            .set_limits(by.as_ref(), request.into_inner())
            .await
            .map(reload_to_pb)
            .map_err(Status::from);
        self.state().outgoing(answer).map(Response::new)
    }

    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let by = caller_name(&request);
        let answer = self
            .control
            .reload(by.as_ref())
            .await
            .map(reload_to_pb)
            .map_err(Status::from);
        self.state().outgoing(answer).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_written_into_the_file_keeping_its_comments() {
        let text = "# the fleet\n[pools.gemini]\nmax_leases_per_key = 1 # one call at a time\n\n[pools.gemini.models.\"models/gemini-2.5-flash\"]\nrequests_per_minute = 10 # free tier\nrequests_per_day = 250\n";
        let changed = with_limits(
            text,
            "gemini",
            "",
            "gemini-2.5-flash",
            &[
                ("requests_per_minute", Some(15)),
                ("tokens_per_minute", Some(250_000)),
                ("requests_per_day", Some(0)),
            ],
        )
        .unwrap();
        assert!(changed.starts_with("# the fleet\n"), "{changed}");
        assert!(changed.contains("# one call at a time"), "{changed}");
        let parsed: toml::Table = changed.parse().unwrap();
        let limits = &parsed["pools"]["gemini"]["models"]["models/gemini-2.5-flash"];
        assert_eq!(limits["requests_per_minute"].as_integer(), Some(15));
        assert_eq!(limits["tokens_per_minute"].as_integer(), Some(250_000));
        assert!(limits.get("requests_per_day").is_none(), "{changed}");
        let project = with_limits(
            text,
            "gemini",
            "p1",
            "gemini-2.5-flash",
            &[("requests_per_day", Some(5))],
        )
        .unwrap();
        let parsed: toml::Table = project.parse().unwrap();
        assert_eq!(
            parsed["pools"]["gemini"]["projects"]["p1"]["gemini-2.5-flash"]["requests_per_day"]
                .as_integer(),
            Some(5)
        );
    }

    #[test]
    fn a_key_leaves_the_keys_file_whatever_its_line_looks_like() {
        let text = "# keys\nAIzaFIRST id=a\nexport GEMINI_API_KEY_2=\"AIzaSECOND\"\nGEMINI_API_KEY_2_PROJECT=p\nAIzaTHIRD # note\n";
        assert_eq!(
            without_key(text, "AIzaFIRST"),
            "# keys\nexport GEMINI_API_KEY_2=\"AIzaSECOND\"\nGEMINI_API_KEY_2_PROJECT=p\nAIzaTHIRD # note\n"
        );
        assert!(!without_key(text, "AIzaSECOND").contains("AIzaSECOND"));
        assert!(!without_key(text, "AIzaTHIRD").contains("AIzaTHIRD"));
        assert_eq!(without_key(text, "AIzaNOPE"), text);
        // A key that is a prefix of another leaves the other.
        assert_eq!(without_key("AIzaA\nAIzaAB\n", "AIzaA"), "AIzaAB\n");
    }
}
