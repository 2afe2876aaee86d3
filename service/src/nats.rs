//! NATS plumbing every service shares: the list of servers a `nats_url` names (one URL or a comma-separated list of
//! a cluster's nodes, so a client reconnects to another node when its own dies), opening a KV bucket or creating it
//! when it does not exist yet (several processes may race to), and the rule for how many replicas the streams and
//! buckets a service creates get. Also the watch that moves a service off a node that lost its cluster, and the
//! read of a key's latest value from the bucket's stream leader.
//!
//! Also how a service authenticates to NATS and secures the connection ([`NatsAuth`]: user and password, token,
//! NKey seed or `.creds` file; TLS with a CA bundle and an optional client certificate), and a connect that fails at
//! once, with the reason, when the server refuses the credentials or the TLS handshake, and waits patiently for a
//! server that is not up yet.
//!
//! It chooses no bucket's settings (each service does) and never changes an existing bucket: a bucket keeps the
//! replicas it was created with until an operator moves it (see `docs/operations.md`).

use async_nats::jetstream::{self, kv};
use async_nats::{ConnectErrorKind, ServerAddr};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How a service authenticates to NATS and secures the connection; flattened into each service's configuration,
/// so every key is one of its top-level keys. At most one way to authenticate may be set.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsAuth {
    /// User name (with `nats_password`).
    pub nats_user: Option<String>,
    /// Password of `nats_user`. A secret.
    pub nats_password: Option<String>,
    /// Authentication token. A secret.
    pub nats_token: Option<String>,
    /// NKey seed of the user (`SU...`); the server knows its public key. A secret.
    pub nats_nkey_seed: Option<String>,
    /// A `.creds` file (user JWT and NKey seed), as `nsc` writes for decentralized auth.
    pub nats_creds_file: Option<PathBuf>,
    /// PEM bundle of the CAs that sign the servers' certificates; without it the system's roots are trusted.
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM, with `nats_tls_key_file`), for servers that verify clients.
    pub nats_tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub nats_tls_key_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS. Implied by a `tls://` URL and by any of the TLS files.
    pub nats_tls_required: bool,
}

impl std::fmt::Debug for NatsAuth {
    /// Secrets are never shown, only whether they are set.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: &Option<String>| if v.is_some() { "<redacted>" } else { "unset" };
        f.debug_struct("NatsAuth")
            .field("nats_user", &self.nats_user)
            .field("nats_password", &set(&self.nats_password))
            .field("nats_token", &set(&self.nats_token))
            .field("nats_nkey_seed", &set(&self.nats_nkey_seed))
            .field("nats_creds_file", &self.nats_creds_file)
            .field("nats_tls_ca_file", &self.nats_tls_ca_file)
            .field("nats_tls_cert_file", &self.nats_tls_cert_file)
            .field("nats_tls_key_file", &self.nats_tls_key_file)
            .field("nats_tls_required", &self.nats_tls_required)
            .finish()
    }
}

impl NatsAuth {
    /// Every problem with these settings: more than one way to authenticate, a user without a password (or the
    /// reverse), a certificate without its key, a file that cannot be read, a seed that is not one.
    pub fn problems(&self) -> Vec<crate::ConfigError> {
        let mut checks = crate::config::Checks::default();
        let ways = [
            self.nats_user.is_some() || self.nats_password.is_some(),
            self.nats_token.is_some(),
            self.nats_nkey_seed.is_some(),
            self.nats_creds_file.is_some(),
        ];
        checks.require(
            ways.iter().filter(|set| **set).count() <= 1,
            "nats_user",
            "set one way to authenticate to NATS: nats_user and nats_password, nats_token, nats_nkey_seed or \
             nats_creds_file",
        );
        checks.require(
            self.nats_user.is_some() == self.nats_password.is_some(),
            "nats_password",
            "nats_user and nats_password go together",
        );
        if let Some(seed) = &self.nats_nkey_seed {
            checks.require(
                nkeys::KeyPair::from_seed(seed.trim()).is_ok(),
                "nats_nkey_seed",
                "is not an NKey seed (SU... for a user)",
            );
        }
        if let Some(path) = &self.nats_creds_file {
            checks.check(crate::config::readable_file("nats_creds_file", path));
        }
        let tls = crate::tls::TlsFiles {
            ca_file: self.nats_tls_ca_file.clone(),
            cert_file: self.nats_tls_cert_file.clone(),
            key_file: self.nats_tls_key_file.clone(),
        };
        checks.extend(tls.problems(["nats_tls_ca_file", "nats_tls_cert_file", "nats_tls_key_file"]));
        checks.into_problems()
    }

    /// Whether the connection must use TLS.
    pub fn tls_required(&self) -> bool {
        self.nats_tls_required || self.nats_tls_ca_file.is_some() || self.nats_tls_cert_file.is_some()
    }

    /// `options` with these credentials and TLS settings.
    async fn apply(&self, mut options: async_nats::ConnectOptions) -> Result<async_nats::ConnectOptions, ConnectError> {
        if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.nats_token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &self.nats_nkey_seed {
            options = options.nkey(seed.trim().to_owned());
        }
        if let Some(path) = &self.nats_creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials { path: path.clone(), source })?;
        }
        if let Some(ca) = &self.nats_tls_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.nats_tls_cert_file, &self.nats_tls_key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options.require_tls(self.tls_required()))
    }
}

/// The servers of a `nats_url`: one URL, or several separated by commas (blanks around them are ignored).
pub fn server_addrs(nats_url: &str) -> Result<Vec<ServerAddr>, crate::ConfigError> {
    let invalid = |message: String| crate::ConfigError::Invalid { name: "nats_url", message };
    let addrs = nats_url
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| url.parse::<ServerAddr>().map_err(|e| invalid(format!("{}: {e}", crate::redact_url(url)))))
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(invalid("names no server".into()));
    }
    Ok(addrs)
}

/// How often a client pings its NATS server. After three unanswered pings it drops the connection and moves to
/// another node, so a frozen node (paused, or cut off without a reset) holds its clients for seconds, not the
/// minutes of the client's default.
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// The options every service connects with: its name, and the ping interval above.
pub fn connect_options(name: impl ToString) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new().name(name).ping_interval(PING_INTERVAL)
}

/// Why a service could not connect to NATS.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// `nats_url` names no usable server.
    #[error("NATS: {0}")]
    Url(#[source] crate::ConfigError),
    /// The `.creds` file could not be read or parsed.
    #[error("NATS: cannot use the credentials file {}: {source}", path.display())]
    Credentials { path: PathBuf, source: std::io::Error },
    /// The server refused the credentials or the TLS handshake failed: a configuration mistake, not an outage.
    #[error("NATS: {url} refused the connection ({kind}): check the credentials and TLS settings: {source}")]
    Refused {
        /// The configured URL, without credentials.
        url: String,
        kind: &'static str,
        #[source]
        source: async_nats::ConnectError,
    },
    /// The connection could not be made.
    #[error("NATS: connect to {url}: {source}")]
    Connect {
        /// The configured URL, without credentials.
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// How long a patient connect waits between attempts while no server answers, at most.
const CONNECT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Connect as `name` to the servers `nats_url` names, with `auth`. A refused credential or a failed TLS handshake
/// is an error at once. `patient`: keep trying while no server answers (a service that starts with its NATS),
/// rather than fail at once (a one-off command). Once connected, the client reconnects by itself.
pub async fn connect(
    nats_url: &str,
    auth: &NatsAuth,
    name: impl ToString,
    patient: bool,
) -> Result<async_nats::Client, ConnectError> {
    let servers = server_addrs(nats_url).map_err(ConnectError::Url)?;
    crate::tls::install_default_provider();
    let url = crate::redact_url(nats_url);
    let name = name.to_string();
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        let options = auth.apply(connect_options(&name)).await?;
        let source = match options.connect(servers.clone()).await {
            Ok(client) => return Ok(client),
            Err(source) => source,
        };
        let refused = match source.kind() {
            ConnectErrorKind::Authentication => Some("authentication failed"),
            ConnectErrorKind::AuthorizationViolation => Some("authorization violation"),
            ConnectErrorKind::Tls => Some("TLS"),
            // A handshake that fails on a certificate reaches us as an IO error carrying rustls's reason.
            ConnectErrorKind::Io if crate::tls::is_tls_failure(&source) => Some("TLS"),
            ConnectErrorKind::ServerParse
            | ConnectErrorKind::Dns
            | ConnectErrorKind::TimedOut
            | ConnectErrorKind::Io
            | ConnectErrorKind::MaxReconnects => None,
        };
        if let Some(kind) = refused {
            return Err(ConnectError::Refused { url, kind, source });
        }
        if !patient {
            return Err(ConnectError::Connect { url, source });
        }
        tracing::warn!(%url, error = %source, "NATS not reachable yet; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(CONNECT_RETRY_MAX);
    }
}

/// How often the cluster watch asks the connected node for the account's JetStream state.
pub const CLUSTER_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the connected node may fail to answer for JetStream before the watch moves to another node: longer
/// than an election of the cluster's meta leader (a few seconds), so a node loss elsewhere moves nobody.
pub const CLUSTER_WATCH_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reconnect to another node when the connected one stops answering JetStream requests for `CLUSTER_WATCH_LIMIT`
/// while the connection itself stays up: a node cut off from the rest of its cluster still answers pings, so its
/// clients would otherwise stay on a side that can append nothing and sees none of the others' messages.
/// Runs until `shutdown` fires.
///
/// It does not judge a single NATS server (one that answers) nor a connection that is down (the client reconnects
/// by itself), and a reconnect may land on the same node; the next round tries again.
pub async fn watch_cluster(client: async_nats::Client, shutdown: tokio_util::sync::CancellationToken) {
    let js = jetstream::new(client.clone());
    let mut last_answer = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CLUSTER_WATCH_INTERVAL) => {}
        }
        if client.connection_state() != async_nats::connection::State::Connected {
            last_answer = tokio::time::Instant::now();
            continue;
        }
        let answer = tokio::time::timeout(CLUSTER_WATCH_INTERVAL, js.query_account()).await;
        if matches!(answer, Ok(Ok(_))) {
            last_answer = tokio::time::Instant::now();
            continue;
        }
        if last_answer.elapsed() >= CLUSTER_WATCH_LIMIT {
            let server = client.server_info().port;
            tracing::warn!(
                server_port = server,
                "the NATS node has not answered for JetStream in {CLUSTER_WATCH_LIMIT:?}; moving to another node"
            );
            if let Err(error) = client.force_reconnect().await {
                tracing::warn!(%error, "cannot reconnect to NATS");
            }
            last_answer = tokio::time::Instant::now();
        }
    }
}

/// Start `watch_cluster` for `client` when `nats_url` names a cluster (more than one node).
pub fn spawn_cluster_watch(
    client: &async_nats::Client,
    nats_url: &str,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    if server_addrs(nats_url).is_ok_and(|servers| servers.len() > 1) {
        tokio::spawn(watch_cluster(client.clone(), shutdown.clone()));
    }
}

/// A leader read of a key that failed (no leader during an election, a timeout, a closed connection).
#[derive(Debug, thiserror::Error)]
#[error("cannot read {key} from its bucket's leader")]
pub struct LeaderReadError {
    pub key: String,
    #[source]
    pub source: jetstream::stream::LastRawMessageError,
}

/// The key's latest entry (a put, or the delete or purge marker that ended it), read from the leader of the
/// bucket's stream; `None` when the key was never written or its history was purged away.
///
/// `kv::Store::entry` reads through direct gets, which any replica of a replicated bucket answers, also one that has
/// not applied the latest writes yet: a record written a millisecond before reads as missing or as its previous
/// revision. Every single-key read that a decision depends on (an API key, a room's roster before it is updated,
/// a membership) goes through here instead; only listings and counts read the followers.
pub async fn latest_entry(store: &kv::Store, key: &str) -> Result<Option<kv::Entry>, LeaderReadError> {
    use jetstream::stream::LastRawMessageErrorKind;
    let subject = format!("{}{}", store.prefix, key);
    let message = match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => message,
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(source) => return Err(LeaderReadError { key: key.to_owned(), source }),
    };
    Ok(Some(kv::Entry {
        bucket: store.name.clone(),
        key: key.to_owned(),
        operation: kv_operation(&message.headers),
        value: message.payload,
        revision: message.sequence,
        created: message.time,
        delta: 0,
        seen_current: false,
    }))
}

/// The value of `key` if its latest entry is a put, read from the leader as `latest_entry` does.
pub async fn latest_value(store: &kv::Store, key: &str) -> Result<Option<bytes::Bytes>, LeaderReadError> {
    Ok(latest_entry(store, key).await?.filter(|entry| entry.operation == kv::Operation::Put).map(|entry| entry.value))
}

/// The operation a KV message records: its `KV-Operation` header, or a put when it has none. A marker the server
/// left when it removed the key (`Nats-Marker-Reason`) reads as a delete (`Remove`) or a purge (an expiry or a
/// purge), as `kv::Store::entry` reads it.
fn kv_operation(headers: &async_nats::HeaderMap) -> kv::Operation {
    let marker = headers.get("Nats-Marker-Reason").map(|value| value.as_str());
    match (headers.get("KV-Operation").map(|value| value.as_str()), marker) {
        (Some("DEL"), _) | (None, Some("Remove")) => kv::Operation::Delete,
        (Some("PURGE"), _) | (None, Some(_)) => kv::Operation::Purge,
        (Some(_), _) | (None, None) => kv::Operation::Put,
    }
}

/// Replicas a stream or bucket may have: one NATS server, or a cluster of up to five.
pub const REPLICAS: std::ops::RangeInclusive<usize> = 1..=5;

/// A KV bucket that could neither be opened nor created.
#[derive(Debug, thiserror::Error)]
#[error("KV bucket {bucket}: cannot create it ({create}), nor open it")]
pub struct EnsureKvError {
    pub bucket: String,
    pub create: jetstream::context::CreateKeyValueError,
    #[source]
    pub open: jetstream::context::KeyValueError,
}

/// Open the bucket `config` names, creating it with `config` when it does not exist.
pub async fn ensure_kv(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, EnsureKvError> {
    if let Ok(store) = js.get_key_value(config.bucket.clone()).await {
        return Ok(store);
    }
    let bucket = config.bucket.clone();
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another process may have created it in between.
        Err(create) => js.get_key_value(bucket.clone()).await.map_err(|open| EnsureKvError { bucket, create, open }),
    }
}

/// Why a compare-and-set write of a KV key did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// The key is not at the revision the write expected (for a create: it exists): nothing was written.
    #[error("the key changed meanwhile")]
    Conflict,
    /// The create failed otherwise.
    #[error("create: {0}")]
    Create(#[source] kv::CreateError),
    /// The update failed otherwise.
    #[error("update: {0}")]
    Update(#[source] kv::UpdateError),
}

/// Write `value` to `key` only where it still stands at `revision` (`None`: only where it does not exist), and
/// return its new revision. A `Conflict` wrote nothing: the caller reads the key again and decides again.
pub async fn compare_and_set(
    store: &kv::Store,
    key: &str,
    value: bytes::Bytes,
    revision: Option<u64>,
) -> Result<u64, CasError> {
    match revision {
        Some(revision) => store.update(key, value, revision).await.map_err(|error| match error.kind() {
            kv::UpdateErrorKind::WrongLastRevision => CasError::Conflict,
            _ => CasError::Update(error),
        }),
        None => store.create(key, value).await.map_err(|error| match error.kind() {
            kv::CreateErrorKind::AlreadyExists => CasError::Conflict,
            _ => CasError::Create(error),
        }),
    }
}

/// How long a service keeps trying to open its streams and buckets at start.
pub const START_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// Run `attempt` until it succeeds or `START_RETRY` has passed: at start, a NATS cluster that is electing leaders
/// (a node just restarted, or the cluster just formed) answers JetStream requests with errors that pass.
pub async fn retry_at_start<T, E, F, Fut>(what: &str, mut attempt: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + START_RETRY;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::info!(%error, "{what} is not ready yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Check a configured replica count.
pub fn check_replicas(name: &'static str, replicas: usize) -> Result<(), crate::ConfigError> {
    if REPLICAS.contains(&replicas) {
        Ok(())
    } else {
        Err(crate::ConfigError::Invalid { name, message: "must be 1..=5".into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kv_message_records_its_operation_in_a_header() {
        let mut headers = async_nats::HeaderMap::new();
        assert_eq!(kv_operation(&headers), kv::Operation::Put);
        headers.insert("KV-Operation", "DEL");
        assert_eq!(kv_operation(&headers), kv::Operation::Delete);
        headers.insert("KV-Operation", "PURGE");
        assert_eq!(kv_operation(&headers), kv::Operation::Purge);
        let mut marker = async_nats::HeaderMap::new();
        marker.insert("Nats-Marker-Reason", "MaxAge");
        assert_eq!(kv_operation(&marker), kv::Operation::Purge);
        marker.insert("Nats-Marker-Reason", "Remove");
        assert_eq!(kv_operation(&marker), kv::Operation::Delete);
    }

    #[test]
    fn a_nats_url_names_one_server_or_a_cluster() {
        assert_eq!(server_addrs("nats://127.0.0.1:4222").unwrap().len(), 1);
        let cluster = server_addrs("nats://a:4222, nats://b:4223,nats://c:4224").unwrap();
        let ports: Vec<u16> = cluster.iter().map(ServerAddr::port).collect();
        assert_eq!(ports, [4222, 4223, 4224]);
        assert!(server_addrs("").is_err());
        assert!(server_addrs(" , ").is_err());
        let refused = server_addrs("nats://u:secret@a:4222,http://b:1").unwrap_err().to_string();
        assert!(!refused.contains("secret"), "{refused}");
    }
}
