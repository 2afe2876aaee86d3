//! Requests to URLs a tenant chose (its hooks), made so that a tenant cannot use the gateway to reach what it
//! should not: every address a URL's host stands for is checked at each attempt, and loopback, private, link-local
//! (cloud metadata among them), shared, multicast and unspecified addresses are refused unless the operator allows
//! their network (`hooks_allowed_networks`). The connection goes to the addresses that were checked, redirects are
//! never followed, and an answer is read only up to a bound.
//!
//! This module does not retry and does not decide what a call means; its callers do.

use bytes::Bytes;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// An IP network (`10.0.0.0/8`, `::1/128`, or a bare address for one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

/// Why a network in the configuration is not one.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{0:?} is not an IP network")]
    NotAnAddress(String),
    #[error("{text:?} has a prefix longer than {width} bits")]
    Prefix { text: String, width: u8 },
}

/// An address that is reserved and not allowed, and what kind of address it is.
#[derive(Debug, thiserror::Error)]
#[error("{address} is a {kind} address")]
pub struct ReservedAddress {
    pub address: IpAddr,
    pub kind: &'static str,
}

impl Network {
    pub fn parse(text: &str) -> Result<Network, NetworkError> {
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text.trim(), None),
        };
        let address: IpAddr = address.parse().map_err(|_| NetworkError::NotAnAddress(text.to_owned()))?;
        let width = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(prefix) => match prefix.parse::<u8>() {
                Ok(prefix) if prefix <= width => prefix,
                _ => return Err(NetworkError::Prefix { text: text.to_owned(), width }),
            },
        };
        Ok(Network { address, prefix })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.address, canonical(address)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (bytes, bits) = (usize::from(prefix / 8), prefix % 8);
    a[..bytes] == b[..bytes] && (bits == 0 || (a[bytes] ^ b[bytes]) >> (8 - bits) == 0)
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is that IPv4 address.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// Why an address may not be reached by default, or `None` for a public one.
pub fn reserved_kind(address: IpAddr) -> Option<&'static str> {
    match canonical(address) {
        IpAddr::V4(ip) => reserved_v4(ip),
        IpAddr::V6(ip) => reserved_v6(ip),
    }
}

fn reserved_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        // 169.254.169.254 is the metadata service of most clouds.
        Some("link-local (cloud metadata)")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        Some("IETF protocol assignment")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("benchmarking")
    } else if ip.is_multicast() || ip.is_broadcast() || a >= 240 {
        Some("multicast or reserved")
    } else if ip.is_documentation() {
        Some("documentation")
    } else {
        None
    }
}

fn reserved_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if first & 0xfe00 == 0xfc00 {
        // fd00:ec2::254 (a cloud's metadata service) is among them.
        Some("private (unique local)")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if first & 0xffc0 == 0xfec0 {
        Some("site-local")
    } else if embeds_ipv4(ip) {
        // The IPv4 address inside was not checked, and a translator on the way may reach it.
        Some("IPv4-embedding (IPv4-compatible, SIIT, 6to4, NAT64, Teredo)")
    } else if ip.segments()[..4] == [0x0100, 0, 0, 0] {
        Some("discard-only")
    } else if first == 0x2001 && ip.segments()[1] == 0x0db8 {
        Some("documentation")
    } else {
        None
    }
}

/// IPv6 forms that carry an IPv4 address: `::a.b.c.d`, `::ffff:0:a.b.c.d`, 6to4 `2002::/16`, NAT64 `64:ff9b::/96`
/// and `64:ff9b:1::/48`, Teredo `2001::/32`. (`::ffff:a.b.c.d` is read as its IPv4 address instead.)
fn embeds_ipv4(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    s[..6] == [0; 6]
        || s[..6] == [0, 0, 0, 0, 0xffff, 0]
        || s[0] == 0x2002
        || s[..2] == [0x0064, 0xff9b] && (s[2..6] == [0; 4] || s[2] == 1)
        || s[..2] == [0x2001, 0]
}

/// Which addresses outbound calls may reach.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Reserved networks the operator allows (tests allow loopback).
    allowed: Vec<Network>,
}

impl AddressPolicy {
    pub fn new(allowed: Vec<Network>) -> Self {
        AddressPolicy { allowed }
    }

    /// `Err` with the reason when `address` may not be reached.
    pub fn check(&self, address: IpAddr) -> Result<(), ReservedAddress> {
        match reserved_kind(address) {
            Some(_) if self.allowed.iter().any(|network| network.contains(address)) => Ok(()),
            Some(kind) => Err(ReservedAddress { address, kind }),
            None => Ok(()),
        }
    }
}

/// Why an outbound call did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The URL's host is, or resolves to, an address the policy refuses.
    #[error("refused: {0}")]
    Refused(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The caller's bound on calls in flight left no room within the deadline.
    #[error("too many calls in flight")]
    Busy,
    #[error("the answer is longer than {0} bytes")]
    TooLong(usize),
    #[error("request failed: {0}")]
    Failed(String),
}

/// Name lookups in flight at once for tenants' hooks, over all tenants. Each runs on a blocking thread until the
/// system resolver gives up, whatever the caller's deadline: this bounds the threads a tenant's slow name server
/// can hold.
const LOOKUPS_IN_FLIGHT: usize = 128;
/// How long a checked lookup is what connections to its host use.
const LOOKUP_TTL: Duration = Duration::from_secs(60);
/// Hosts whose checked lookups are kept; the map is emptied when it is full.
const MAX_LOOKUPS_KEPT: usize = 10_000;

/// Checked lookups: host -> the addresses that passed the policy, and when.
type Lookups = Arc<Mutex<HashMap<String, (Vec<SocketAddr>, Instant)>>>;

/// Hands a connection the addresses a call looked up and checked just before it; a host nobody looked up is not
/// resolved at all.
struct CheckedResolver {
    policy: Arc<AddressPolicy>,
    lookups: Lookups,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let fresh = match self.lookups.lock() {
            Ok(lookups) => lookups.get(&host).filter(|(_, at)| at.elapsed() < LOOKUP_TTL).map(|(a, _)| a.clone()),
            Err(_) => None,
        };
        let policy = self.policy.clone();
        Box::pin(async move {
            let addresses = fresh.ok_or_else(|| Box::new(RefusedAddress(format!("{host} was not looked up"))))?;
            if addresses.iter().any(|address| policy.check(address.ip()).is_err()) {
                return Err(Box::new(RefusedAddress(format!("{host} resolves to a reserved address"))) as _);
            }
            let addrs: Addrs = Box::new(addresses.into_iter());
            Ok(addrs)
        })
    }
}

/// The gateway's one client for tenant URLs.
#[derive(Clone)]
pub struct OutboundClient {
    http: reqwest::Client,
    policy: Arc<AddressPolicy>,
    lookups: Lookups,
    /// Turns to run a name lookup (`LOOKUPS_IN_FLIGHT`).
    lookup_turns: Arc<Semaphore>,
}

/// An answer: its status and its body (at most the bound asked for).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl OutboundClient {
    pub fn new(policy: AddressPolicy) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        let lookups = Lookups::default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(CheckedResolver { policy: policy.clone(), lookups: lookups.clone() }))
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(OutboundClient { http, policy, lookups, lookup_turns: Arc::new(Semaphore::new(LOOKUPS_IN_FLIGHT)) })
    }

    /// Check a URL's host where that can be done without a lookup: an IP address in it (which skips resolution).
    /// `Ok(false)`: the host is a name.
    fn check_literal(&self, url: &reqwest::Url) -> Result<bool, OutboundError> {
        let host = url.host_str().ok_or_else(|| OutboundError::Refused("the URL has no host".into()))?;
        match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(address) => {
                self.policy.check(address).map(|()| true).map_err(|why| OutboundError::Refused(why.to_string()))
            }
            Err(_) => Ok(false),
        }
    }

    /// Look `host` up and check every address it stands for, then keep them for the connections made to it. The
    /// refusal does not say which address it found: that would map the operator's names for a tenant.
    async fn look_up(&self, host: &str) -> Result<(), OutboundError> {
        let turn = self.lookup_turns.clone().try_acquire_owned().map_err(|_| OutboundError::Busy)?;
        let name = host.to_owned();
        // The lookup holds its turn until the system resolver answers, even after its caller gave up.
        let looked_up = tokio::spawn(async move {
            let _turn = turn;
            tokio::net::lookup_host((name.as_str(), 0)).await.map(|addresses| addresses.collect::<Vec<_>>())
        });
        let addresses = match looked_up.await {
            Ok(Ok(addresses)) if !addresses.is_empty() => addresses,
            Ok(Ok(_)) => return Err(OutboundError::Failed(format!("{host} resolves to no address"))),
            Ok(Err(error)) => return Err(OutboundError::Failed(format!("cannot resolve {host}: {error}"))),
            Err(error) => return Err(OutboundError::Failed(format!("cannot resolve {host}: {error}"))),
        };
        if addresses.iter().any(|address| self.policy.check(address.ip()).is_err()) {
            return Err(OutboundError::Refused(format!("{host} resolves to a reserved address")));
        }
        if let Ok(mut lookups) = self.lookups.lock() {
            if lookups.len() >= MAX_LOOKUPS_KEPT {
                lookups.clear();
            }
            lookups.insert(host.to_owned(), (addresses, Instant::now()));
        }
        Ok(())
    }

    /// Check that `url` may be reached now: its literal address, or every address its name resolves to.
    pub async fn check_reachable(&self, url: &str) -> Result<(), OutboundError> {
        let url = reqwest::Url::parse(url).map_err(|error| OutboundError::Failed(error.to_string()))?;
        if self.check_literal(&url)? {
            return Ok(());
        }
        self.look_up(url.host_str().unwrap_or_default()).await
    }

    /// POST `body` (JSON) with `headers` to `url`, within `deadline` for the whole exchange, reading at most
    /// `max_answer` bytes of the answer. A redirect is an answer like any other (its status), never followed.
    ///
    /// `slot` (the caller's bound on calls in flight) is held until the exchange really ends: a name lookup runs
    /// to its end after the deadline, and the slot stays taken meanwhile.
    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
        deadline: Duration,
        max_answer: usize,
        slot: OwnedSemaphorePermit,
    ) -> Result<Answer, OutboundError> {
        let parsed = reqwest::Url::parse(url).map_err(|error| OutboundError::Failed(error.to_string()))?;
        let literal = self.check_literal(&parsed)?;
        let mut request = self.http.post(parsed.clone()).header("content-type", "application/json").body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let gave_up = CancellationToken::new();
        let exchange = {
            let (client, gave_up) = (self.clone(), gave_up.clone());
            async move {
                let _slot = slot;
                if !literal {
                    client.look_up(parsed.host_str().unwrap_or_default()).await?;
                }
                tokio::select! {
                    answer = exchange(request, max_answer) => answer,
                    _ = gave_up.cancelled() => Err(OutboundError::Timeout(deadline)),
                }
            }
        };
        let exchange = tokio::spawn(exchange);
        match tokio::time::timeout(deadline, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => Err(OutboundError::Failed(error.to_string())),
            Err(_) => {
                gave_up.cancel();
                Err(OutboundError::Timeout(deadline))
            }
        }
    }
}

/// Send a request and read its answer up to `max_answer` bytes.
async fn exchange(request: reqwest::RequestBuilder, max_answer: usize) -> Result<Answer, OutboundError> {
    let mut response = request.send().await.map_err(classify)?;
    let status = response.status().as_u16();
    if response.content_length().is_some_and(|len| len > max_answer as u64) {
        return Err(OutboundError::TooLong(max_answer));
    }
    let mut answer = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if answer.len() + chunk.len() > max_answer {
            return Err(OutboundError::TooLong(max_answer));
        }
        answer.extend_from_slice(&chunk);
    }
    Ok(Answer { status, body: Bytes::from(answer) })
}

/// The resolver's refusal of a host, found again among a failed request's causes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RefusedAddress(String);

/// A refusal by the resolver reads as one; anything else is a failure, with its causes.
/// The URL is left out: its query may carry the tenant's own secrets, and the text reaches logs.
fn classify(error: reqwest::Error) -> OutboundError {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<RefusedAddress>() {
            return OutboundError::Refused(refused.0.clone());
        }
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    OutboundError::Failed(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn reserved_addresses_are_refused_by_default_and_public_ones_pass() {
        let policy = AddressPolicy::default();
        for refused in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "2002:7f00:1::",
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            "::127.0.0.1",
            "::ffff:0:7f00:1",
            "2001:0:4136:e378::1",
            "fec0::1",
            "100::1",
            "ff02::1",
        ] {
            assert!(policy.check(ip(refused)).is_err(), "{refused}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(policy.check(ip(public)).is_ok(), "{public}");
        }
    }

    #[test]
    fn an_operator_allows_whole_networks_and_nothing_more() {
        let policy =
            AddressPolicy::new(vec![Network::parse("127.0.0.0/8").unwrap(), Network::parse("fd00::1").unwrap()]);
        assert!(policy.check(ip("127.0.0.1")).is_ok());
        assert!(policy.check(ip("127.200.0.9")).is_ok());
        assert!(policy.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(policy.check(ip("fd00::1")).is_ok());
        assert!(policy.check(ip("fd00::2")).is_err());
        assert!(policy.check(ip("::1")).is_err());
        assert!(policy.check(ip("10.0.0.1")).is_err());
        assert!(policy.check(ip("169.254.169.254")).is_err());
    }

    #[test]
    fn networks_parse_strictly() {
        assert_eq!(Network::parse("10.0.0.0/8").unwrap().prefix, 8);
        assert_eq!(Network::parse("::1").unwrap().prefix, 128);
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("::/129").is_err());
        assert!(Network::parse("localhost").is_err());
        assert!(Network::parse("10.0.0.0/x").is_err());
        let odd = Network::parse("10.128.0.0/9").unwrap();
        assert!(odd.contains(ip("10.200.1.1")));
        assert!(!odd.contains(ip("10.127.1.1")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
    }
}
