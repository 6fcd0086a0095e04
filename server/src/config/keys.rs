//! The keys: `[[keys]]` entries, a keys file, a command's output and `GEMINI_API_KEY*`
//! variables, collected into [`KeySpec`]s with every mistake named where it is, and never a
//! secret quoted.

use super::*;
use std::io::Read;
use std::process::{Command, Stdio};
use wait_timeout::ChildExt;

/// How long `key_sources.command` may run unless configured.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Most of a command's standard output read as keys (a keys file of ~100,000 keys).
const MAX_COMMAND_OUTPUT: u64 = 16 << 20;
/// Most of a command's standard error quoted (masked) when it fails: its end.
const STDERR_QUOTED: usize = 1024;

/// Gathers keys from every source, refusing duplicates with both places named.
pub(super) struct KeyCollector<'a> {
    id_salt: &'a str,
    keys: Vec<KeySpec>,
    /// Where each secret and each id came from.
    secret_origin: HashMap<ApiKey, String>,
    id_origin: HashMap<String, String>,
}

impl<'a> KeyCollector<'a> {
    pub(super) fn new(id_salt: &'a str) -> Self {
        Self {
            id_salt,
            keys: Vec::new(),
            secret_origin: HashMap::new(),
            id_origin: HashMap::new(),
        }
    }

    fn add(
        &mut self,
        origin: &str,
        secret: &str,
        id: Option<&str>,
        project: Option<&str>,
        pool: Option<&str>,
        max_leases: Option<u32>,
    ) -> Result<(), ConfigError> {
        let secret = secret.trim();
        if let Some(problem) = secret_problem(secret) {
            return Err(invalid(origin, problem));
        }
        let secret = ApiKey::new(secret);
        if let Some(first) = self.secret_origin.get(&secret) {
            return Err(invalid(
                origin,
                format!("duplicate key {} (first at {first})", secret.masked()),
            ));
        }
        let id = match id {
            Some(id) if id.trim().is_empty() => return Err(invalid(origin, "the id is empty")),
            Some(id) => id.trim().to_string(),
            None => crate::secret::derived_id(&secret, self.id_salt),
        };
        for (what, name) in [
            ("id", Some(id.as_str())),
            ("project", project),
            ("pool", pool),
        ] {
            if let Some(problem) = name.and_then(|name| name_problem(name.trim())) {
                return Err(invalid(origin, format!("the {what} {problem}")));
            }
        }
        if let Some(first) = self.id_origin.get(&id) {
            return Err(invalid(
                origin,
                format!("duplicate key id {id:?} (first at {first})"),
            ));
        }
        if max_leases == Some(0) {
            return Err(invalid(origin, "max_leases must be above zero"));
        }
        let project = match project {
            Some(p) if p.trim().is_empty() => return Err(invalid(origin, "the project is empty")),
            Some(p) => p.trim().to_string(),
            // Without a project the key is its own quota group.
            None => format!("project-of-{id}"),
        };
        self.secret_origin
            .insert(secret.clone(), origin.to_string());
        self.id_origin.insert(id.clone(), origin.to_string());
        self.keys.push(KeySpec {
            fingerprint: String::new(),
            id,
            pool: pool.unwrap_or(DEFAULT_POOL).to_string(),
            project,
            secret,
            max_leases,
        });
        Ok(())
    }

    pub(super) fn add_entry(
        &mut self,
        origin: &str,
        entry: &KeyEntry,
        env: &HashMap<String, String>,
    ) -> Result<(), ConfigError> {
        let secret = match (&entry.secret, &entry.secret_env) {
            (Some(secret), None) => secret.0.clone(),
            (None, Some(var)) => env.get(var).cloned().ok_or_else(|| {
                invalid(origin, format!("secret_env names {var}, which is not set"))
            })?,
            (Some(_), Some(_)) => {
                return Err(invalid(origin, "give secret or secret_env, not both"));
            }
            (None, None) => return Err(invalid(origin, "no secret (give secret or secret_env)")),
        };
        self.add(
            origin,
            &secret,
            entry.id.as_deref(),
            entry.project.as_deref(),
            entry.pool.as_deref(),
            entry.max_leases,
        )
    }

    /// One key per line: `SECRET [id=ID] [project=P] [pool=POOL] [max_leases=N]`, `#` comments;
    /// or `.env` lines, `[export] GEMINI_API_KEY[_<n>][_PROJECT]=VALUE`, read as the environment
    /// source reads those variables. Errors give the line and column, never the line's text.
    pub(super) fn add_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path)
            .map_err(|e| invalid(&name, format!("cannot read the keys file: {e}")))?;
        self.add_text(&name, &bytes)
    }

    /// The standard output of `argv` (run in `dir`, killed after `timeout`), read as a keys
    /// file. A failure says how it ended and what it wrote to standard error, masked: any
    /// word it printed on standard output, and anything shaped like a credential.
    pub(super) fn add_command(
        &mut self,
        argv: &[String],
        dir: &Path,
        timeout: Duration,
    ) -> Result<(), ConfigError> {
        const ORIGIN: &str = "key_sources.command";
        let output = run_command(argv, dir, timeout).map_err(|reason| invalid(ORIGIN, reason))?;
        self.add_text(&format!("{ORIGIN} (its output)"), &output)
    }

    /// `bytes` read as a keys file named `name` in errors.
    fn add_text(&mut self, name: &str, bytes: &[u8]) -> Result<(), ConfigError> {
        let name = name.to_string();
        let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
        let text = std::str::from_utf8(bytes).map_err(|e| {
            invalid(
                &name,
                format!("not UTF-8 text (at byte {})", e.valid_up_to()),
            )
        })?;
        let mut variables: HashMap<String, String> = HashMap::new();
        let mut variable_lines: HashMap<String, usize> = HashMap::new();
        for (number, line) in lines_any_ending(text).enumerate() {
            let origin = format!("{name}:{}", number + 1);
            let at_column = |word: &str| {
                let offset = word.as_ptr() as usize - line.as_ptr() as usize;
                format!("{origin}:{}", line[..offset].chars().count() + 1)
            };
            // A comment starts the line or follows white space: keys never hold either.
            let comment = line
                .char_indices()
                .find(|&(i, c)| c == '#' && (i == 0 || line[..i].ends_with(char::is_whitespace)));
            let line = comment.map_or(line, |(i, _)| &line[..i]);
            let mut words = line.split_whitespace().peekable();
            if words.peek() == Some(&"export") {
                words.next();
            }
            let Some(first) = words.next() else { continue };
            if let Some((variable, value)) = first.split_once('=')
                && ASSIGNMENT.is_match(first)
            {
                if !is_key_variable(variable) {
                    return Err(invalid(
                        at_column(first),
                        format!(
                            "a NAME=VALUE line whose name is not {GEMINI_KEY_VAR}, {GEMINI_KEY_VAR}_<n> or {GEMINI_KEY_VAR}_<n>_PROJECT (the line is not shown: it may hold a secret)"
                        ),
                    ));
                }
                let rest_start = value.as_ptr() as usize - line.as_ptr() as usize;
                let value = line[rest_start..].trim();
                let value = ['"', '\'']
                    .iter()
                    .find_map(|&q| value.strip_prefix(q).and_then(|v| v.strip_suffix(q)))
                    .unwrap_or(value);
                if let Some(first_line) = variable_lines.insert(variable.to_string(), number + 1) {
                    return Err(invalid(
                        at_column(first),
                        format!("{variable} is set twice (first on line {first_line})"),
                    ));
                }
                variables.insert(variable.to_string(), value.to_string());
                continue;
            }
            if let Some((annotation, _)) = first.split_once('=')
                && ANNOTATIONS.contains(&annotation)
            {
                return Err(invalid(
                    at_column(first),
                    "the key must come first on the line, before id=, project=, pool= and max_leases=",
                ));
            }
            let mut notes: HashMap<&str, &str> = HashMap::new();
            for word in words {
                let Some((annotation, value)) = word.split_once('=') else {
                    return Err(invalid(
                        at_column(word),
                        "expected name=value after the key, found a word without '=' (one key per line; the word is not shown)",
                    ));
                };
                if !ANNOTATIONS.contains(&annotation) {
                    return Err(invalid(
                        at_column(word),
                        "unknown annotation (id, project, pool, max_leases); the word is not shown",
                    ));
                }
                notes.insert(annotation, value);
            }
            let max_leases = notes
                .get("max_leases")
                .map(|v| {
                    v.parse::<u32>()
                        .map_err(|_| invalid(&origin, "max_leases is not a number"))
                })
                .transpose()?;
            self.add(
                &origin,
                first,
                notes.get("id").copied(),
                notes.get("project").copied(),
                notes.get("pool").copied(),
                max_leases,
            )?;
        }
        let origin_of = |variable: &str| {
            format!(
                "{name}:{} ({variable})",
                variable_lines.get(variable).copied().unwrap_or(0)
            )
        };
        self.add_variables(&variables, origin_of)
    }

    pub(super) fn add_environment(
        &mut self,
        env: &HashMap<String, String>,
    ) -> Result<(), ConfigError> {
        self.add_variables(env, |variable| variable.to_string())
    }

    /// The keys in `GEMINI_API_KEY` and `GEMINI_API_KEY_<n>` of `env`, each in the project of
    /// its `…_PROJECT` variable; `origin_of` says where a variable was set.
    fn add_variables(
        &mut self,
        env: &HashMap<String, String>,
        origin_of: impl Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let mut numbered: Vec<(u32, &String)> = env
            .iter()
            .filter_map(|(name, value)| {
                let n = name
                    .strip_prefix(GEMINI_KEY_VAR)?
                    .strip_prefix('_')?
                    .parse()
                    .ok()?;
                Some((n, value))
            })
            .collect();
        numbered.sort();
        if let Some(value) = env.get(GEMINI_KEY_VAR) {
            self.add(
                &origin_of(GEMINI_KEY_VAR),
                value,
                None,
                env.get(&format!("{GEMINI_KEY_VAR}_PROJECT"))
                    .map(String::as_str),
                None,
                None,
            )?;
        }
        for (n, value) in numbered {
            let var = format!("{GEMINI_KEY_VAR}_{n}");
            let project = env.get(&format!("{var}_PROJECT")).map(String::as_str);
            self.add(&origin_of(&var), value, None, project, None, None)?;
        }
        Ok(())
    }

    /// The keys, unless an id or project holds a secret: both are shown to every operator.
    pub(super) fn finish(self) -> Result<Vec<KeySpec>, ConfigError> {
        let redactor = Redactor::new(self.keys.iter().map(|k| &k.secret));
        for key in &self.keys {
            for (what, text) in [("id", &key.id), ("project", &key.project)] {
                if redactor.finds_secret(text) {
                    let origin = &self.secret_origin[&key.secret];
                    return Err(invalid(
                        origin,
                        format!(
                            "the {what} holds a key or looks like one; ids and projects are shown to every operator"
                        ),
                    ));
                }
            }
        }
        Ok(self.keys)
    }
}

/// Runs `argv` in `dir` and returns its standard output, or why it gave none: not run, killed
/// after `timeout`, or exited other than with 0 (with the end of its standard error, masked).
fn run_command(argv: &[String], dir: &Path, timeout: Duration) -> Result<Vec<u8>, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err(
            "is empty: give the program and its arguments, such as [\"sh\", \"-c\", \"vault kv get -field=keys secret/gemini\"]"
                .into(),
        );
    };
    let shown = Redactor::new([]).redact(program).into_owned();
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown:?}: {e}"))?;
    // Read while it runs, so that a full pipe never stalls it.
    let drain = |pipe: Option<Box<dyn Read + Send>>, limit: u64| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(pipe) = pipe {
                let mut pipe = pipe.take(limit + 1);
                let _ = pipe.read_to_end(&mut bytes);
                // Whatever is past the limit is read and dropped, for the program to finish.
                let _ = std::io::copy(&mut pipe.into_inner(), &mut std::io::sink());
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        MAX_COMMAND_OUTPUT,
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        MAX_COMMAND_OUTPUT,
    );
    let status = match child.wait_timeout(timeout) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{shown:?} gave no answer within {}: killed (key_sources.command_timeout)",
                humantime::format_duration(timeout)
            ));
        }
        Err(e) => return Err(format!("waiting for {shown:?} failed: {e}")),
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if status.success() && stdout.len() as u64 > MAX_COMMAND_OUTPUT {
        return Err(format!(
            "{shown:?} wrote more than {} MiB of keys",
            MAX_COMMAND_OUTPUT >> 20
        ));
    }
    if status.success() {
        return Ok(stdout);
    }
    // Whatever it printed may be a key, and so may anything in its errors.
    let printed: Vec<ApiKey> = String::from_utf8_lossy(&stdout)
        .split_whitespace()
        .flat_map(|word| {
            [
                word.to_string(),
                word.split_once('=')
                    .map_or(String::new(), |(_, v)| v.to_string()),
            ]
        })
        .filter(|word| word.len() >= 8)
        .map(ApiKey::new)
        .collect();
    let errors = String::from_utf8_lossy(&stderr);
    let errors = errors.trim();
    let tail_start = errors
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| errors.len() - i <= STDERR_QUOTED)
        .unwrap_or(errors.len());
    let masked = Redactor::new(printed.iter())
        .redact(&errors[tail_start..])
        .into_owned();
    let how = match status.code() {
        Some(code) => format!("exited with {code}"),
        None => "was killed by a signal".to_string(),
    };
    Err(if masked.is_empty() {
        format!("{shown:?} {how}, writing nothing to standard error")
    } else {
        format!("{shown:?} {how}; its standard error (masked): {masked}")
    })
}

/// What a keys-file line may say after its key, as `name=value`.
pub(super) const ANNOTATIONS: [&str; 4] = ["id", "project", "pool", "max_leases"];

/// What is wrong with `secret` (trimmed) as a key's secret, if anything.
pub fn secret_problem(secret: &str) -> Option<&'static str> {
    if secret.is_empty() {
        Some("the key is empty")
    } else if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("the key contains white space")
    } else if ASSIGNMENT.is_match(secret) {
        Some("the key starts with a variable name and '=': give the key alone")
    } else {
        None
    }
}

/// What is wrong with `name` as a key id, project or pool, if anything (never quoting it).
pub fn name_problem(name: &str) -> Option<String> {
    (name.len() > keylease::MAX_NAME_BYTES).then(|| {
        format!(
            "is {} bytes, above the maximum of {}",
            name.len(),
            keylease::MAX_NAME_BYTES
        )
    })
}

/// `NAME=` at the start of a word: an environment assignment, not a key.
static ASSIGNMENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Z_][A-Z0-9_]*=").expect("a valid pattern"));

/// Whether `name` is a variable the environment source reads: `GEMINI_API_KEY`,
/// `GEMINI_API_KEY_<n>`, and the same with `_PROJECT`.
pub(super) fn is_key_variable(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(GEMINI_KEY_VAR) else {
        return false;
    };
    let rest = rest.strip_suffix("_PROJECT").unwrap_or(rest);
    rest.is_empty()
        || rest
            .strip_prefix('_')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Lines of a text file, each ended by LF, CRLF or a lone CR.
pub(super) fn lines_any_ending(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n')
        .flat_map(|line| line.strip_suffix('\r').unwrap_or(line).split('\r'))
}

/// Every key from the config's entries, the keys file (`--keys-file` first) and the
/// environment, each in a configured pool; with the keys file's path.
pub(super) fn keys(
    file: &FileConfig,
    origin: &str,
    base_dir: &Path,
    env: &HashMap<String, String>,
    overrides: &Overrides,
    pools: &BTreeMap<String, PoolConfig>,
    at: &impl Fn(&str) -> String,
) -> Result<(Vec<KeySpec>, Option<PathBuf>), ConfigError> {
    let mut keys = KeyCollector::new(&file.key_sources.id_salt);
    for (index, entry) in file.keys.iter().enumerate() {
        keys.add_entry(&at(&format!("keys[{index}]")), entry, env)?;
    }
    let keys_file = overrides
        .keys_file
        .clone()
        .or_else(|| file.key_sources.file.as_ref().map(|f| base_dir.join(f)));
    if let Some(path) = &keys_file {
        keys.add_file(path)?;
    }
    if let Some(argv) = &file.key_sources.command {
        keys.add_command(argv, base_dir, file.key_sources.command_timeout)?;
    }
    if file.key_sources.environment {
        keys.add_environment(env)?;
    }
    let keys = keys.finish()?;
    if keys.is_empty() {
        return Err(ConfigError::NoKeys {
            location: origin.to_string(),
        });
    }
    for key in &keys {
        if !pools.contains_key(&key.pool) {
            return Err(invalid(
                format!("key {}", key.id),
                format!("unknown pool {:?}", key.pool),
            ));
        }
    }

    Ok((keys, keys_file))
}
