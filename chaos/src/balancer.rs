//! A TCP balancer in front of the gateways, as a Kubernetes service or load balancer would be: each new connection
//! goes to the next gateway that accepts it, so the clients of a killed gateway reconnect to another. It can also
//! cut every connection it carries at once (a network blip that drops thousands of sockets) without touching the
//! gateways, and block (a partition: what it carries is cut and every new connection is reset until unblocked).
//! With one backend it is the link between two NATS nodes that a partition cuts.
//!
//! It does not look inside the bytes, and it only listens on and forwards to 127.0.0.1.

use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What the accept loop and the connection tasks share.
struct Shared {
    /// Gateway ports, tried round-robin.
    backends: Mutex<Vec<u16>>,
    next: AtomicUsize,
    /// Cancelled to cut every connection open now; replaced by a fresh token for the connections after.
    cut: Mutex<CancellationToken>,
    /// Connections being carried now.
    open: AtomicUsize,
    /// While set, new connections are reset as soon as they are accepted.
    blocked: AtomicBool,
}

pub struct Balancer {
    pub port: u16,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Balancer {
    pub async fn start(backends: Vec<u16>) -> Result<Balancer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            backends: Mutex::new(backends),
            next: AtomicUsize::new(0),
            cut: Mutex::new(CancellationToken::new()),
            open: AtomicUsize::new(0),
            blocked: AtomicBool::new(false),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Ok(Balancer { port, shared, stop })
    }

    pub fn set_backends(&self, ports: Vec<u16>) {
        *self.shared.backends.lock().unwrap_or_else(|p| p.into_inner()) = ports;
    }

    /// Drop every connection carried now, both ways at once.
    pub fn cut_all(&self) {
        let mut cut = self.shared.cut.lock().unwrap_or_else(|p| p.into_inner());
        cut.cancel();
        *cut = CancellationToken::new();
    }

    /// Block (cut what is carried now and reset every new connection) or let connections through again.
    pub fn set_blocked(&self, blocked: bool) {
        self.shared.blocked.store(blocked, Ordering::SeqCst);
        if blocked {
            self.cut_all();
        }
    }

    /// Connections carried now.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stop.cancel();
        self.cut_all();
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        if shared.blocked.load(Ordering::SeqCst) {
            reset(&client);
            continue;
        }
        let cut = shared.cut.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tokio::spawn(carry(client, shared.clone(), cut));
    }
}

/// Connect to the next gateway that accepts (each is tried once), then copy both ways until either side closes or
/// the connection is cut.
async fn carry(mut client: TcpStream, shared: Arc<Shared>, cut: CancellationToken) {
    let backends = shared.backends.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut upstream = None;
    for _ in 0..backends.len() {
        let port = backends[shared.next.fetch_add(1, Ordering::Relaxed) % backends.len()];
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
            upstream = Some(stream);
            break;
        }
    }
    let Some(mut upstream) = upstream else { return };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    shared.open.fetch_add(1, Ordering::Relaxed);
    tokio::select! {
        _ = cut.cancelled() => {
            reset(&client);
            reset(&upstream);
        }
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
}

/// Make dropping `stream` an abrupt reset, as a network failure looks to both ends. A zero linger resets at once
/// and never blocks, which is what the deprecation warns about.
fn reset(stream: &TcpStream) {
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
}
