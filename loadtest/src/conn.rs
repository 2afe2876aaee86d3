//! Opening many sockets: the process's file limit, spreading connections over several 127.0.0.x source addresses
//! (each has its own ephemeral ports), bounded connect concurrency, and full-jitter backoff for reconnects.
//!
//! It does not read events or judge deliveries; `deliveries` does.

use anyhow::{bail, Result};
use futures::StreamExt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use switchyard_client::{Auth, Client, ClientError, ConnectOptions};
use switchyard_protocol::client::Format;

/// Raise this process's open-file limit as far as needed (or as the hard limit allows) and fail clearly when
/// `need` sockets cannot fit.
pub fn raise_fd_limit(need: u64) -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = need.max(soft);
    if want > soft {
        // Raising the hard limit needs privilege; fall back to the hard limit.
        if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_err() {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        }
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < need {
        bail!(
            "this run needs about {need} open files but the limit is {soft} (hard limit {hard}, and raising it \
             was refused); use fewer sockets or raise `ulimit -Hn`"
        );
    }
    Ok(soft)
}

/// Opens client sockets to one WebSocket URL, round-robin over `sources` loopback source addresses.
#[derive(Debug)]
pub struct Dialer {
    url: String,
    format: Format,
    sources: usize,
    next: AtomicUsize,
}

impl Dialer {
    pub fn new(url: &str, format: Format, sources: usize) -> Dialer {
        Dialer { url: url.to_owned(), format, sources: sources.max(1), next: AtomicUsize::new(0) }
    }

    /// Connect, authenticate with `token` (none for the floor) and wait for `hello`.
    pub async fn connect(&self, token: Option<String>) -> Result<Client, ClientError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.sources;
        let mut opts =
            ConnectOptions::new(&self.url, token.map(Auth::Header).unwrap_or(Auth::None)).with_format(self.format);
        opts.bind_ip = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + n as u8)));
        opts.connect_timeout = Duration::from_secs(30);
        opts.request_timeout = Duration::from_secs(30);
        Client::connect(opts).await
    }
}

/// Run `make(i)` for `0..n` with at most `concurrency` in flight; results in index order.
pub async fn bounded<T, F, Fut>(n: usize, concurrency: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out: Vec<(usize, T)> = futures::stream::iter(0..n)
        .map(|i| {
            let fut = make(i);
            async move { (i, fut.await) }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}

/// Full-jitter exponential backoff: a uniform delay in `[0, min(cap, base * 2^attempt))`.
pub fn full_jitter(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    ceiling.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0..40 {
            let d = full_jitter(attempt, base, cap);
            assert!(d < base.saturating_mul(1 << attempt.min(20)).min(cap) || d.is_zero());
        }
        let spread: Vec<Duration> = (0..200).map(|_| full_jitter(10, base, cap)).collect();
        assert!(
            spread.iter().any(|d| *d < Duration::from_secs(1)) && spread.iter().any(|d| *d > Duration::from_secs(4))
        );
    }
}
