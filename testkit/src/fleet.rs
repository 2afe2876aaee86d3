//! The in-process fleet (behind the default `fleet` feature): a real fleet (gateways, router shards, a persistor on
//! an embedded or CQL store) started inside the test process with the same `run` functions the binaries call,
//! against the NATS, Redis and Cassandra that `cargo xtask test` started. Nothing here stands in for a server.
//!
//! Fleets share one NATS, so the tests of a binary run their fleets one at a time. Also here: helpers for the admin
//! and tenant HTTP APIs, JWT minting with freshly generated keys, a private `redis-server` for outage tests, and
//! [`wait_for_balanced_shards`] for tests that run router shards as processes of their own. It does not start
//! router-shard processes (tests that need them own their lifecycle, with [`crate::process`]).

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use switchyard_client::{Auth, Client, ConnectOptions, Format};
use switchyard_gateway::GatewayConfig;
use switchyard_persistor::store::cql::CqlStore;
use switchyard_persistor::store::embedded::EmbeddedStore;
use switchyard_persistor::{AnyStore, PersistorConfig};
use switchyard_router_shard::RouterConfig;
use switchyard_service::config::Settings as _;
use tokio::sync::{Mutex, MutexGuard};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

static ONE_FLEET_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The NATS server of this test run.
pub fn nats_url() -> String {
    std::env::var("SWITCHYARD_TEST_NATS_URL")
        .expect("SWITCHYARD_TEST_NATS_URL is not set: run the tests with `cargo xtask test`, which starts NATS")
}

/// The NATS servers of this test run, one per node (`SWITCHYARD_TEST_NATS_URL` may list a cluster's nodes, comma
/// separated): what a test's own NATS client connects to, so it reconnects to another node when one dies.
pub fn nats_servers() -> Vec<String> {
    nats_url().split(',').map(|url| url.trim().to_owned()).filter(|url| !url.is_empty()).collect()
}

/// Replicas of every stream and bucket the fleet creates: `SWITCHYARD_TEST_NATS_REPLICAS` (3 when the tests run
/// against a NATS cluster), else 1.
pub fn nats_replicas() -> usize {
    match std::env::var("SWITCHYARD_TEST_NATS_REPLICAS") {
        Ok(value) => value.trim().parse().expect("SWITCHYARD_TEST_NATS_REPLICAS is a number"),
        Err(_) => 1,
    }
}

/// The Redis server of this test run.
pub fn redis_url() -> String {
    std::env::var("SWITCHYARD_TEST_REDIS_URL")
        .expect("SWITCHYARD_TEST_REDIS_URL is not set: run the tests with `cargo xtask test`, which starts Redis")
}

pub struct Fleet {
    /// Base HTTP URL of each gateway (which serves its own `/metrics`).
    pub gateways: Vec<String>,
    /// Base HTTP URL of each in-process router shard's metrics listener.
    pub router_metrics: Vec<String>,
    /// Base HTTP URL of the persistor's metrics listener.
    pub persistor_metrics: String,
    pub admin_token: String,
    /// The persistor's store, shared with the test for inspection.
    pub store: Arc<AnyStore>,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Panics in this process before the fleet started: [`Fleet::stop`] fails the test on any more.
    panics_at_start: u64,
    _dir: tempfile::TempDir,
    _turn: MutexGuard<'static, ()>,
}

/// Which history store the fleet's persistor writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// redb in the fleet's temporary directory.
    Embedded,
    /// The real Cassandra named by `SWITCHYARD_TEST_CQL`.
    Cql,
}

/// The Cassandra of this test run, as `host:port`.
pub fn cql_node() -> String {
    std::env::var("SWITCHYARD_TEST_CQL")
        .expect("SWITCHYARD_TEST_CQL is not set: run the tests with `cargo xtask test`, which starts Cassandra")
}

pub struct Tenant {
    pub project_id: String,
    pub api_key: String,
}

impl Fleet {
    /// Start `gateways` gateways and `routers` in-process router shards (0: the test runs its own) on the embedded
    /// store.
    pub async fn start(gateways: usize, routers: usize) -> Fleet {
        Self::start_with(gateways, routers, |_| {}).await
    }

    /// Start a fleet, letting the test adjust the gateways' configuration.
    pub async fn start_with(gateways: usize, routers: usize, adjust: impl Fn(&mut GatewayConfig)) -> Fleet {
        Self::start_on(StoreKind::Embedded, gateways, routers, adjust).await
    }

    /// Start a fleet whose persistor writes to the given store.
    pub async fn start_on(
        store: StoreKind,
        gateways: usize,
        routers: usize,
        adjust: impl Fn(&mut GatewayConfig),
    ) -> Fleet {
        let turn = ONE_FLEET_AT_A_TIME.lock().await;
        let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
        switchyard_service::telemetry::count_panics();
        let panics_at_start = switchyard_service::telemetry::panics_seen();
        let shutdown = CancellationToken::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let admin_token = format!("admin-{}", switchyard_protocol::ids::random_base62(24));
        let mut tasks = Vec::new();

        let mut router_ids = Vec::new();
        let mut router_metrics = Vec::new();
        for i in 0..routers {
            let config = RouterConfig {
                nats_url: nats_url(),
                nats_replicas: nats_replicas(),
                router_id: format!("test-router-{i}-{}", switchyard_protocol::ids::random_base62(6)),
                metrics_addr: "127.0.0.1:0".parse().expect("addr"),
                ..RouterConfig::default()
            };
            router_ids.push(config.router_id.clone());
            config.validate().expect("router config");
            let bound = switchyard_router_shard::bind(config, shutdown.clone()).await.expect("bind router shard");
            router_metrics.push(format!("http://{}", bound.metrics_addr()));
            tasks.push(tokio::spawn(async move {
                if let Err(error) = bound.serve().await {
                    panic!("router shard failed: {error}");
                }
            }));
        }

        wait_for_balanced_shards(&router_ids).await;

        let store = Arc::new(match store {
            StoreKind::Embedded => {
                AnyStore::Embedded(EmbeddedStore::open(&dir.path().join("history.redb")).expect("open embedded store"))
            }
            StoreKind::Cql => {
                AnyStore::Cql(CqlStore::connect(&[cql_node()], "switchyard_e2e").await.expect("connect to Cassandra"))
            }
        });
        let persistor_config = PersistorConfig {
            nats_url: nats_url(),
            nats_replicas: nats_replicas(),
            metrics_addr: "127.0.0.1:0".parse().expect("addr"),
            ..PersistorConfig::default()
        };
        let persistor = switchyard_persistor::bind_with_store(persistor_config, store.clone(), shutdown.clone())
            .await
            .expect("bind persistor");
        let persistor_metrics = format!("http://{}", persistor.metrics_addr());
        tasks.push(tokio::spawn(async move {
            if let Err(error) = persistor.serve().await {
                panic!("persistor failed: {error}");
            }
        }));

        let mut urls = Vec::new();
        for _ in 0..gateways {
            let (url, task) = start_gateway(&admin_token, &shutdown, &adjust).await;
            urls.push(url);
            tasks.push(task);
        }
        Fleet {
            gateways: urls,
            router_metrics,
            persistor_metrics,
            admin_token,
            store,
            http: reqwest::Client::new(),
            shutdown,
            tasks,
            panics_at_start,
            _dir: dir,
            _turn: turn,
        }
    }

    /// Start one more gateway, configured by `adjust` (for instance with the demo enabled for a tenant created
    /// after the fleet started); its index in `gateways`. It stops with the fleet.
    pub async fn add_gateway(&mut self, adjust: impl Fn(&mut GatewayConfig)) -> usize {
        let (url, task) = start_gateway(&self.admin_token, &self.shutdown, &adjust).await;
        self.gateways.push(url);
        self.tasks.push(task);
        self.gateways.len() - 1
    }

    pub fn ws_url(&self, gateway: usize) -> String {
        format!("{}/v1/ws", self.gateways[gateway].replacen("http://", "ws://", 1))
    }

    pub async fn create_tenant(&self) -> Tenant {
        let response = self
            .http
            .post(format!("{}/v1/admin/tenants", self.gateways[0]))
            .bearer_auth(&self.admin_token)
            .json(&json!({"name": "test tenant"}))
            .send()
            .await
            .expect("create tenant");
        assert_eq!(response.status(), 201, "create tenant: {:?}", response.text().await);
        let body: Value = response.json().await.expect("tenant body");
        Tenant {
            project_id: body["project_id"].as_str().expect("project_id").to_owned(),
            api_key: body["api_key"].as_str().expect("api_key").to_owned(),
        }
    }

    pub async fn token(&self, tenant: &Tenant, user: &str) -> String {
        let response = self
            .http
            .post(format!("{}/v1/tokens", self.gateways[0]))
            .bearer_auth(&tenant.api_key)
            .json(&json!({"user_id": user, "ttl_secs": 600}))
            .send()
            .await
            .expect("create token");
        assert_eq!(response.status(), 201, "create token: {:?}", response.text().await);
        let body: Value = response.json().await.expect("token body");
        body["token"].as_str().expect("token").to_owned()
    }

    pub async fn connect(&self, gateway: usize, token: &str, format: Format) -> Client {
        let options = ConnectOptions::new(self.ws_url(gateway), Auth::Header(token.to_owned())).with_format(format);
        Client::connect(options).await.expect("connect")
    }

    /// Stop everything and wait for it, so router shards hand their leases back.
    /// Stop every service of the fleet, and fail the test if any thread or task of the process panicked while the
    /// fleet ran (a panic in a gateway, router shard or persistor task is a bug even when the test's checks pass).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        let panics = switchyard_service::telemetry::panics_seen() - self.panics_at_start;
        assert_eq!(
            panics, 0,
            "{panics} panic(s) in the fleet's tasks during this test; see \"panicked at\" in its output"
        );
    }
}

/// Bind a gateway on a free port of 127.0.0.1 and serve it until `shutdown`; its base URL and task.
async fn start_gateway(
    admin_token: &str,
    shutdown: &CancellationToken,
    adjust: &impl Fn(&mut GatewayConfig),
) -> (String, JoinHandle<()>) {
    let mut config = GatewayConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        nats_url: nats_url(),
        nats_replicas: nats_replicas(),
        redis_url: redis_url(),
        admin_token: admin_token.to_owned(),
        ..GatewayConfig::default()
    };
    adjust(&mut config);
    config.validate().expect("gateway config");
    let bound = switchyard_gateway::bind(config, shutdown.clone()).await.expect("bind gateway");
    let url = format!("http://{}", bound.local_addr());
    let task = tokio::spawn(async move {
        if let Err(error) = bound.serve().await {
            panic!("gateway failed: {error}");
        }
    });
    (url, task)
}

/// Wait until every shard is held by one of `routers`, each holding its fair share, so tests do not start while
/// shards are still moving between the fleet's router shards.
pub async fn wait_for_balanced_shards(routers: &[String]) {
    if routers.is_empty() {
        return;
    }
    let nats = async_nats::connect(nats_servers()).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(nats);
    let shard_count = usize::from(switchyard_protocol::limits::DEFAULT_SHARD_COUNT);
    let fair_share = shard_count.div_ceil(routers.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "router shards did not settle shard ownership in 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(leases) = js.get_key_value(switchyard_protocol::subjects::LEASES_BUCKET).await else { continue };
        let mut held = std::collections::HashMap::<String, usize>::new();
        for shard in 0..shard_count {
            let key = switchyard_protocol::subjects::lease_key(switchyard_protocol::ShardId(shard as u16));
            if let Ok(Some(owner)) = leases.get(key).await {
                *held.entry(String::from_utf8_lossy(&owner).into_owned()).or_default() += 1;
            }
        }
        let ours: usize = routers.iter().map(|r| held.get(r).copied().unwrap_or(0)).sum();
        if ours == shard_count && routers.iter().all(|r| held.get(r).copied().unwrap_or(0) <= fair_share) {
            return;
        }
    }
}

/// A JWT signing key and the verification key a tenant registers for it.
pub struct JwtSigner {
    pub alg: jsonwebtoken::Algorithm,
    pub encoding: jsonwebtoken::EncodingKey,
    /// The body of `PUT /v1/admin/tenants/{id}/jwt`.
    pub registration: Value,
}

impl JwtSigner {
    pub fn hs256(secret: &str) -> JwtSigner {
        JwtSigner {
            alg: jsonwebtoken::Algorithm::HS256,
            encoding: jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            registration: json!({"alg": "HS256", "secret": secret}),
        }
    }

    /// A fresh RSA key pair of `bits`; also returns the public PEM.
    pub fn rs256(bits: usize) -> (JwtSigner, String) {
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, bits).expect("RSA key");
        let private_pem = private.to_pkcs8_pem(LineEnding::LF).expect("RSA PEM");
        let public_pem = rsa::RsaPublicKey::from(&private).to_public_key_pem(LineEnding::LF).expect("RSA public PEM");
        let signer = JwtSigner {
            alg: jsonwebtoken::Algorithm::RS256,
            encoding: jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("RSA encoding key"),
            registration: json!({"alg": "RS256", "public_key_pem": public_pem}),
        };
        (signer, public_pem)
    }

    /// A fresh P-256 key pair; also returns the private PEM (to check it is refused as a public key).
    pub fn es256() -> (JwtSigner, String) {
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let private = p256::SecretKey::random(&mut rand_core::OsRng);
        let private_pem = private.to_pkcs8_pem(LineEnding::LF).expect("EC PEM");
        let public_pem = private.public_key().to_public_key_pem(LineEnding::LF).expect("EC public PEM");
        let signer = JwtSigner {
            alg: jsonwebtoken::Algorithm::ES256,
            encoding: jsonwebtoken::EncodingKey::from_ec_pem(private_pem.as_bytes()).expect("EC encoding key"),
            registration: json!({"alg": "ES256", "public_key_pem": public_pem}),
        };
        (signer, private_pem.to_string())
    }

    /// Sign `claims` as they are.
    pub fn sign(&self, claims: &Value) -> String {
        jsonwebtoken::encode(&jsonwebtoken::Header::new(self.alg), claims, &self.encoding).expect("sign JWT")
    }

    /// A token for `user` of `tenant`, valid for `ttl_secs` (negative: already expired), with extra claims.
    pub fn token(&self, tenant: &Tenant, user: &str, ttl_secs: i64, extra: Value) -> String {
        let mut claims = json!({"sub": user, "pid": tenant.project_id, "exp": unix_secs() + ttl_secs});
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                claims.insert(k.clone(), v.clone());
            }
        }
        self.sign(&claims)
    }
}

pub fn unix_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64
}

/// An unsigned token with `alg: none`.
pub fn alg_none_token(claims: &Value) -> String {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(claims))
}

/// An HTTP answer: status and JSON body (`Null` when there is none).
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Fleet {
    /// Call the HTTP API of `gateway` with a bearer token and an optional JSON body.
    pub async fn call(
        &self,
        gateway: usize,
        method: reqwest::Method,
        path: &str,
        bearer: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self.http.request(method, format!("{}{path}", self.gateways[gateway])).bearer_auth(bearer);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("HTTP request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        Answer { status, body: serde_json::from_str(&text).unwrap_or(Value::Null) }
    }

    /// `PUT /v1/admin/tenants/{id}/jwt`, expecting 204.
    pub async fn set_jwt(&self, tenant: &Tenant, signer: &JwtSigner) {
        let path = format!("/v1/admin/tenants/{}/jwt", tenant.project_id);
        let answer =
            self.call(0, reqwest::Method::PUT, &path, &self.admin_token, Some(signer.registration.clone())).await;
        assert_eq!(answer.status, 204, "set JWT key: {}", answer.body);
    }

    /// `PUT /v1/admin/tenants/{id}/limits`, expecting 204.
    pub async fn set_limits(&self, tenant: &Tenant, limits: Value) {
        let path = format!("/v1/admin/tenants/{}/limits", tenant.project_id);
        let answer = self.call(0, reqwest::Method::PUT, &path, &self.admin_token, Some(limits)).await;
        assert_eq!(answer.status, 204, "set limits: {}", answer.body);
    }

    /// Connect without panicking: the client, or how the attempt failed.
    pub async fn try_connect(&self, gateway: usize, auth: Auth) -> Result<Client, switchyard_client::ClientError> {
        let mut options = ConnectOptions::new(self.ws_url(gateway), auth);
        options.connect_timeout = Duration::from_secs(15);
        Client::connect(options).await
    }
}

/// The HTTP status of a refused upgrade, or the close code of a refused first-frame auth; panics when admitted.
pub fn refusal(result: Result<Client, switchyard_client::ClientError>) -> u16 {
    match result {
        Ok(client) => panic!("admitted as {:?}", client.hello()),
        Err(switchyard_client::ClientError::Http { status, .. }) => status,
        Err(error) => error.close_code().unwrap_or_else(|| panic!("refused without a status or close code: {error:?}")),
    }
}

/// A `redis-server` of the test's own, on a free port, killed when dropped (also when the test panics).
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let mut redis = OwnRedis { port, child: None };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port, and wait until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let binary = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
            .map(|dir| dir.join("redis-server"))
            .find(|path| path.is_file())
            .expect("redis-server on PATH");
        let child = std::process::Command::new(binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let mut reply = [0u8; 7];
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream.read_exact(&mut reply).is_ok()
                    && &reply == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(std::time::Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill it (SIGKILL) and wait until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
