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
fn without_pools_any_model_is_served_with_every_limit_auto() {
    let settings = load(
        None,
        &env(&[("GEMINI_API_KEY_1", SECRET)]),
        &Overrides::default(),
    )
    .unwrap();
    let pool = &settings.engine.pools["gemini"];
    let other = pool.other_models.expect("any model is served");
    assert_eq!(other.auto, [true; 4]);
    assert_eq!(other.requests_per_minute, Some(10_000));
    assert_eq!(other.tokens_per_day, Some(1_000_000_000));
    assert!(
        settings
            .notices
            .iter()
            .any(|n| n.contains("every limit auto")),
        "{:?}",
        settings.notices
    );
    // The proxy may list models through any model then.
    let dir = Dir::new(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nlisting_model = \"gemini-2.5-flash\"\n\n[[keys]]\nsecret = \"{SECRET}\"\n"
    ));
    let proxy = dir.load(&no_env()).unwrap().proxy.unwrap();
    assert_eq!(proxy.listing_model.as_deref(), Some("gemini-2.5-flash"));
}

#[test]
fn auto_limits_start_at_the_configured_ceiling() {
    let dir = Dir::new(&format!(
        "[quota]\nrelearn_after = 3\n[quota.auto_ceiling]\nrequests_per_minute = 500\n\n[pools.gemini.models.m]\nrequests_per_minute = \"auto\"\nrequests_per_day = 250\ntokens_per_day = \"auto\"\n\n[[keys]]\nsecret = \"{SECRET}\"\n"
    ));
    let settings = dir.load(&no_env()).unwrap();
    let limits = settings.engine.pools["gemini"].models["m"];
    assert_eq!(limits.requests_per_minute, Some(500));
    assert_eq!(limits.requests_per_day, Some(250));
    assert_eq!(limits.auto, [true, false, false, true]);
    assert_eq!(limits.tokens_per_day, Some(1_000_000_000));
    assert_eq!(settings.engine.relearn_after_windows, 3);
    for (text, field) in [
        ("requests_per_minute = \"lots\"", "requests_per_minute"),
        ("requests_per_minute = -4", "requests_per_minute"),
        ("tokens_per_day = \"lots\"", "tokens_per_day"),
    ] {
        let dir = Dir::new(&format!(
            "[pools.gemini.models.m]\n{text}\n[[keys]]\nsecret = \"{SECRET}\"\n"
        ));
        let error = error_of(dir.load(&no_env()));
        assert!(
            error.contains(field) && error.contains("or auto"),
            "{error}"
        );
    }
    let dir = Dir::new(&format!(
        "[quota]\nrelearn_after = 0\n{POOL}[[keys]]\nsecret = \"{SECRET}\"\n"
    ));
    assert!(error_of(dir.load(&no_env())).contains("quota.relearn_after"));
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
        ..Default::default()
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
            format!("[leases]\nmax_wait = \"1000000y\"\n{POOL}{key}"),
            "leases.max_wait",
        ),
        (
            format!("[server]\nidle_timeout = \"500y\"\n{POOL}{key}"),
            "server.idle_timeout",
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

/// Secrets to plant in mistakes: one of the real key shape, made at run time so that no such
/// literal is in the tree, and one of no particular shape.
fn planted_secrets() -> [String; 2] {
    [
        format!("AIza{}", "Q7_-x".repeat(7)),
        "tok-Zq9.arbitrary/Secret+value".to_string(),
    ]
}

/// The error of loading `config` with `keys` as the keys file and `vars` as the environment,
/// checked to name `place` and to hold no part of `secret`.
fn refused_without_secret(
    config: &str,
    keys: Option<&[u8]>,
    vars: &HashMap<String, String>,
    secret: &str,
    place: &str,
) -> String {
    let dir = Dir::new(config);
    if let Some(keys) = keys {
        std::fs::write(dir.path.join("keys.txt"), keys).unwrap();
    }
    let error = error_of(dir.load(vars));
    assert!(error.contains(place), "{place:?} not in: {error}");
    let middle = &secret[4..secret.len() - 4];
    assert!(!error.contains(middle), "the secret leaked: {error}");
    error
}

#[test]
fn toml_errors_on_a_secret_line_give_line_and_column_not_the_line() {
    for secret in planted_secrets() {
        for (line, expected) in [
            (format!("secret = \"{secret}"), "keylease.toml:6:"),
            (format!("secret = {secret}"), "keylease.toml:6:10"),
            (secret.clone(), "keylease.toml:6:"),
        ] {
            let config = format!("{POOL}\n[[keys]]\n{line}\n");
            let error = refused_without_secret(&config, None, &no_env(), &secret, expected);
            assert!(error.contains("not valid TOML"), "{error}");
        }
    }
}

#[test]
fn a_secret_in_the_wrong_field_is_not_quoted() {
    for secret in planted_secrets() {
        let config = format!("{POOL}\n[[keys]]\nsecret = \"x-key\"\nmax_leases = \"{secret}\"\n");
        let error = refused_without_secret(&config, None, &no_env(), &secret, "max_leases");
        assert!(error.contains("expected an integer"), "{error}");
        let config = format!("{POOL}\n[leases]\n\"{secret}\" = 1\n[[keys]]\nsecret = \"x-key\"\n");
        refused_without_secret(&config, None, &no_env(), &secret, "unknown field");
    }
}

#[test]
fn keys_file_mistakes_never_quote_the_line() {
    let config = format!("{POOL}\n[key_sources]\nfile = \"keys.txt\"\n");
    for secret in planted_secrets() {
        let cases: [(String, &str, &str); 4] = [
            (
                format!("id=x {secret}\n"),
                "keys.txt:1:1",
                "must come first",
            ),
            (
                format!("{secret} {secret}2\n"),
                "keys.txt:1:",
                "without '='",
            ),
            (
                format!("{secret} colour={secret}\n"),
                "keys.txt:1:",
                "unknown annotation",
            ),
            (
                format!("OPENAI_API_KEY={secret}\n"),
                "keys.txt:1:1",
                "NAME=VALUE",
            ),
        ];
        for (text, place, reason) in cases {
            let error =
                refused_without_secret(&config, Some(text.as_bytes()), &no_env(), &secret, place);
            assert!(error.contains(reason), "{error}");
        }
    }
}

#[test]
fn a_malformed_token_variable_is_not_quoted() {
    for secret in planted_secrets() {
        let vars = env(&[("KEYLEASE_SERVER__AUTH_TOKENS", &format!("{secret} x,"))]);
        let config = format!("{POOL}\n[[keys]]\nsecret = \"x-key\"\n");
        refused_without_secret(&config, None, &vars, &secret, "server.auth_tokens[0]");
    }
}

#[test]
fn auth_tokens_from_the_environment_are_a_comma_separated_list() {
    let vars = env(&[("KEYLEASE_SERVER__AUTH_TOKENS", "first-token,second-token")]);
    let settings = Dir::new(&format!("{POOL}\n[[keys]]\nsecret = \"x-key\"\n"))
        .load(&vars)
        .unwrap();
    let tokens: Vec<(&str, Role, &Credential)> = settings
        .access
        .callers
        .iter()
        .map(|c| (c.name.as_str(), c.role, &c.credential))
        .collect();
    let clear = |t: &str| Credential::Clear(ApiKey::new(t));
    assert_eq!(
        tokens,
        [
            ("auth_tokens-0", Role::Admin, &clear("first-token")),
            ("auth_tokens-1", Role::Admin, &clear("second-token"))
        ]
    );
    assert!(settings.access.required);
    assert!(
        settings.notices[0].contains("server.auth_tokens is deprecated"),
        "{:?}",
        settings.notices
    );
}

const WORKER_SHA256: &str = "2f5c4bd6bb3a9bb1d87cc5d4c1f3a86b7af2a8d1c6b0b18d4a0ae0f9e3c3e101";

#[test]
fn callers_are_configured_by_name_role_and_the_hash_of_their_token_or_a_certificate() {
    let dir = Dir::new("");
    let pki = keylease_test_kits::pki::make(&dir.path.join("pki"), &[]);
    let config = format!(
        "[server]\nlisten = \"0.0.0.0:50051\"\n\
         [[server.tokens]]\nname = \"batch\"\nrole = \"worker\"\nsha256 = \"{}\"\n\
         [[server.tokens]]\nname = \"ops-laptop\"\nrole = \"admin\"\ncertificate = \"laptop.example.com\"\n\
         [server.tls]\ncertificate = {:?}\nprivate_key = {:?}\nclient_ca = {:?}\n\
         {POOL}\n[[keys]]\nsecret = \"x-key\"\n",
        WORKER_SHA256.to_uppercase(),
        pki.server_certificate,
        pki.server_key,
        pki.ca,
    );
    dir.write("keylease.toml", &config);
    let settings = dir.load(&no_env()).unwrap();
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&WORKER_SHA256[2 * i..2 * i + 2], 16).unwrap();
    }
    assert_eq!(
        settings.access,
        Access {
            required: true,
            callers: vec![
                TokenSpec {
                    name: "batch".into(),
                    role: Role::Worker,
                    credential: Credential::Sha256(hash),
                },
                TokenSpec {
                    name: "ops-laptop".into(),
                    role: Role::Admin,
                    credential: Credential::Certificate("laptop.example.com".into()),
                },
            ],
        }
    );
    assert!(settings.notices.is_empty(), "{:?}", settings.notices);
}

#[test]
fn token_mistakes_name_the_entry_and_never_quote_a_token() {
    let token = |fields: &str| {
        format!("[[server.tokens]]\n{fields}\n{POOL}\n[[keys]]\nsecret = \"x-key\"\n")
    };
    let good = format!("sha256 = \"{WORKER_SHA256}\"");
    let cases = [
        (
            token(&format!(
                "name = \"a\"\nrole = \"worker\"\ntoken = \"{SECRET}\""
            )),
            "server.tokens[0].token",
            "never configured in clear",
        ),
        (
            token(&format!(
                "name = \"a\"\nrole = \"worker\"\nsha256 = \"{SECRET}\""
            )),
            "server.tokens[0].sha256",
            "not a SHA-256",
        ),
        (
            token(&format!("name = \"a\"\nrole = \"root\"\n{good}")),
            "server.tokens[0].role",
            "not a role",
        ),
        (
            token(&format!("role = \"worker\"\n{good}")),
            "server.tokens[0]",
            "no name",
        ),
        (
            token(&format!("name = \"a b\"\nrole = \"worker\"\n{good}")),
            "server.tokens[0].name",
            "letters, digits",
        ),
        (
            token(&format!("name = \"a\"\n{good}")),
            "server.tokens[0]",
            "no role",
        ),
        (
            token("name = \"a\"\nrole = \"worker\""),
            "server.tokens[0]",
            "no credential",
        ),
        (
            token(&format!(
                "name = \"a\"\nrole = \"worker\"\n{good}\ncertificate = \"x\""
            )),
            "server.tokens[0]",
            "not both",
        ),
        (
            token(&format!(
                "name = \"a\"\nrole = \"worker\"\n{good}\n[[server.tokens]]\nname = \"a\"\nrole = \"viewer\"\ncertificate = \"x\""
            )),
            "server.tokens[1].name",
            "already the name",
        ),
        (
            token(&format!(
                "name = \"a\"\nrole = \"worker\"\n{good}\n[[server.tokens]]\nname = \"b\"\nrole = \"viewer\"\n{good}"
            )),
            "server.tokens[1].sha256",
            "the same token as \"a\"'s",
        ),
        (
            format!(
                "[server]\nauth = \"off\"\n{}",
                token(&format!("name = \"a\"\nrole = \"worker\"\n{good}"))
            ),
            "server.auth",
            "callers are configured",
        ),
        (
            format!("[server]\nauth = \"maybe\"\n{POOL}\n[[keys]]\nsecret = \"x-key\"\n"),
            "server.auth",
            "not a setting",
        ),
    ];
    for (text, place, reason) in cases {
        let error = error_of(Dir::new(&text).load(&no_env()));
        assert!(error.contains(&format!("{place}: ")), "{place} in: {error}");
        assert!(error.contains(reason), "{reason} in: {error}");
        assert!(!error.contains(SECRET), "{error}");
    }
}

#[test]
fn without_tokens_the_server_runs_open_only_on_loopback_or_when_told_to() {
    let keys = format!("{POOL}\n[[keys]]\nsecret = \"x-key\"\n");
    let loopback = Dir::new(&keys).load(&no_env()).unwrap();
    assert!(!loopback.access.required);
    assert!(
        loopback.notices[0].contains("no tokens are configured"),
        "{:?}",
        loopback.notices
    );
    for listen in ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051"] {
        let open = format!("[server]\nlisten = \"{listen}\"\n{keys}");
        let error = error_of(Dir::new(&open).load(&no_env()));
        assert!(error.contains("server.tokens: none configured"), "{error}");
        let told = format!("[server]\nlisten = \"{listen}\"\nauth = \"off\"\n{keys}");
        let settings = Dir::new(&told).load(&no_env()).unwrap();
        assert!(!settings.access.required);
        assert!(
            settings.notices[0].contains("server.auth is \"off\""),
            "{:?}",
            settings.notices
        );
    }
}

#[test]
fn a_keys_file_may_be_a_dotenv_file_with_a_byte_order_mark_and_any_line_ends() {
    let config = format!("{POOL}\n[key_sources]\nfile = \"keys.txt\"\n");
    let [shaped, arbitrary] = planted_secrets();
    let text = format!(
        "\u{feff}# from .env\r\nexport GEMINI_API_KEY_1=\"{shaped}\"\rGEMINI_API_KEY_1_PROJECT=team one\nGEMINI_API_KEY_2='{arbitrary}'\n"
    );
    let dir = Dir::new(&config);
    dir.write("keys.txt", &text);
    let settings = dir.load(&no_env()).unwrap();
    let keys: Vec<(&str, &str)> = settings
        .keys
        .iter()
        .map(|k| (k.secret.reveal(), k.project.as_str()))
        .collect();
    assert_eq!(keys[0], (shaped.as_str(), "team one"));
    assert_eq!(keys[1].0, arbitrary);
    assert_eq!(keys.len(), 2);
    // A plain keys file with a byte order mark and CR-only line ends: the mark is no part of
    // key 1, and the lines are two keys.
    dir.write(
        "keys.txt",
        &format!("\u{feff}{shaped}\r{arbitrary} project=p\r"),
    );
    let settings = dir.load(&no_env()).unwrap();
    assert_eq!(settings.keys[0].secret.reveal(), shaped);
    assert_eq!(settings.keys[1].project, "p");
}

#[test]
fn a_variable_name_is_never_kept_in_a_secret() {
    let [shaped, _] = planted_secrets();
    let config = format!("{POOL}\n[[keys]]\nsecret = \"GEMINI_API_KEY={shaped}\"\n");
    let error = refused_without_secret(&config, None, &no_env(), &shaped, "keys[0]");
    assert!(error.contains("variable name"), "{error}");
}

#[test]
fn an_id_or_project_holding_a_key_is_refused() {
    for secret in planted_secrets() {
        let config = format!(
            "{POOL}\n[[keys]]\nid = \"{secret}\"\nsecret = \"{secret}\"\n[[keys]]\nsecret = \"other-key\"\nproject = \"p-{secret}\"\n"
        );
        let error = refused_without_secret(&config, None, &no_env(), &secret, "keys[0]");
        assert!(error.contains("the id holds a key"), "{error}");
    }
}

#[test]
fn a_redis_store_reads_replication_and_masks_its_url_and_token() {
    let key = format!("\n[[keys]]\nsecret = \"{SECRET}\"\n");
    let token = "fleet-token-SECRET-0123456789";
    let dir = Dir::new(&format!(
        "[state]\nstore = \"redis://:PASSWORD@10.0.0.5:6379/2\"\n[replication]\ntoken = \"{token}\"\nadvertise = \"keylease-1.internal:50051\"\nleader_ttl = \"3s\"\n{POOL}{key}"
    ));
    let settings = dir.load(&no_env()).unwrap();
    let StateLocation::Redis(replication) = &settings.state else {
        panic!("not a Redis store: {:?}", settings.state);
    };
    assert_eq!(replication.advertise, "keylease-1.internal:50051");
    assert_eq!(replication.namespace, "keylease");
    assert_eq!(replication.leader_ttl, Duration::from_secs(3));
    assert_eq!(replication.dir, dir.path.join(DEFAULT_STATE_DIR));
    let shown = format!("{settings:?}");
    assert!(
        !shown.contains("PASSWORD") && !shown.contains("SECRET"),
        "{shown}"
    );
    // Both are masked in free text too.
    let redactor = Redactor::new(settings.secrets());
    let text = format!("url redis://:PASSWORD@10.0.0.5:6379/2 token {token}");
    let masked = redactor.redact(&text);
    assert!(
        !masked.contains("PASSWORD") && !masked.contains(token),
        "{masked}"
    );
}

#[test]
fn replication_mistakes_name_the_field_and_never_quote_the_url() {
    let key = format!("\n[[keys]]\nsecret = \"{SECRET}\"\n");
    let token = "[replication]\ntoken = \"fleet-token-0123456789\"\n";
    let cases = [
        (
            format!("[state]\nstore = \"postgres://u:PASSWORD@h/db\"\n{token}{POOL}{key}"),
            "state.store: not a Redis URL",
        ),
        (
            format!("[state]\nstore = \"redis://:PASSWORD@h:notaport/0\"\n{token}{POOL}{key}"),
            "state.store: not a Redis URL",
        ),
        (
            format!("[state]\nstore = \"redis://h:6379/0\"\n{POOL}{key}"),
            "replication.token: required",
        ),
        (
            format!(
                "[state]\nstore = \"redis://h:6379/0\"\n[replication]\ntoken = \"short\"\n{POOL}{key}"
            ),
            "replication.token: must be at least 16",
        ),
        (
            format!(
                "[server]\nlisten = \"0.0.0.0:50051\"\nauth = \"off\"\n[state]\nstore = \"redis://h:6379/0\"\n{token}{POOL}{key}"
            ),
            "replication.advertise: required",
        ),
        (
            format!(
                "[state]\nstore = \"redis://h:6379/0\"\n{token}advertise = \"nowhere\"\n{POOL}{key}"
            ),
            "replication.advertise: \"nowhere\" is not HOST:PORT",
        ),
        (
            format!(
                "[state]\nstore = \"redis://h:6379/0\"\n{token}leader_ttl = \"10ms\"\n{POOL}{key}"
            ),
            "replication.leader_ttl",
        ),
        (
            format!(
                "[state]\nstore = \"redis://h:6379/0\"\n{token}namespace = \"a b\"\n{POOL}{key}"
            ),
            "replication.namespace",
        ),
        (
            format!("[state]\nstore = \"redis://h:6379/0\"\nephemeral = true\n{token}{POOL}{key}"),
            "cannot be ephemeral",
        ),
    ];
    for (text, expected) in cases {
        let error = error_of(Dir::new(&text).load(&no_env()));
        assert!(
            error.contains(expected),
            "expected {expected:?} in: {error}"
        );
        assert!(!error.contains("PASSWORD"), "{error}");
    }
}

#[test]
fn the_store_and_its_token_come_from_the_command_line_and_the_environment() {
    let dir = Dir::new(&format!("{POOL}\n[[keys]]\nsecret = \"{SECRET}\"\n"));
    let overrides = Overrides {
        store: Some("redis://127.0.0.1:6390/0".into()),
        ..Overrides::default()
    };
    let settings = load(
        Some(&dir.path.join("keylease.toml")),
        &env(&[("KEYLEASE_REPLICATION__TOKEN", "fleet-token-0123456789")]),
        &overrides,
    )
    .unwrap();
    assert!(matches!(settings.state, StateLocation::Redis(_)));
}

#[test]
fn tls_mistakes_name_the_file_and_never_quote_a_key() {
    let dir = Dir::new("");
    let pki = keylease_test_kits::pki::make(&dir.path.join("pki"), &["client"]);
    let key_text = std::fs::read_to_string(&pki.server_key).unwrap();
    dir.write("garbage.pem", &format!("{SECRET}\n"));
    let keys = format!("{POOL}\n[[keys]]\nsecret = \"x-key\"\n");
    let section = |certificate: &Path, key: &Path, rest: &str| {
        format!(
            "[server.tls]\ncertificate = {certificate:?}\nprivate_key = {key:?}\n{rest}\n{keys}"
        )
    };
    let other_key = &pki.clients[0].1;
    let garbage = dir.path.join("garbage.pem");
    let cases = [
        (
            section(&pki.server_certificate, Path::new("missing.key"), ""),
            "missing.key",
            "no PEM private key",
        ),
        (
            section(&garbage, &pki.server_key, ""),
            "garbage.pem",
            "no certificate in it",
        ),
        (
            section(&pki.server_certificate, &garbage, ""),
            "garbage.pem",
            "no PEM private key",
        ),
        (
            section(&pki.server_certificate, other_key, ""),
            "client.key",
            "does not go with the certificate",
        ),
        (
            section(
                &pki.server_certificate,
                &pki.server_key,
                "client_certificates = \"required\"",
            ),
            "server.tls.client_certificates",
            "needs client_ca",
        ),
        (
            format!(
                "[[server.tokens]]\nname = \"laptop\"\nrole = \"admin\"\ncertificate = \"laptop\"\n{}",
                section(&pki.server_certificate, &pki.server_key, "")
            ),
            "server.tokens[0].certificate",
            "need mutual TLS",
        ),
        (
            format!("[server.tls]\ncertificate = \"a.pem\"\n{keys}"),
            "server.tls",
            "needs both",
        ),
    ];
    for (text, place, reason) in cases {
        dir.write("keylease.toml", &text);
        let error = error_of(dir.load(&no_env()));
        assert!(error.contains(place), "{place} in: {error}");
        assert!(error.contains(reason), "{reason} in: {error}");
        assert!(!error.contains(SECRET), "{error}");
        for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!error.contains(line), "{error}");
        }
    }
    dir.write(
        "keylease.toml",
        &section(
            &pki.server_certificate,
            &pki.server_key,
            &format!(
                "client_ca = {:?}\nclient_certificates = \"required\"",
                pki.ca
            ),
        ),
    );
    let settings = dir.load(&no_env()).unwrap();
    let tls = settings.tls.unwrap();
    assert!(tls.client_certificate_required);
    assert_eq!(tls.client_ca.as_deref(), Some(pki.ca.as_path()));
}

#[test]
fn the_proxy_is_off_unless_listen_is_set_and_takes_its_defaults() {
    let keys = format!("{POOL}\n[[keys]]\nsecret = \"x-key\"\n");
    assert_eq!(Dir::new(&keys).load(&no_env()).unwrap().proxy, None);
    let on = format!("[proxy]\nlisten = \"127.0.0.1:8080\"\n{keys}");
    let proxy = Dir::new(&on).load(&no_env()).unwrap().proxy.unwrap();
    assert_eq!(proxy.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(proxy.upstream, "https://generativelanguage.googleapis.com");
    assert_eq!(proxy.wait, Duration::from_secs(60));
    assert_eq!(proxy.listing_model.as_deref(), Some("gemini-2.5-flash"));
    let example = load(Some(&example_path()), &no_env(), &Overrides::default()).unwrap();
    assert!(
        example.proxy.is_some(),
        "the README's run command serves the proxy too"
    );
}

#[test]
fn proxy_mistakes_name_the_field_and_never_quote_the_upstream() {
    let keys = format!("{POOL}\n[[keys]]\nsecret = \"x-key\"\n");
    let cases = [
        (
            "listen = \"here\"",
            "proxy.listen: \"here\" is not an address:port",
        ),
        (
            "listen = \"127.0.0.1:50051\"",
            "proxy.listen: is the address of server.listen",
        ),
        (
            "listen = \"0.0.0.0:8080\"",
            "proxy.listen: 0.0.0.0:8080 is not a loopback address and no tokens are configured",
        ),
        (
            "listen = \"127.0.0.1:8080\"\nupstream = \"https://example.invalid/?key=AIzaSECRETSECRET\"",
            "proxy.upstream: holds credentials, a query or a fragment",
        ),
        (
            "listen = \"127.0.0.1:8080\"\nupstream = \"ftp://AIzaSECRETSECRET\"",
            "proxy.upstream: give an http:// or https:// URL",
        ),
        (
            "listen = \"127.0.0.1:8080\"\nwait = \"0s\"",
            "proxy.wait: must be between",
        ),
        (
            "listen = \"127.0.0.1:8080\"\nmax_body = 10",
            "proxy.max_body: must be between",
        ),
        (
            "listen = \"127.0.0.1:8080\"\nlisting_model = \"gemini-9\"",
            "proxy.listing_model: \"gemini-9\" is not a model of any pool",
        ),
        (
            "listen = \"127.0.0.1:8080\"\nport = 1",
            "unknown field `port`",
        ),
    ];
    for (section, expected) in cases {
        let error = error_of(Dir::new(&format!("[proxy]\n{section}\n{keys}")).load(&no_env()));
        assert!(error.contains(expected), "{section}: {error}");
        assert!(!error.contains("AIzaSECRETSECRET"), "{error}");
    }
    let told = format!("[server]\nauth = \"off\"\n[proxy]\nlisten = \"0.0.0.0:8080\"\n{keys}");
    assert!(Dir::new(&told).load(&no_env()).unwrap().proxy.is_some());
}

/// `key_sources.command` running `script` (a shell script beside the config) with `timeout`.
fn command_config(timeout: &str) -> String {
    format!(
        "{POOL}\n[key_sources]\nenvironment = false\ncommand = [\"sh\", \"keys.sh\"]\ncommand_timeout = \"{timeout}\"\n"
    )
}

#[test]
fn a_command_prints_the_keys_as_a_keys_file() {
    let [shaped, arbitrary] = planted_secrets();
    let dir = Dir::new(&command_config("10s"));
    dir.write(
        "keys.sh",
        &format!("echo '# from the vault'\necho '{shaped} id=v1 project=p1'\necho 'GEMINI_API_KEY_2={arbitrary}'\n"),
    );
    let settings = dir.load(&no_env()).unwrap();
    let keys: Vec<(&str, &str)> = settings
        .keys
        .iter()
        .map(|k| (k.id.as_str(), k.secret.reveal()))
        .collect();
    assert_eq!(keys[0], ("v1", shaped.as_str()));
    assert_eq!(keys[1].1, arbitrary);
}

#[test]
fn a_failing_hanging_or_garbled_command_is_named_and_never_shows_a_secret() {
    let [shaped, arbitrary] = planted_secrets();
    let dir = Dir::new(&command_config("1s"));
    // Fails, printing a key on standard output and both on standard error.
    dir.write(
        "keys.sh",
        &format!("echo '{arbitrary}'\necho 'vault: permission denied reading {shaped} and {arbitrary}' >&2\nexit 3\n"),
    );
    let error = error_of(dir.load(&no_env()));
    assert!(error.starts_with("key_sources.command:"), "{error}");
    assert!(error.contains("exited with 3"), "{error}");
    assert!(error.contains("vault: permission denied"), "{error}");
    assert!(
        !error.contains(&shaped) && !error.contains(&arbitrary),
        "{error}"
    );
    // Hangs: killed after its timeout.
    dir.write("keys.sh", "sleep 30\n");
    let error = error_of(dir.load(&no_env()));
    assert!(error.contains("no answer within 1s: killed"), "{error}");
    // Prints something that is not a keys file: the line, not its text.
    dir.write(
        "keys.sh",
        &format!("echo '{shaped}'\necho '{arbitrary} colour=blue'\n"),
    );
    let error = error_of(dir.load(&no_env()));
    assert!(
        error.starts_with("key_sources.command (its output):2:"),
        "{error}"
    );
    assert!(!error.contains(&arbitrary), "{error}");
    // Prints nothing: no keys.
    dir.write("keys.sh", "true\n");
    assert!(matches!(
        dir.load(&no_env()),
        Err(ConfigError::NoKeys { .. })
    ));
    // Not a program at all.
    let dir = Dir::new(&format!(
        "{POOL}\n[key_sources]\nenvironment = false\ncommand = [\"/nonexistent/vault\"]\n"
    ));
    let error = error_of(dir.load(&no_env()));
    assert!(
        error.contains("cannot run \"/nonexistent/vault\""),
        "{error}"
    );
    let dir = Dir::new(&format!(
        "{POOL}\n[key_sources]\nenvironment = false\ncommand = []\n"
    ));
    assert!(error_of(dir.load(&no_env())).contains("is empty"));
}

#[test]
fn tenants_are_read_and_each_mistake_names_its_field() {
    let keys = format!("[[keys]]\nsecret = \"{SECRET}\"\n{POOL}");
    let dir = Dir::new(&format!(
        "[tenants.chat]\nshare = 3\npriority = \"interactive\"\n\n[tenants.gateway]\nmay_name_tenants = true\n\n{keys}"
    ));
    let tenants = dir.load(&no_env()).unwrap().tenants;
    let read: Vec<(String, u32, &str, bool)> = tenants
        .names()
        .map(|(name, t)| {
            (
                name.to_string(),
                t.share,
                t.highest.as_str(),
                t.may_name_tenants,
            )
        })
        .collect();
    assert_eq!(
        read,
        vec![
            ("chat".to_string(), 3, "interactive", false),
            ("gateway".to_string(), 1, "normal", true)
        ]
    );
    for (section, expected) in [
        (
            "[tenants.chat]\nshare = 0\n",
            "tenants.chat.share: must be between 1 and 10000",
        ),
        (
            "[tenants.chat]\nshare = 10001\n",
            "tenants.chat.share: must be between 1 and 10000",
        ),
        (
            "[tenants.chat]\npriority = \"urgent\"\n",
            "tenants.chat.priority: \"urgent\" is not a class",
        ),
        ("[tenants.\"two words\"]\n", "a tenant is a caller's name"),
        ("[tenants.chat]\nweight = 2\n", "unknown field `weight`"),
    ] {
        let dir = Dir::new(&format!("{section}\n{keys}"));
        let error = error_of(dir.load(&no_env()));
        assert!(error.contains(expected), "{section}: {error}");
    }
    // None configured: an empty set, and calls go as they always went.
    let dir = Dir::new(&keys);
    assert!(dir.load(&no_env()).unwrap().tenants.is_empty());
}
