//! Test support: a real fleet (gateways, router shards, a persistor on an embedded store) started inside the test
//! process with the same `run` functions the binaries call, against the NATS and Redis that `cargo xtask test`
//! started. Nothing here stands in for a server.
//!
//! Fleets share one NATS, so the tests of a binary run their fleets one at a time.

#![allow(dead_code)]

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use switchyard_client::{Auth, Client, ConnectOptions, Format};
use switchyard_gateway::GatewayConfig;
use switchyard_persistor::store::cql::CqlStore;
use switchyard_persistor::store::embedded::EmbeddedStore;
use switchyard_persistor::{AnyStore, PersistorConfig};
use switchyard_router_shard::RouterConfig;
use tokio::sync::{Mutex, MutexGuard};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

static ONE_FLEET_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The NATS server of this test run.
pub fn nats_url() -> String {
    std::env::var("SWITCHYARD_TEST_NATS_URL")
        .expect("SWITCHYARD_TEST_NATS_URL is not set: run the tests with `cargo xtask test`, which starts NATS")
}

/// The Redis server of this test run.
pub fn redis_url() -> String {
    std::env::var("SWITCHYARD_TEST_REDIS_URL")
        .expect("SWITCHYARD_TEST_REDIS_URL is not set: run the tests with `cargo xtask test`, which starts Redis")
}

pub struct Fleet {
    /// Base HTTP URL of each gateway.
    pub gateways: Vec<String>,
    pub admin_token: String,
    /// The persistor's store, shared with the test for inspection.
    pub store: Arc<AnyStore>,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    _dir: tempfile::TempDir,
    _turn: MutexGuard<'static, ()>,
}

/// Which history store the fleet's persistor writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// redb in the fleet's temporary directory.
    Embedded,
    /// The real Cassandra named by `SWITCHYARD_CQL`.
    Cql,
}

/// The Cassandra of this test run, as `host:port`.
pub fn cql_node() -> String {
    std::env::var("SWITCHYARD_CQL")
        .expect("SWITCHYARD_CQL is not set: run the tests with `cargo xtask test`, which starts Cassandra")
}

pub struct Tenant {
    pub project_id: String,
    pub api_key: String,
}

impl Fleet {
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
        let shutdown = CancellationToken::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let admin_token = format!("admin-{}", switchyard_protocol::ids::random_base62(24));
        let mut tasks = Vec::new();

        let mut router_ids = Vec::new();
        for i in 0..routers {
            let config = RouterConfig {
                nats_url: nats_url(),
                router_id: format!("test-router-{i}-{}", switchyard_protocol::ids::random_base62(6)),
                ..RouterConfig::default()
            };
            router_ids.push(config.router_id.clone());
            config.validate().expect("router config");
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(error) = switchyard_router_shard::run(config, shutdown).await {
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
        let persistor_config = PersistorConfig { nats_url: nats_url(), ..PersistorConfig::default() };
        {
            let (store, shutdown) = (store.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(error) = switchyard_persistor::run_with_store(persistor_config, store, shutdown).await {
                    panic!("persistor failed: {error}");
                }
            }));
        }

        let mut urls = Vec::new();
        for _ in 0..gateways {
            let mut config = GatewayConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                nats_url: nats_url(),
                redis_url: redis_url(),
                admin_token: admin_token.clone(),
                ..GatewayConfig::default()
            };
            adjust(&mut config);
            config.validate().expect("gateway config");
            let bound = switchyard_gateway::bind(config, shutdown.clone()).await.expect("bind gateway");
            urls.push(format!("http://{}", bound.local_addr()));
            tasks.push(tokio::spawn(async move {
                if let Err(error) = bound.serve().await {
                    panic!("gateway failed: {error}");
                }
            }));
        }
        Fleet {
            gateways: urls,
            admin_token,
            store,
            http: reqwest::Client::new(),
            shutdown,
            tasks,
            _dir: dir,
            _turn: turn,
        }
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
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// Wait until every shard is held by one of `routers`, each holding its fair share, so tests do not start while
/// shards are still moving between the fleet's router shards.
async fn wait_for_balanced_shards(routers: &[String]) {
    if routers.is_empty() {
        return;
    }
    let nats = async_nats::connect(nats_url()).await.expect("connect to NATS");
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

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
