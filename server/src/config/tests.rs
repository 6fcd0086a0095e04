//! Loading and validating configuration: what is accepted, and what each mistake says.

use super::*;
use std::io::Write;

const SECRET: &str = "AIzaFAKE.config-test-key-000000000000SECRET";

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/keylease.example.toml")
}

fn no_env() -> HashMap<String, String> {
    HashMap::new()
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A config file in a fresh temporary directory, with optional extra files beside it.
struct Dir {
    path: PathBuf,
}

impl Dir {
    fn new(config: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("keylease-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        let dir = Self { path };
        dir.write("keylease.toml", config);
        dir
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::File::create(self.path.join(name))
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    fn load(&self, env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
        load(
            Some(&self.path.join("keylease.toml")),
            env,
            &Overrides::default(),
        )
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

const POOL: &str = r#"
[pools.gemini.models."gemini-2.5-flash"]
requests_per_minute = 10
"#;

fn error_of(result: Result<Settings, ConfigError>) -> String {
    match result {
        Err(error) => error.to_string(),
        Ok(settings) => panic!("expected an error, got {settings:?}"),
    }
}

#[test]
fn the_example_config_loads_with_its_demo_keys() {
    let settings = load(Some(&example_path()), &no_env(), &Overrides::default()).unwrap();
    assert_eq!(settings.listen.to_string(), "127.0.0.1:50051");
    assert_eq!(settings.keys.len(), 4);
    assert_eq!(settings.keys[3].max_leases, Some(4));
    assert_eq!(settings.engine.window_ms, 60_000);
    let pool = &settings.engine.pools["gemini"];
    assert_eq!(pool.models["gemini-2.5-pro"].requests_per_day, Some(50));
    assert!(
        pool.project_limits
            .contains_key(&("demo-paid".into(), "gemini-2.5-flash".into()))
    );
}

#[test]
fn environment_overrides_the_file() {
    let vars = env(&[
        ("KEYLEASE_SERVER__LISTEN", "127.0.0.1:6000"),
        ("KEYLEASE_LEASES__MAX_TTL", "20m"),
    ]);
    let settings = load(Some(&example_path()), &vars, &Overrides::default()).unwrap();
    assert_eq!(settings.listen.to_string(), "127.0.0.1:6000");
    assert_eq!(settings.engine.max_ttl_ms, 20 * 60_000);
}

#[test]
fn other_keylease_variables_are_not_configuration() {
    let vars = env(&[("KEYLEASE_LOG", "debug"), ("KEYLEASE_FLEET_ROLE", "batch")]);
    load(Some(&example_path()), &vars, &Overrides::default()).unwrap();
}

#[test]
fn command_line_overrides_win() {
    let overrides = Overrides {
        listen: Some("127.0.0.1:7000".into()),
        log_format: Some("json".into()),
        keys_file: None,
    };
    let settings = load(Some(&example_path()), &no_env(), &overrides).unwrap();
    assert_eq!(settings.listen.to_string(), "127.0.0.1:7000");
    assert_eq!(settings.log_format, LogFormat::Json);
}

#[test]
fn keys_come_from_the_environment_with_projects() {
    let dir = Dir::new(POOL);
    let vars = env(&[
        (
            "GEMINI_API_KEY_2",
            "AIzaFAKE.env-two-00000000000000000000000",
        ),
        (
            "GEMINI_API_KEY_1",
            "AIzaFAKE.env-one-00000000000000000000000",
        ),
        ("GEMINI_API_KEY_1_PROJECT", "shared"),
    ]);
    let settings = dir.load(&vars).unwrap();
    let projects: Vec<&str> = settings.keys.iter().map(|k| k.project.as_str()).collect();
    assert_eq!(projects[0], "shared");
    assert!(projects[1].starts_with("project-of-key-"));
    assert!(settings.keys.iter().all(|k| k.id.starts_with("key-")));
}

#[test]
fn key_entries_read_secrets_from_named_variables() {
    let dir = Dir::new(&format!(
        "{POOL}\n[[keys]]\nid = \"a\"\nproject = \"p\"\nsecret_env = \"MY_KEY\"\n"
    ));
    let settings = dir.load(&env(&[("MY_KEY", SECRET)])).unwrap();
    assert_eq!(settings.keys[0].secret.reveal(), SECRET);
    let missing = error_of(dir.load(&no_env()));
    assert!(
        missing.contains("keys[0]") && missing.contains("MY_KEY"),
        "{missing}"
    );
}

#[test]
fn a_duplicate_key_names_both_places_and_masks_the_secret() {
    let dir = Dir::new(&format!("{POOL}\n[key_sources]\nfile = \"keys.txt\"\n"));
    dir.write("keys.txt", &format!("# team keys\n{SECRET} project=a\n"));
    let error = error_of(dir.load(&env(&[("GEMINI_API_KEY_1", SECRET)])));
    assert!(
        error.contains("GEMINI_API_KEY_1") && error.contains("keys.txt:2"),
        "{error}"
    );
    assert!(!error.contains("SECRET"), "the secret leaked: {error}");
}

#[test]
fn keys_file_mistakes_name_the_line() {
    let cases = [
        (
            "AIzaFAKE.one-0000000000000000000000000000 colour=red\n",
            "keys.txt:1",
            "unknown annotation",
        ),
        (
            "\n\nAIzaFAKE.one-0000000000000000000000000000 project\n",
            "keys.txt:3",
            "name=value",
        ),
        (
            "AIzaFAKE.one-0000000000000000000000000000 max_leases=x\n",
            "keys.txt:1",
            "not a number",
        ),
        (
            "AIzaFAKE.one-000000000000000000000000000 id=a\nAIzaFAKE.two-000000000000000000000000000 id=a\n",
            "keys.txt:2",
            "duplicate key id",
        ),
    ];
    for (text, place, reason) in cases {
        let dir = Dir::new(&format!("{POOL}\n[key_sources]\nfile = \"keys.txt\"\n"));
        dir.write("keys.txt", text);
        let error = error_of(dir.load(&no_env()));
        assert!(error.contains(place) && error.contains(reason), "{error}");
    }
}

#[test]
fn an_unreadable_keys_file_is_named() {
    let dir = Dir::new(&format!("{POOL}\n[key_sources]\nfile = \"missing.txt\"\n"));
    let error = error_of(dir.load(&no_env()));
    assert!(
        error.contains("missing.txt") && error.contains("cannot read"),
        "{error}"
    );
}

#[test]
fn an_empty_secret_is_refused() {
    let dir = Dir::new(&format!("{POOL}\n[[keys]]\nsecret = \"  \"\n"));
    let error = error_of(dir.load(&no_env()));
    assert!(
        error.contains("keys[0]") && error.contains("empty"),
        "{error}"
    );
}

#[test]
fn no_keys_at_all_is_an_error() {
    let dir = Dir::new(POOL);
    assert!(error_of(dir.load(&no_env())).contains("no keys"));
}

#[test]
fn configuration_mistakes_name_the_field() {
    let key = format!("\n[[keys]]\nsecret = \"{SECRET}\"\n");
    let cases = [
        (
            format!("[leases]\ndefault_ttl = \"soon\"\n{POOL}{key}"),
            "default_ttl",
        ),
        (
            format!("[leases]\nmax_tll = \"1m\"\n{POOL}{key}"),
            "max_tll",
        ),
        (
            format!("[leases]\ndefault_ttl = \"20m\"\n{POOL}{key}"),
            "leases.default_ttl",
        ),
        (
            format!("[leases]\nmax_ttl = \"0s\"\n{POOL}{key}"),
            "leases.max_ttl",
        ),
        (
            format!("[server]\nlisten = \"nowhere\"\n{POOL}{key}"),
            "server.listen",
        ),
        (
            format!("[server]\nlog_format = \"xml\"\n{POOL}{key}"),
            "server.log_format",
        ),
        (
            format!("[quota]\ndaily_reset_time_zone = \"Mars/Olympus\"\n{POOL}{key}"),
            "daily_reset_time_zone",
        ),
        (
            format!("[pools.gemini.models.\"m\"]\nrequests_per_minute = 0\n{key}"),
            "requests_per_minute",
        ),
        (
            format!(
                "{POOL}\n[pools.gemini.projects.p.\"gemini-9\"]\nrequests_per_minute = 1\n{key}"
            ),
            "unknown model",
        ),
        (
            format!("[pools.gemini]\nmax_leases_per_key = 1\n{key}"),
            "no model",
        ),
        (key.clone(), "no pool"),
        (
            format!("{POOL}\n[[keys]]\nsecret = \"{SECRET}\"\npool = \"openai\"\n"),
            "unknown pool",
        ),
    ];
    for (text, expected) in cases {
        let error = error_of(Dir::new(&text).load(&no_env()));
        assert!(
            error.contains(expected),
            "expected {expected:?} in: {error}"
        );
        assert!(
            error.contains("keylease.toml") || expected == "unknown pool",
            "no file named in: {error}"
        );
    }
}

#[test]
fn an_unreadable_config_file_is_named() {
    let error = error_of(load(
        Some(Path::new("/nonexistent/keylease.toml")),
        &no_env(),
        &Overrides::default(),
    ));
    assert!(
        error.starts_with("/nonexistent/keylease.toml: cannot read"),
        "{error}"
    );
}

#[test]
fn settings_debug_never_shows_a_secret() {
    let dir = Dir::new(&format!("{POOL}\n[[keys]]\nsecret = \"{SECRET}\"\n"));
    let settings = dir.load(&no_env()).unwrap();
    assert!(!format!("{settings:?}").contains("SECRET"));
    let file: FileConfig = toml_like(&format!("[[keys]]\nsecret = \"{SECRET}\"\n"));
    assert!(!format!("{file:?}").contains("SECRET"));
}

fn toml_like(text: &str) -> FileConfig {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .unwrap()
        .try_deserialize()
        .unwrap()
}
