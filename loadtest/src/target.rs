//! What a run talks to: the fleet named by the fleet file (loopback only), a tenant of its own created through the
//! admin API with an HS256 key so tokens are signed here rather than minted one request at a time, and the gateway
//! process found by its listening port.
//!
//! It never targets an address outside 127.0.0.0/8 and it does not start or stop the fleet.

use anyhow::{bail, Context, Result};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The fleet's addresses and admin token, from the file `cargo xtask up` writes.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub http: String,
    pub ws: String,
    admin_token: String,
}

impl Fleet {
    pub fn from_file(path: &Path) -> Result<Fleet> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading {} (start a fleet with `cargo xtask up` first)", path.display()))?;
        let file: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        let field = |name: &str| -> Result<String> {
            Ok(file[name].as_str().with_context(|| format!("{} has no {name:?}", path.display()))?.to_owned())
        };
        let fleet = Fleet { http: field("http")?, ws: field("ws")?, admin_token: field("admin_token")? };
        require_loopback(&fleet.http)?;
        require_loopback(&fleet.ws)?;
        Ok(fleet)
    }

    /// The port the gateway listens on.
    pub fn port(&self) -> Result<u16> {
        port_of(&self.ws)
    }

    /// A tenant for this run alone: HS256 tokens, no message-rate or connection cap.
    pub async fn create_tenant(&self, http: &reqwest::Client, run_id: &str) -> Result<Tenant> {
        let created: Value = self
            .admin(
                http.post(format!("{}/v1/admin/tenants", self.http))
                    .json(&json!({"name": format!("loadtest {run_id}")})),
            )
            .await?
            .json()
            .await?;
        let project_id = created["project_id"].as_str().context("no project_id in the created tenant")?.to_owned();
        let api_key = created["api_key"].as_str().context("no api_key in the created tenant")?.to_owned();
        let secret = hex::encode(rand::random::<[u8; 32]>());
        self.admin(
            http.put(format!("{}/v1/admin/tenants/{project_id}/jwt", self.http))
                .json(&json!({"alg": "HS256", "secret": secret})),
        )
        .await?;
        self.admin(
            http.put(format!("{}/v1/admin/tenants/{project_id}/limits", self.http))
                .json(&json!({"msgs_per_sec": 10_000_000u32, "msgs_burst": 10_000_000u32})),
        )
        .await?;
        Ok(Tenant { project_id, api_key, key: EncodingKey::from_secret(secret.as_bytes()) })
    }

    /// Delete a run's tenant; its history goes with it.
    pub async fn delete_tenant(&self, http: &reqwest::Client, tenant: &Tenant) -> Result<()> {
        self.admin(http.delete(format!("{}/v1/admin/tenants/{}", self.http, tenant.project_id))).await?;
        Ok(())
    }

    async fn admin(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request.bearer_auth(&self.admin_token).timeout(Duration::from_secs(10)).send().await?;
        if !response.status().is_success() {
            let status = response.status();
            bail!("admin API answered {status}: {}", response.text().await.unwrap_or_default());
        }
        Ok(response)
    }
}

/// A run's tenant and the key its tokens are signed with.
pub struct Tenant {
    pub project_id: String,
    /// The tenant's API key, for its backend's HTTP API.
    pub api_key: String,
    key: EncodingKey,
}

impl Tenant {
    /// A JWT for `user`, valid for two hours.
    pub fn token(&self, user: &str) -> Result<String> {
        let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 7200;
        let claims = json!({"sub": user, "pid": self.project_id, "exp": exp});
        Ok(jsonwebtoken::encode(&Header::default(), &claims, &self.key)?)
    }
}

/// Refuse any target that is not on this machine's loopback.
pub fn require_loopback(url: &str) -> Result<()> {
    let host = url.split("://").nth(1).unwrap_or("").split(['/', ':']).next().unwrap_or("");
    let loopback = host == "localhost" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("refusing to load {url}: only loopback (127.0.0.0/8, localhost) targets are allowed");
    }
    Ok(())
}

fn port_of(url: &str) -> Result<u16> {
    let authority = url.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
    authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).with_context(|| format!("no port in {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_allowed() {
        for ok in ["http://127.0.0.1:8080", "ws://127.3.2.1:1/v1/ws", "http://localhost:9"] {
            assert!(require_loopback(ok).is_ok(), "{ok}");
        }
        for bad in ["http://10.0.0.1:80", "ws://192.168.1.2/v1/ws", "http://example.com", "http://8.8.8.8"] {
            assert!(require_loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_are_read_from_urls() {
        assert_eq!(port_of("ws://127.0.0.1:4567/v1/ws").unwrap(), 4567);
        assert!(port_of("ws://127.0.0.1/v1/ws").is_err());
    }
}
