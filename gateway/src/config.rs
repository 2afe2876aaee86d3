//! The gateway's configuration: one typed struct, read from an optional TOML file and then from one
//! `SWITCHYARD_<KEY>` environment variable per key (`switchyard_service::config`), validated before anything starts.
//!
//! This module does not connect to anything.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use switchyard_protocol::limits;

/// Everything a gateway needs to start.
#[derive(Clone, Serialize, Deserialize)]
// Unknown keys are refused by the loader (`switchyard_service::config`), which serde cannot do with a flattened
// field.
#[serde(default)]
pub struct GatewayConfig {
    /// Where to listen for HTTP and WebSocket; port 0 picks a free port.
    pub listen: SocketAddr,
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// How to authenticate to NATS and secure the connection (`nats_user`, `nats_tls_ca_file`, ...).
    #[serde(flatten)]
    pub nats_auth: switchyard_service::nats::NatsAuth,
    /// OpenTelemetry traces (`otlp_endpoint`, `otlp_sample_ratio`); off unless an endpoint is set.
    #[serde(flatten)]
    pub traces: switchyard_service::trace::TraceSettings,
    /// Replicas of the tenants bucket when a gateway creates it (3 on a NATS cluster, 1 for one server).
    pub nats_replicas: usize,
    /// Redis URL, e.g. `redis://127.0.0.1:6379`, or `rediss://host:6380` for TLS.
    pub redis_url: String,
    /// Redis ACL user name; overrides one in `redis_url`.
    pub redis_username: Option<String>,
    /// Password of the Redis user (or of `requirepass`); overrides one in `redis_url`. A secret.
    pub redis_password: Option<String>,
    /// With a `rediss://` URL: PEM bundle of the CAs that sign the server's certificate; without it the system's
    /// roots are trusted.
    pub redis_tls_ca_file: Option<PathBuf>,
    /// With a `rediss://` URL: client certificate (PEM, with `redis_tls_key_file`) for servers that verify clients.
    pub redis_tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub redis_tls_key_file: Option<PathBuf>,
    /// Bearer token of the admin API. Required.
    pub admin_token: String,
    /// Number of virtual shards; must match the router shards'.
    pub shard_count: u16,
    /// Largest accepted client frame, in bytes.
    pub max_frame_bytes: usize,
    /// Largest message body, in bytes.
    pub max_body_bytes: usize,
    /// Largest `attrs`, in bytes of JSON.
    pub max_attrs_bytes: usize,
    /// Outbound queue bound per session, in frames and in bytes.
    pub outbound_queue_frames: usize,
    pub outbound_queue_bytes: usize,
    /// Interval of server pings; a client silent for two intervals is closed with 4010.
    pub heartbeat_ms: u64,
    /// How long a socket may stay unauthenticated after the upgrade.
    pub auth_timeout_ms: u64,
    /// How long a command may wait for its router shard, including retries while a shard changes hands.
    pub command_timeout_ms: u64,
    /// Per-connection op rate: sustained ops per second and burst.
    pub ops_per_sec: u32,
    pub ops_burst: u32,
    /// Allowed `Origin` values for WebSocket upgrades; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Most events one `join {since}` replays; a longer gap is answered `resume_gap`.
    pub resume_max_events: u64,
    /// Most replays (`join {since}`) this gateway runs at once; more wait their turn. Bounds the memory replays
    /// take: each holds one batch of events besides its session's outbound queue.
    pub resume_concurrency: usize,
    /// How long a replay may wait for its client to read (its outbound queue to make room) before the session is
    /// closed as a slow consumer (4009), in milliseconds.
    pub resume_stall_ms: u64,
    /// Rate-limited ops a connection may run into within `abuse_window_ms` before it is closed with 4008.
    pub abuse_limit: u32,
    pub abuse_window_ms: u64,
    /// Default fleet-wide message rate (and burst) per tenant, counted in Redis; 0 disables it. Tenants may have
    /// their own (admin API).
    pub tenant_msgs_per_sec: u32,
    pub tenant_msgs_burst: u32,
    /// Default quotas of live sockets across the fleet, per tenant (none by default) and per user (100 by
    /// default; `None` for none). Tenants may have their own.
    pub max_connections_per_tenant: Option<u32>,
    pub max_connections_per_user: Option<u32>,
    /// Default quotas of every tenant (each may have its own): members per room, rooms per user (both at most
    /// 10,000), and whether only the tenant's backend creates rooms.
    pub max_members_per_room: u32,
    pub max_rooms_per_user: u32,
    pub backend_creates_rooms: bool,
    /// Default number of users one session may watch (at most 10,000); tenants may have their own.
    pub max_watched_per_session: u32,
    /// Sockets on this gateway that have upgraded without a token and not yet sent their first-frame `auth`; past
    /// it, an upgrade without a token is refused with 503.
    pub max_unauthenticated: usize,
    /// Default quota of rooms per tenant (each may have its own); none when unset.
    pub max_rooms_per_tenant: Option<u64>,
    /// How long a client may take to send a request's headers (from connecting, or from the previous response)
    /// before the connection is closed.
    pub header_read_timeout_ms: u64,
    /// Longest time an HTTP API request may take, reading its body included.
    pub request_timeout_ms: u64,
    /// Largest HTTP request body, in bytes.
    pub max_http_body_bytes: usize,
    /// Draining (SIGTERM): each socket's `bye` carries a `reconnect_after_ms` drawn uniformly from
    /// `[0, drain_reconnect_window_ms)`, so the clients of a drained gateway do not all reconnect at once.
    pub drain_reconnect_window_ms: u64,
    /// Draining: how long after SIGTERM the process may take to finish in-flight ops, say `bye`, close every socket
    /// and exit. Must be shorter than the pod's termination grace period minus its preStop sleep.
    pub drain_grace_ms: u64,
    /// The tenant of the demo chat page. When set, the gateway serves the page at `/` and `POST /demo/v1/session`,
    /// which hands a token for ANY user of this tenant to anyone who asks: for local trials only, never in
    /// production. Unset (the default) turns the demo off.
    pub demo_project_id: Option<String>,
    /// Networks (`127.0.0.0/8`, `10.1.2.3`) that tenants' hooks may reach although they are loopback, private or
    /// link-local. Empty by default: a hook URL that is or resolves to such an address is refused.
    pub hooks_allowed_networks: Vec<String>,
    /// Pre-send hook calls one tenant may have in flight on this gateway; a call that finds none free within its
    /// deadline fails, and the tenant's failure policy applies.
    pub hooks_concurrency_per_tenant: usize,
}

impl GatewayConfig {
    /// The networks hooks may reach although reserved; the ones that do not parse are left out (validation has
    /// refused them already).
    pub fn hooks_allowed_networks(&self) -> Vec<crate::outbound::Network> {
        self.hooks_allowed_networks.iter().filter_map(|text| crate::outbound::Network::parse(text).ok()).collect()
    }
}

impl std::fmt::Debug for GatewayConfig {
    /// Secrets stay out of debug output: the admin token is never shown, URLs lose their credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("listen", &self.listen)
            .field("nats_url", &redact_url(&self.nats_url))
            .field("nats_auth", &self.nats_auth)
            .field("traces", &self.traces)
            .field("nats_replicas", &self.nats_replicas)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("redis_username", &self.redis_username)
            .field("redis_password", &self.redis_password.as_ref().map(|_| "<redacted>"))
            .field("redis_tls_ca_file", &self.redis_tls_ca_file)
            .field("redis_tls_cert_file", &self.redis_tls_cert_file)
            .field("admin_token", &"<redacted>")
            .field("shard_count", &self.shard_count)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_attrs_bytes", &self.max_attrs_bytes)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("auth_timeout_ms", &self.auth_timeout_ms)
            .field("ops_per_sec", &self.ops_per_sec)
            .field("ops_burst", &self.ops_burst)
            .field("allowed_origins", &self.allowed_origins)
            .field("tenant_msgs_per_sec", &self.tenant_msgs_per_sec)
            .field("max_connections_per_tenant", &self.max_connections_per_tenant)
            .field("max_connections_per_user", &self.max_connections_per_user)
            .field("max_members_per_room", &self.max_members_per_room)
            .field("max_rooms_per_user", &self.max_rooms_per_user)
            .field("backend_creates_rooms", &self.backend_creates_rooms)
            .field("max_watched_per_session", &self.max_watched_per_session)
            .field("max_unauthenticated", &self.max_unauthenticated)
            .field("max_rooms_per_tenant", &self.max_rooms_per_tenant)
            .field("header_read_timeout_ms", &self.header_read_timeout_ms)
            .field("drain_reconnect_window_ms", &self.drain_reconnect_window_ms)
            .field("drain_grace_ms", &self.drain_grace_ms)
            .field("demo_project_id", &self.demo_project_id)
            .field("hooks_allowed_networks", &self.hooks_allowed_networks)
            .field("hooks_concurrency_per_tenant", &self.hooks_concurrency_per_tenant)
            .finish_non_exhaustive()
    }
}

/// A URL with any `user:password@` removed, for logs and errors. Handles comma-separated lists.
pub use switchyard_service::redact_url;

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            traces: Default::default(),
            nats_replicas: 1,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_username: None,
            redis_password: None,
            redis_tls_ca_file: None,
            redis_tls_cert_file: None,
            redis_tls_key_file: None,
            admin_token: String::new(),
            shard_count: limits::DEFAULT_SHARD_COUNT,
            max_frame_bytes: limits::MAX_FRAME_BYTES,
            max_body_bytes: limits::MAX_BODY_BYTES,
            max_attrs_bytes: limits::MAX_ATTRS_BYTES,
            outbound_queue_frames: limits::OUTBOUND_QUEUE_FRAMES,
            outbound_queue_bytes: limits::OUTBOUND_QUEUE_BYTES,
            heartbeat_ms: limits::HEARTBEAT_MS,
            auth_timeout_ms: 5_000,
            command_timeout_ms: 10_000,
            ops_per_sec: 20,
            ops_burst: 40,
            allowed_origins: Vec::new(),
            resume_max_events: 10_000,
            resume_concurrency: 32,
            resume_stall_ms: 5_000,
            abuse_limit: 40,
            abuse_window_ms: 10_000,
            tenant_msgs_per_sec: 1_000,
            tenant_msgs_burst: 2_000,
            max_connections_per_tenant: None,
            max_connections_per_user: Some(limits::MAX_CONNECTIONS_PER_USER),
            max_members_per_room: limits::MAX_MEMBERS_PER_ROOM,
            max_rooms_per_user: limits::MAX_ROOMS_PER_USER,
            backend_creates_rooms: false,
            max_watched_per_session: limits::WATCHED_PER_SESSION,
            max_unauthenticated: 10_000,
            max_rooms_per_tenant: None,
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            max_http_body_bytes: 64 * 1024,
            drain_reconnect_window_ms: 10_000,
            drain_grace_ms: 15_000,
            demo_project_id: None,
            hooks_allowed_networks: Vec::new(),
            hooks_concurrency_per_tenant: 16,
        }
    }
}

use switchyard_service::config::{Checks, Settings};
pub use switchyard_service::ConfigError;

impl Settings for GatewayConfig {
    const SECRET_KEYS: &'static [&'static str] = &["admin_token", "redis_password"];
    const URL_KEYS: &'static [&'static str] = &["nats_url", "redis_url", "otlp_endpoint"];

    fn problems(&self) -> Vec<ConfigError> {
        let mut checks = Checks::default();
        let c = &mut checks;
        c.require(
            self.admin_token.len() >= 16,
            "admin_token",
            "must be set (SWITCHYARD_ADMIN_TOKEN) and at least 16 characters long",
        );
        c.check(switchyard_service::nats::check_replicas("nats_replicas", self.nats_replicas));
        c.check(switchyard_service::nats::server_addrs(&self.nats_url));
        c.require(self.shard_count != 0 && self.shard_count <= 4096, "shard_count", "must be 1..=4096");
        c.require(
            self.max_frame_bytes >= 1024 && self.max_body_bytes != 0 && self.max_attrs_bytes != 0,
            "max_frame_bytes",
            "frame limit must be at least 1 KiB and body/attrs limits positive",
        );
        c.require(
            self.outbound_queue_frames != 0 && self.outbound_queue_bytes != 0,
            "outbound_queue_frames",
            "outbound queue bounds must be positive",
        );
        c.require(
            self.resume_concurrency != 0 && self.resume_stall_ms != 0,
            "resume_concurrency",
            "replay concurrency and stall limit must be positive",
        );
        c.require(
            self.heartbeat_ms >= 100 && self.auth_timeout_ms != 0 && self.command_timeout_ms != 0,
            "heartbeat_ms",
            "heartbeat must be at least 100 ms and timeouts positive",
        );
        c.require(self.ops_per_sec != 0 && self.ops_burst != 0, "ops_per_sec", "op rate and burst must be positive");
        c.require(
            self.abuse_limit != 0 && self.abuse_window_ms != 0,
            "abuse_limit",
            "abuse limit and window must be positive",
        );
        c.require(
            self.header_read_timeout_ms >= 100 && self.request_timeout_ms >= 100,
            "header_read_timeout_ms",
            "header-read and request timeouts must be at least 100 ms",
        );
        c.require(
            (1..=limits::MAX_MEMBERS_PER_ROOM).contains(&self.max_members_per_room),
            "max_members_per_room",
            format!("must be 1..={}", limits::MAX_MEMBERS_PER_ROOM),
        );
        c.require(
            (1..=limits::MAX_ROOMS_PER_USER).contains(&self.max_rooms_per_user),
            "max_rooms_per_user",
            format!("must be 1..={}", limits::MAX_ROOMS_PER_USER),
        );
        c.require(
            (1..=limits::MAX_WATCHED_PER_SESSION).contains(&self.max_watched_per_session),
            "max_watched_per_session",
            format!("must be 1..={}", limits::MAX_WATCHED_PER_SESSION),
        );
        c.require(self.max_unauthenticated != 0, "max_unauthenticated", "must be positive");
        c.require(self.max_http_body_bytes >= 1024, "max_http_body_bytes", "must be at least 1 KiB");
        c.require(
            (1..=600_000).contains(&self.drain_reconnect_window_ms),
            "drain_reconnect_window_ms",
            "must be 1..=600000 (at most 10 minutes)",
        );
        c.require((1_000..=3_600_000).contains(&self.drain_grace_ms), "drain_grace_ms", "must be 1000..=3600000");
        c.require(
            self.drain_grace_ms > self.command_timeout_ms,
            "drain_grace_ms",
            "must be longer than command_timeout_ms, so an op in flight at SIGTERM can finish before the exit",
        );
        c.require(
            (1..=10_000).contains(&self.hooks_concurrency_per_tenant),
            "hooks_concurrency_per_tenant",
            "must be 1..=10000",
        );
        for network in &self.hooks_allowed_networks {
            if let Err(why) = crate::outbound::Network::parse(network) {
                c.require(false, "hooks_allowed_networks", why.to_string());
            }
        }
        if let Some(project) = &self.demo_project_id {
            c.require(
                switchyard_protocol::ProjectId::parse(project).is_ok(),
                "demo_project_id",
                "must be a project id (pj_ and 20 lowercase alphanumerics)",
            );
        }
        let c = &mut checks;
        let tls_url = self.redis_url.trim_start().starts_with("rediss://");
        let tls_files = self.redis_tls_files();
        c.require(
            tls_url || tls_files == switchyard_service::tls::TlsFiles::default(),
            "redis_tls_ca_file",
            "the Redis TLS files need a rediss:// redis_url",
        );
        checks.extend(tls_files.problems(["redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file"]));
        checks.extend(self.nats_auth.problems());
        checks.extend(self.traces.problems());
        checks.into_problems()
    }
}

impl GatewayConfig {
    /// The Redis TLS files, for a `rediss://` URL.
    pub fn redis_tls_files(&self) -> switchyard_service::tls::TlsFiles {
        switchyard_service::tls::TlsFiles {
            ca_file: self.redis_tls_ca_file.clone(),
            cert_file: self.redis_tls_cert_file.clone(),
            key_file: self.redis_tls_key_file.clone(),
        }
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn auth_timeout(&self) -> Duration {
        Duration::from_millis(self.auth_timeout_ms)
    }
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }
    pub fn abuse_window(&self) -> Duration {
        Duration::from_millis(self.abuse_window_ms)
    }
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn drain_grace(&self) -> Duration {
        Duration::from_millis(self.drain_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use switchyard_service::config::{load, ConfigProblems, Sources};

    const TOKEN: (&str, &str) = ("SWITCHYARD_ADMIN_TOKEN", "0123456789abcdef");

    fn from_env(pairs: &[(&str, &str)]) -> Result<GatewayConfig, ConfigProblems> {
        load(&Sources {
            env: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Sources::default()
        })
    }

    #[test]
    fn every_key_is_set_by_its_variable() {
        switchyard_service::config::assert_every_key_is_set_by_env::<GatewayConfig>();
    }

    #[test]
    fn requires_an_admin_token_and_parses_env() {
        let problems = from_env(&[]).unwrap_err().to_string();
        assert!(problems.contains("admin_token"), "{problems}");
        let config = from_env(&[TOKEN, ("SWITCHYARD_LISTEN", "127.0.0.1:0")]).unwrap();
        assert_eq!(config.listen.port(), 0);
        assert!(from_env(&[TOKEN, ("SWITCHYARD_LISTEN", "nope")]).is_err());
        let config = from_env(&[
            TOKEN,
            ("SWITCHYARD_ALLOWED_ORIGINS", "https://a.example, https://b.example"),
            ("SWITCHYARD_MAX_CONNECTIONS_PER_USER", "none"),
            ("SWITCHYARD_DEMO_PROJECT_ID", ""),
        ])
        .unwrap();
        assert_eq!(config.allowed_origins, ["https://a.example", "https://b.example"]);
        assert_eq!((config.max_connections_per_user, config.demo_project_id), (None, None));
    }

    #[test]
    fn every_problem_is_reported() {
        let problems = from_env(&[("SWITCHYARD_SHARD_COUNT", "0"), ("SWITCHYARD_MAX_UNAUTHENTICATED", "0")])
            .unwrap_err()
            .to_string();
        for key in ["admin_token", "shard_count", "max_unauthenticated"] {
            assert!(problems.lines().any(|line| line.contains(key)), "{key} in {problems}");
        }
    }

    #[test]
    fn drain_timings_are_validated() {
        let mut config = from_env(&[
            TOKEN,
            ("SWITCHYARD_DRAIN_RECONNECT_WINDOW_MS", "3000"),
            ("SWITCHYARD_DRAIN_GRACE_MS", "12000"),
        ])
        .unwrap();
        assert_eq!((config.drain_reconnect_window_ms, config.drain_grace_ms), (3_000, 12_000));
        config.drain_reconnect_window_ms = 0;
        assert!(config.validate().is_err());
        config.drain_reconnect_window_ms = 3_000;
        config.drain_grace_ms = config.command_timeout_ms;
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("drain_grace_ms"), "{error}");
    }

    #[test]
    fn debug_output_holds_no_secrets() {
        let config = GatewayConfig {
            admin_token: "super-secret-admin-token".into(),
            redis_url: "redis://user:hunter2@127.0.0.1:6379".into(),
            nats_url: "nats://a:b@n1:4222,nats://n2:4222".into(),
            ..GatewayConfig::default()
        };
        let text = format!("{config:?}");
        assert!(!text.contains("super-secret") && !text.contains("hunter2") && !text.contains("a:b@"));
        assert!(text.contains("127.0.0.1:6379") && text.contains("nats://n2:4222"));
    }
}
