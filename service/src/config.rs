//! Loading a binary's typed configuration: its defaults, then a TOML file (`--config` or `SWITCHYARD_CONFIG`), then
//! one `SWITCHYARD_<KEY>` environment variable per key, every key and variable known from the configuration type
//! itself (its serialized defaults), so no list of names is kept by hand. It also renders a configuration as TOML
//! with its secrets redacted (`print-config`, `default-config`).
//!
//! It knows no service's fields and does not judge values beyond their type: each configuration type says what is
//! valid ([`Settings::problems`]).

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The prefix of every configuration variable.
pub const ENV_PREFIX: &str = "SWITCHYARD_";
/// The variable naming the configuration file when `--config` is not given.
pub const CONFIG_FILE_VAR: &str = "SWITCHYARD_CONFIG";
/// Variables under the prefix that are not settings: the file's name and the log format (read before the
/// configuration, so logging starts even when it is invalid).
const NOT_SETTINGS: &[&str] = &[CONFIG_FILE_VAR, crate::LOG_FORMAT_VAR];
/// Prefixes of variables that belong to test and fault-suite harnesses, which the processes they start inherit.
const HARNESS_PREFIXES: &[&str] = &["SWITCHYARD_TEST_", "SWITCHYARD_CHAOS_"];

/// What a configuration value shows in place of a secret.
pub const REDACTED: &str = "<redacted>";

/// A binary's configuration type.
pub trait Settings: Serialize + DeserializeOwned + Default {
    /// Keys whose values are secrets: never printed.
    const SECRET_KEYS: &'static [&'static str] = &[];
    /// Keys holding URLs (comma-separated lists of them) whose `user:password@` is never printed.
    const URL_KEYS: &'static [&'static str] = &[];

    /// Older names of keys, still read: `(old, current)`. A value under the old name counts as the current key's
    /// (the current name wins when both are set).
    const RENAMED: &'static [(&'static str, &'static str)] = &[];

    /// Fill in what is derived once the values are known (for example a random id when none was given).
    fn complete(&mut self) {}

    /// Every problem with the values, empty when they are usable.
    fn problems(&self) -> Vec<crate::ConfigError>;

    /// [`Settings::problems`] as a result.
    fn validate(&self) -> Result<(), ConfigProblems> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigProblems(problems))
        }
    }
}

/// Collects the problems of a configuration's values, for [`Settings::problems`].
#[derive(Debug, Default)]
pub struct Checks {
    problems: Vec<crate::ConfigError>,
}

impl Checks {
    /// A problem with `key` unless `ok`.
    pub fn require(&mut self, ok: bool, key: &'static str, message: impl Into<String>) {
        if !ok {
            self.problems.push(crate::ConfigError::Invalid { name: key, message: message.into() });
        }
    }

    /// The problem `checked` reports, if any.
    pub fn check<T>(&mut self, checked: Result<T, crate::ConfigError>) {
        if let Err(problem) = checked {
            self.problems.push(problem);
        }
    }

    /// Problems found elsewhere (a part of the configuration that checks itself).
    pub fn extend(&mut self, problems: Vec<crate::ConfigError>) {
        self.problems.extend(problems);
    }

    pub fn into_problems(self) -> Vec<crate::ConfigError> {
        self.problems
    }
}

/// A problem with `key` unless `path` names a file this process can read.
pub fn readable_file(key: &'static str, path: &Path) -> Result<(), crate::ConfigError> {
    match std::fs::File::open(path) {
        Ok(_) => Ok(()),
        Err(error) => Err(crate::ConfigError::Invalid { name: key, message: format!("{}: {error}", path.display()) }),
    }
}

/// Whether `key` holds a secret: listed by its type, or by its name alone (passwords, tokens, seeds and secrets never
/// show).
fn is_secret<T: Settings>(key: &str) -> bool {
    T::SECRET_KEYS.contains(&key) || ["password", "token", "seed", "secret"].iter().any(|word| key.ends_with(word))
}

/// Where a configuration is read from: a file, if any, and the environment's variables.
#[derive(Clone, Default)]
pub struct Sources {
    /// The TOML file, if one is named.
    pub file: Option<PathBuf>,
    /// Environment variables (name, value); only those starting with [`ENV_PREFIX`] are read.
    pub env: Vec<(String, String)>,
    /// Variables under [`ENV_PREFIX`] whose name or value is not UTF-8 (reported, never read as something else).
    pub not_utf8: Vec<String>,
}

impl fmt::Debug for Sources {
    /// Names only: values may be secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources")
            .field("file", &self.file)
            .field("env", &self.env.iter().map(|(name, _)| name).collect::<Vec<_>>())
            .field("not_utf8", &self.not_utf8)
            .finish()
    }
}

impl Sources {
    /// `file` if given, else the file `SWITCHYARD_CONFIG` names, with the process's environment.
    pub fn from_process(file: Option<PathBuf>) -> Sources {
        let mut env = Vec::new();
        let mut not_utf8 = Vec::new();
        for (name, value) in std::env::vars_os() {
            match (name.into_string(), value.into_string()) {
                (Ok(name), Ok(value)) => env.push((name, value)),
                (Ok(name), Err(_)) if name.starts_with(ENV_PREFIX) => not_utf8.push(name),
                (Err(name), _) if name.to_string_lossy().starts_with(ENV_PREFIX) => {
                    not_utf8.push(name.to_string_lossy().into_owned())
                }
                _ => {}
            }
        }
        let file = file.or_else(|| {
            env.iter()
                .find(|(name, _)| name == CONFIG_FILE_VAR)
                .map(|(_, v)| PathBuf::from(v))
                .filter(|p| !p.as_os_str().is_empty())
        });
        Sources { file, env, not_utf8 }
    }
}

/// Every problem found while loading a configuration, one per line when shown.
#[derive(Debug)]
pub struct ConfigProblems(pub Vec<crate::ConfigError>);

impl fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigProblems {}

/// Where one key's value came from, for messages.
#[derive(Debug, Clone)]
enum Origin {
    File(PathBuf),
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Env(name) => write!(f, "{name}"),
        }
    }
}

/// Load, complete and validate `T` from `sources`, reporting every problem found: names and values that cannot
/// be read (those keys keep their defaults while the rest is validated), then every value the type refuses.
pub fn load<T: Settings>(sources: &Sources) -> Result<T, ConfigProblems> {
    let (mut config, mut problems) = read::<T>(sources)?;
    config.complete();
    problems.extend(config.problems());
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigProblems(problems))
    }
}

/// Load `T` from `sources` without [`Settings::complete`] or [`Settings::problems`]: only names and types are checked.
pub fn load_unchecked<T: Settings>(sources: &Sources) -> Result<T, ConfigProblems> {
    let (config, problems) = read::<T>(sources)?;
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigProblems(problems))
    }
}

/// `T` from its defaults and `sources`, with every value that could be read, and the problems of those that
/// could not.
fn read<T: Settings>(sources: &Sources) -> Result<(T, Vec<crate::ConfigError>), ConfigProblems> {
    let defaults = defaults_of::<T>()?;
    let mut problems = Vec::new();
    let mut values = defaults.clone();
    let mut origins: BTreeMap<String, Origin> = BTreeMap::new();

    if let Some(path) = &sources.file {
        match read_file(path) {
            Ok(table) => {
                let mut table: Vec<(String, Value)> = table.into_iter().map(|(k, v)| (renamed::<T>(k), v)).collect();
                // The current name after the old one, so it wins.
                table.sort_by_key(|(key, _)| T::RENAMED.iter().all(|(_, current)| current != key));
                for (key, value) in table {
                    if !defaults.contains_key(&key) {
                        problems.push(crate::ConfigError::UnknownKey {
                            key: key.clone(),
                            file: path.display().to_string(),
                            nearest: nearest(&key, defaults.keys().map(String::as_str)),
                        });
                        continue;
                    }
                    values.insert(key.clone(), value);
                    origins.insert(key, Origin::File(path.clone()));
                }
            }
            Err(error) => problems.push(error),
        }
    }

    for name in &sources.not_utf8 {
        problems.push(crate::ConfigError::Value {
            key: name.trim_start_matches(ENV_PREFIX).to_ascii_lowercase(),
            origin: name.clone(),
            message: "is not UTF-8".into(),
        });
    }
    let mut env: Vec<&(String, String)> =
        sources.env.iter().filter(|(name, _)| name.starts_with(ENV_PREFIX) && !not_a_setting(name)).collect();
    env.sort();
    // An old name first, so the current one wins.
    env.sort_by_key(|(name, _)| {
        let key = name[ENV_PREFIX.len()..].to_ascii_lowercase();
        T::RENAMED.iter().all(|(old, _)| *old != key)
    });
    for (name, raw) in env {
        let key = renamed::<T>(name[ENV_PREFIX.len()..].to_ascii_lowercase());
        let Some(default) = defaults.get(&key) else {
            problems.push(crate::ConfigError::UnknownVariable {
                name: name.clone(),
                nearest: nearest(&key, defaults.keys().map(String::as_str)).map(|k| env_var_name(&k)),
            });
            continue;
        };
        match env_value::<T>(&defaults, &key, default, raw) {
            Ok(value) => {
                values.insert(key.clone(), value);
                origins.insert(key, Origin::Env(name.clone()));
            }
            Err(error) => {
                problems.push(crate::ConfigError::Value { key, origin: name.clone(), message: error.to_string() })
            }
        }
    }

    // Each value from a source is checked on its own against the type, so every bad one is named; a bad one
    // keeps its default.
    for (key, origin) in &origins {
        let mut alone = defaults.clone();
        alone.insert(key.clone(), values[key].clone());
        let message = match serde_json::from_value::<T>(Value::Object(alone)) {
            // Serde's message quotes the value: never a secret's.
            Err(_) if is_secret::<T>(key) => Some("has the wrong type (a secret is text)".to_owned()),
            Err(error) => Some(error.to_string()),
            Ok(_) if is_secret::<T>(key) && values[key].as_str() == Some(REDACTED) => {
                Some(format!("is {REDACTED}, the placeholder print-config shows: set the secret itself"))
            }
            Ok(_) => None,
        };
        if let Some(message) = message {
            problems.push(crate::ConfigError::Value { key: key.clone(), origin: origin.to_string(), message });
            values.insert(key.clone(), defaults[key].clone());
        }
    }
    let config = serde_json::from_value::<T>(Value::Object(values)).map_err(|error| {
        ConfigProblems(vec![crate::ConfigError::Value {
            key: "(all)".into(),
            origin: "the combined sources".into(),
            message: error.to_string(),
        }])
    })?;
    Ok((config, problems))
}

/// The environment variable that sets `key`.
pub fn env_var_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

/// Every key of `T`, in the order of its serialized defaults.
pub fn keys<T: Settings>() -> Vec<String> {
    defaults_of::<T>().map(|d| d.keys().cloned().collect()).unwrap_or_default()
}

/// `config` as TOML, secrets and URL credentials redacted; unset optional keys are listed as comments.
pub fn to_toml<T: Settings>(config: &T) -> String {
    let Ok(Value::Object(map)) = serde_json::to_value(config) else {
        return String::from("# the configuration cannot be shown\n");
    };
    let mut shown = toml::Table::new();
    let mut unset = Vec::new();
    for (key, value) in map {
        let value = match value {
            Value::Null => {
                unset.push(key);
                continue;
            }
            Value::String(s) if is_secret::<T>(&key) && !s.is_empty() => Value::String(REDACTED.into()),
            Value::String(s) if T::URL_KEYS.contains(&key.as_str()) => Value::String(crate::redact_url(&s)),
            other => other,
        };
        match toml::Value::try_from(value) {
            Ok(value) => {
                shown.insert(key, value);
            }
            Err(error) => unset.push(format!("{key} (cannot be shown: {error})")),
        }
    }
    let mut text = toml::to_string(&shown).unwrap_or_default();
    for key in unset {
        text.push_str(&format!("# {key} is unset\n"));
    }
    text
}

/// The current name of `key` (itself unless it is an old name).
fn renamed<T: Settings>(key: String) -> String {
    T::RENAMED.iter().find(|(old, _)| *old == key).map(|(_, current)| (*current).to_owned()).unwrap_or(key)
}

/// `config` for `Debug`: its keys and values as [`to_toml`] shows them, secrets and URL credentials redacted.
pub fn fmt_redacted<T: Settings>(config: &T, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let Ok(Value::Object(map)) = serde_json::to_value(config) else {
        return f.write_str(name);
    };
    let mut out = f.debug_struct(name);
    for (key, value) in &map {
        let shown = match value {
            Value::String(s) if is_secret::<T>(key) && !s.is_empty() => Value::String(REDACTED.into()),
            Value::String(s) if T::URL_KEYS.contains(&key.as_str()) => Value::String(crate::redact_url(s)),
            other => other.clone(),
        };
        out.field(key, &format_args!("{shown}"));
    }
    out.finish()
}

fn not_a_setting(name: &str) -> bool {
    NOT_SETTINGS.contains(&name) || HARNESS_PREFIXES.iter().any(|prefix| name.starts_with(prefix)) || service_link(name)
}

/// Whether `name` is one of the variables Kubernetes gives every pod for each Service of its namespace (a Service
/// named `switchyard-gateway` yields `SWITCHYARD_GATEWAY_SERVICE_HOST`, `SWITCHYARD_GATEWAY_PORT_80_TCP_ADDR`,
/// ...): never a setting, and no key ends like one.
fn service_link(name: &str) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.contains("_SERVICE_PORT") || name.ends_with("_PORT") {
        return true;
    }
    // `<SERVICE>_PORT_<port>_<TCP|UDP|SCTP>` and its `_PROTO`, `_PORT`, `_ADDR` variants.
    name.split("_PORT_").skip(1).any(|rest| {
        let mut parts = rest.split('_');
        let port = parts.next().is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        port && matches!(parts.next(), Some("TCP" | "UDP" | "SCTP"))
    })
}

fn defaults_of<T: Settings>() -> Result<Map<String, Value>, ConfigProblems> {
    match serde_json::to_value(T::default()) {
        Ok(Value::Object(map)) => Ok(map),
        other => Err(ConfigProblems(vec![crate::ConfigError::Value {
            key: "(all)".into(),
            origin: "the defaults".into(),
            message: format!("the configuration type does not serialize to a table: {other:?}"),
        }])),
    }
}

fn read_file(path: &Path) -> Result<Map<String, Value>, crate::ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| crate::ConfigError::Read { path: path.display().to_string(), source })?;
    // The parser's own message quotes the offending line, which may hold a secret: only its place and reason show.
    let table: toml::Table = toml::from_str(&text).map_err(|error| {
        let line = error.span().map(|span| {
            text.as_bytes()[..span.start.min(text.len())].iter().filter(|byte| **byte == b'\n').count() + 1
        });
        crate::ConfigError::Syntax {
            path: path.display().to_string(),
            line: line.unwrap_or(0),
            message: error.message().to_owned(),
        }
    })?;
    match serde_json::to_value(table) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(crate::ConfigError::Read {
            path: path.display().to_string(),
            source: std::io::Error::other("the file is not a table of keys"),
        }),
    }
}

/// The value an environment variable gives `key`, typed like the key's default; for a key without one (unset
/// optional, empty list) the type is found by trying which kind of value the configuration type accepts there.
fn env_value<T: Settings>(
    defaults: &Map<String, Value>,
    key: &str,
    default: &Value,
    raw: &str,
) -> Result<Value, EnvValueError> {
    let accepts = |value: Value| {
        let mut probe = defaults.clone();
        probe.insert(key.to_owned(), value);
        serde_json::from_value::<T>(Value::Object(probe)).is_ok()
    };
    let trimmed = raw.trim();
    // Text: a value is taken as it is, unless the key refuses it and takes it without the blanks around it (an
    // address with a trailing newline).
    let text = || {
        let raw_value = Value::String(raw.to_owned());
        if trimmed.len() != raw.len() && !accepts(raw_value.clone()) && accepts(Value::String(trimmed.to_owned())) {
            Value::String(trimmed.to_owned())
        } else {
            raw_value
        }
    };
    let optional = || accepts(Value::Null);
    // A key that is not text is unset by `none` or nothing; optional text only by nothing (`none` may be a
    // password).
    let is_text = match default {
        Value::String(_) => true,
        Value::Null => !accepts(Value::from(0)) && !accepts(Value::Bool(false)),
        Value::Bool(_) | Value::Number(_) | Value::Array(_) | Value::Object(_) => false,
    };
    let unsets = trimmed.is_empty() || (!is_text && trimmed.eq_ignore_ascii_case("none"));
    if unsets && optional() {
        return Ok(Value::Null);
    }
    match default {
        Value::String(_) => Ok(text()),
        Value::Bool(_) => parse_bool(trimmed).map(Value::Bool),
        Value::Number(_) => parse_number(trimmed),
        Value::Array(items) => {
            let numbers = match items.first() {
                Some(first) => first.is_number(),
                None => {
                    !accepts(Value::Array(vec![Value::String("x".into())])) && accepts(Value::Array(vec![0.into()]))
                }
            };
            trimmed
                .split(',')
                .map(str::trim)
                .filter(|part| !part.is_empty())
                .map(|part| if numbers { parse_number(part) } else { Ok(Value::String(part.to_owned())) })
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        Value::Null => {
            if accepts(Value::from(0)) {
                parse_number(trimmed)
            } else if accepts(Value::Bool(false)) {
                parse_bool(trimmed).map(Value::Bool)
            } else {
                Ok(text())
            }
        }
        Value::Object(_) => Err(EnvValueError::Table),
    }
}

/// Why a variable's text is not a value of its key's kind.
#[derive(Debug, thiserror::Error)]
enum EnvValueError {
    #[error("{0:?} is not true or false")]
    NotABool(String),
    #[error("{0:?} is not a number")]
    NotANumber(String),
    #[error("is a table and cannot be set by one variable; use the configuration file")]
    Table,
}

fn parse_bool(text: &str) -> Result<bool, EnvValueError> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(EnvValueError::NotABool(text.to_owned())),
    }
}

fn parse_number(text: &str) -> Result<Value, EnvValueError> {
    if let Ok(n) = text.parse::<u64>() {
        return Ok(n.into());
    }
    if let Ok(n) = text.parse::<i64>() {
        return Ok(n.into());
    }
    match text.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
        Some(n) => Ok(Value::Number(n)),
        None => Err(EnvValueError::NotANumber(text.to_owned())),
    }
}

/// The known name closest to `unknown`, when one is close enough to be a likely misspelling.
fn nearest<'a>(unknown: &str, known: impl Iterator<Item = &'a str>) -> Option<String> {
    let unknown = unknown.to_ascii_lowercase();
    known
        .map(|k| (edit_distance(&unknown, k), k))
        .filter(|(distance, k)| *distance <= (k.len() / 3).max(2))
        .min()
        .map(|(_, k)| k.to_owned())
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Set every key of `T` through its `SWITCHYARD_*` variable, one at a time, to a value unlike its default, and
/// check that the loaded configuration takes it: the walk a configuration type's own test runs, so a key that
/// the environment cannot set fails it. Panics with the key when one does not take.
pub fn assert_every_key_is_set_by_env<T: Settings>() {
    let defaults = defaults_of::<T>().unwrap_or_else(|problems| panic!("{problems}"));
    for (key, default) in &defaults {
        let candidates: Vec<String> = match default {
            Value::Bool(b) => vec![(!b).to_string()],
            Value::Number(n) => match n.as_u64() {
                Some(u) => vec![(u + 1).to_string(), u.saturating_sub(1).to_string()],
                None => vec![format!("{}", n.as_f64().unwrap_or(0.0) + 1.5)],
            },
            Value::String(_) | Value::Null => {
                vec!["7".into(), "true".into(), "set-by-env".into(), "127.0.0.1:1".into(), "nats://set-by-env:1".into()]
            }
            Value::Array(_) => vec!["1,2".into(), "a,b".into()],
            Value::Object(_) => panic!("{key}: a table cannot be set by one variable"),
        };
        let name = env_var_name(key);
        let took = candidates.iter().any(|raw| {
            let sources = Sources { env: vec![(name.clone(), raw.clone())], ..Sources::default() };
            match load_unchecked::<T>(&sources) {
                Ok(loaded) => {
                    let loaded = serde_json::to_value(loaded).unwrap_or(Value::Null);
                    loaded.get(key) != Some(default)
                }
                Err(_) => false,
            }
        });
        assert!(took, "{key}: no value set through {name} changed it (tried {candidates:?})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::net::SocketAddr;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Example {
        listen: SocketAddr,
        nats_url: String,
        token: String,
        count: u32,
        ratio: f64,
        enabled: bool,
        origins: Vec<String>,
        backoff_ms: Vec<u64>,
        quota: Option<u64>,
        name: Option<String>,
    }

    impl Default for Example {
        fn default() -> Self {
            Example {
                listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
                nats_url: "nats://127.0.0.1:4222".into(),
                token: String::new(),
                count: 3,
                ratio: 0.5,
                enabled: false,
                origins: Vec::new(),
                backoff_ms: vec![1, 2],
                quota: Some(7),
                name: None,
            }
        }
    }

    impl Settings for Example {
        const SECRET_KEYS: &'static [&'static str] = &["token"];
        const URL_KEYS: &'static [&'static str] = &["nats_url"];
        fn problems(&self) -> Vec<crate::ConfigError> {
            let mut checks = Checks::default();
            checks.require(self.count > 0, "count", "must be positive");
            checks.require(!self.token.is_empty(), "token", "must be set");
            checks.into_problems()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Sources {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Sources { env, ..Sources::default() }
    }

    #[test]
    fn every_kind_of_key_is_set_by_its_variable() {
        let loaded: Example = load_unchecked(&env(&[
            ("SWITCHYARD_LISTEN", "0.0.0.0:9"),
            ("SWITCHYARD_TOKEN", "1234"),
            ("SWITCHYARD_COUNT", " 12 "),
            ("SWITCHYARD_RATIO", "0.25"),
            ("SWITCHYARD_ENABLED", "TRUE"),
            ("SWITCHYARD_ORIGINS", "https://a, https://b,"),
            ("SWITCHYARD_BACKOFF_MS", "10,20,30"),
            ("SWITCHYARD_QUOTA", "none"),
            ("SWITCHYARD_NAME", "someone"),
            ("PATH", "/bin"),
            ("SWITCHYARD_CONFIG", ""),
            ("SWITCHYARD_TEST_NATS_URL", "whatever"),
        ]))
        .unwrap();
        assert_eq!(
            loaded,
            Example {
                listen: "0.0.0.0:9".parse().unwrap(),
                nats_url: "nats://127.0.0.1:4222".into(),
                token: "1234".into(),
                count: 12,
                ratio: 0.25,
                enabled: true,
                origins: vec!["https://a".into(), "https://b".into()],
                backoff_ms: vec![10, 20, 30],
                quota: None,
                name: Some("someone".into()),
            }
        );
        let loaded: Example = load_unchecked(&env(&[("SWITCHYARD_QUOTA", "9"), ("SWITCHYARD_NAME", "")])).unwrap();
        assert_eq!((loaded.quota, loaded.name), (Some(9), None));
    }

    #[test]
    fn unknown_variables_and_bad_values_are_each_named() {
        let problems = load_unchecked::<Example>(&env(&[
            ("SWITCHYARD_NATS_ULR", "nats://x"),
            ("SWITCHYARD_COUNT", "-4"),
            ("SWITCHYARD_LISTEN", "nowhere"),
            ("SWITCHYARD_ENABLED", "maybe"),
            ("SWITCHYARD_COMPLETELY_DIFFERENT", "1"),
        ]))
        .unwrap_err();
        let text = problems.to_string();
        assert_eq!(problems.0.len(), 5, "{text}");
        assert!(text.contains("unknown variable SWITCHYARD_NATS_ULR; did you mean SWITCHYARD_NATS_URL?"), "{text}");
        assert!(text.contains("SWITCHYARD_COMPLETELY_DIFFERENT") && !text.contains("DIFFERENT;"), "{text}");
        for name in ["SWITCHYARD_COUNT", "SWITCHYARD_LISTEN", "SWITCHYARD_ENABLED"] {
            assert!(text.lines().any(|l| l.contains(name)), "{name} in {text}");
        }
    }

    #[test]
    fn files_are_read_and_their_unknown_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "count = 5\norigins = [\"https://x\"]\ntoekn = \"abc\"\n").unwrap();
        let sources = Sources { file: Some(path.clone()), ..Sources::default() };
        let problems = load_unchecked::<Example>(&sources).unwrap_err().to_string();
        assert!(problems.contains("unknown key toekn") && problems.contains("did you mean token?"), "{problems}");
        std::fs::write(&path, "count = 5\norigins = [\"https://x\"]\n").unwrap();
        let mut sources = Sources { file: Some(path.clone()), ..Sources::default() };
        let loaded: Example = load_unchecked(&sources).unwrap();
        assert_eq!((loaded.count, loaded.origins.len()), (5, 1));
        // The environment wins over the file.
        sources.env.push(("SWITCHYARD_COUNT".into(), "6".into()));
        assert_eq!(load_unchecked::<Example>(&sources).unwrap().count, 6);
        std::fs::write(&path, "count = \"five\"\n").unwrap();
        let problems =
            load_unchecked::<Example>(&Sources { file: Some(path.clone()), ..Sources::default() }).unwrap_err();
        assert!(problems.to_string().contains("count") && problems.to_string().contains("c.toml"), "{problems}");
        let missing = Sources { file: Some(dir.path().join("missing.toml")), ..Sources::default() };
        assert!(load_unchecked::<Example>(&missing).unwrap_err().to_string().contains("missing.toml"));
    }

    #[test]
    fn validation_reports_every_problem() {
        let problems = load::<Example>(&env(&[("SWITCHYARD_COUNT", "0")])).unwrap_err();
        assert_eq!(problems.0.len(), 2, "{problems}");
        assert_eq!(problems.to_string().lines().count(), 2);
        // Values that cannot be read are reported with the problems of the rest.
        let problems =
            load::<Example>(&env(&[("SWITCHYARD_COUNT", "0"), ("SWITCHYARD_RATIO", "x"), ("SWITCHYARD_X", "1")]))
                .unwrap_err()
                .to_string();
        for expected in ["SWITCHYARD_RATIO", "SWITCHYARD_X", "count: must be positive", "token: must be set"] {
            assert!(problems.contains(expected), "{expected} in {problems}");
        }
    }

    #[test]
    fn printed_configurations_hold_no_secrets() {
        let config = Example {
            token: "hunter2-secret".into(),
            nats_url: "nats://user:pass@n1:4222".into(),
            ..Example::default()
        };
        let text = to_toml(&config);
        assert!(!text.contains("hunter2") && !text.contains("pass@"), "{text}");
        assert!(text.contains("token = \"<redacted>\"") && text.contains("n1:4222"), "{text}");
        assert!(text.contains("# name is unset"), "{text}");
        // What is printed (secrets aside) reads back as the same configuration.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("printed.toml");
        std::fs::write(&path, to_toml(&Example::default())).unwrap();
        let read: Example = load_unchecked(&Sources { file: Some(path), ..Sources::default() }).unwrap();
        assert_eq!(read, Example::default());
    }

    #[test]
    fn odd_values_are_read_as_an_operator_means_them() {
        // An address with blanks around it, a text `none` that stays text, nothing that unsets optional text.
        let loaded: Example =
            load_unchecked(&env(&[("SWITCHYARD_LISTEN", " 0.0.0.0:9\n"), ("SWITCHYARD_NAME", "none")])).unwrap();
        assert_eq!((loaded.listen.port(), loaded.name.as_deref()), (9, Some("none")));
        let loaded: Example = load_unchecked(&env(&[("SWITCHYARD_NAME", ""), ("SWITCHYARD_QUOTA", " NONE ")])).unwrap();
        assert_eq!((loaded.name, loaded.quota), (None, None));
        // Kubernetes' service links are not settings.
        let loaded: Example = load_unchecked(&env(&[
            ("SWITCHYARD_GATEWAY_SERVICE_HOST", "10.0.0.1"),
            ("SWITCHYARD_GATEWAY_SERVICE_PORT_HTTP", "80"),
            ("SWITCHYARD_GATEWAY_PORT", "tcp://10.0.0.1:80"),
            ("SWITCHYARD_GATEWAY_PORT_80_TCP_ADDR", "10.0.0.1"),
        ]))
        .unwrap();
        assert_eq!(loaded, Example::default());
        // A variable that is not UTF-8 is reported, not read as nothing.
        let sources = Sources { not_utf8: vec!["SWITCHYARD_TOKEN".into()], ..Sources::default() };
        assert!(load_unchecked::<Example>(&sources).unwrap_err().to_string().contains("not UTF-8"));
    }

    #[test]
    fn secrets_never_show_in_problems() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "token = 98765432\n").unwrap();
        let problems = load_unchecked::<Example>(&Sources { file: Some(path.clone()), ..Sources::default() })
            .unwrap_err()
            .to_string();
        assert!(problems.contains("token") && !problems.contains("98765432"), "{problems}");
        std::fs::write(&path, "count = 1\ntoken = \"s3cr3t-token-value\n").unwrap();
        let problems = load_unchecked::<Example>(&Sources { file: Some(path.clone()), ..Sources::default() })
            .unwrap_err()
            .to_string();
        assert!(problems.contains("line 2") && !problems.contains("s3cr3t"), "{problems}");
        // What print-config shows in place of a secret is not a secret.
        let problems = load_unchecked::<Example>(&env(&[("SWITCHYARD_TOKEN", REDACTED)])).unwrap_err().to_string();
        assert!(problems.contains("placeholder"), "{problems}");
        assert!(!format!("{:?}", env(&[("SWITCHYARD_TOKEN", "hunter2")])).contains("hunter2"));
    }

    #[test]
    fn nearest_names() {
        let known = ["nats_url", "redis_url", "listen"];
        assert_eq!(nearest("nats_ulr", known.into_iter()).as_deref(), Some("nats_url"));
        assert_eq!(nearest("LISTN", known.into_iter()).as_deref(), Some("listen"));
        assert_eq!(nearest("something_else", known.into_iter()), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
