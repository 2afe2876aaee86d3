//! The configuration of a NATS server with JetStream on loopback, alone or as one node of a cluster: the ports a
//! node takes, the config file it is started from, the client URL list of a cluster, and the node names (`n<i>`)
//! JetStream reports leaders by.
//!
//! It writes text only: it starts no server, waits for none and picks no binary (`xtask`'s `services.rs` and the
//! fault suite's `procs.rs` do, each with its own extras).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;

use crate::process::free_ports;

/// Nodes of the NATS cluster the tests, the local fleet and the fault suite run on, and the replicas its streams
/// and buckets get.
pub const CLUSTER_NODES: usize = 3;

/// The ports one node listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    /// Clients connect here.
    pub client: u16,
    /// Other nodes route to it here (unused by a single server).
    pub route: u16,
    /// HTTP monitoring (`/healthz`, `/jsz`).
    pub monitor: u16,
}

impl NodePorts {
    /// Free ports for `nodes` nodes, all distinct.
    pub fn free(nodes: usize) -> Result<Vec<NodePorts>> {
        let ports = free_ports(3 * nodes)?;
        Ok(ports.chunks(3).map(|p| NodePorts { client: p[0], route: p[1], monitor: p[2] }).collect())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client)
    }
}

/// The cluster block of a node's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The cluster's name (every node the same).
    pub name: String,
    /// The ports this node opens routes to (any node's route port, or a link in front of it; its own is ignored by
    /// the server).
    pub routes: Vec<u16>,
    /// The port this node tells the others to route to it by, instead of its route port.
    pub advertise: Option<u16>,
}

/// One node's configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's index: its server name is `n<index>`.
    pub index: usize,
    pub ports: NodePorts,
    /// JetStream's store folder.
    pub store_dir: PathBuf,
    /// Lines added inside the `jetstream` block as they are (limits, `sync_interval`), each ending in a newline.
    pub jetstream_extra: String,
    /// `None` for a server alone.
    pub cluster: Option<ClusterConfig>,
}

impl NodeConfig {
    /// A single server (or a node before `cluster` is set) with no extra JetStream settings.
    pub fn new(index: usize, ports: NodePorts, store_dir: PathBuf) -> NodeConfig {
        NodeConfig { index, ports, store_dir, jetstream_extra: String::new(), cluster: None }
    }

    /// The text of the configuration file (`nats-server -c <file>`).
    pub fn render(&self) -> String {
        let NodePorts { client, route, monitor } = self.ports;
        let mut text = format!(
            "server_name: \"{}\"\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
             jetstream {{\n  store_dir: {:?}\n{}}}\n",
            node_name(self.index),
            self.store_dir,
            self.jetstream_extra
        );
        if let Some(cluster) = &self.cluster {
            let routes: Vec<String> =
                cluster.routes.iter().map(|port| format!("\"nats-route://127.0.0.1:{port}\"")).collect();
            let _ = write!(text, "cluster {{\n  name: \"{}\"\n  listen: \"127.0.0.1:{route}\"\n", cluster.name);
            if let Some(advertise) = cluster.advertise {
                let _ = writeln!(text, "  advertise: \"127.0.0.1:{advertise}\"");
            }
            let _ = write!(text, "  routes: [{}]\n}}\n", routes.join(", "));
        }
        text
    }
}

/// The server name of node `index`.
pub fn node_name(index: usize) -> String {
    format!("n{index}")
}

/// The index of a node named by [`node_name`] (as JetStream names a stream's leader); `None` for other names.
pub fn node_index(name: &str) -> Option<usize> {
    let digits = name.strip_prefix('n')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Every node's client URL, comma-separated, as the services' `nats_url` and the tests take it.
pub fn cluster_url<'a>(nodes: impl IntoIterator<Item = &'a NodePorts>) -> String {
    nodes.into_iter().map(NodePorts::url).collect::<Vec<_>>().join(",")
}

/// Replicas of the streams and buckets created on a cluster of `nodes` nodes (at most three, as JetStream allows
/// for R3 and the services' replica rule asks).
pub fn replicas(nodes: usize) -> usize {
    nodes.clamp(1, CLUSTER_NODES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(base: u16) -> NodePorts {
        NodePorts { client: base, route: base + 1, monitor: base + 2 }
    }

    #[test]
    fn a_single_server_has_no_cluster_block() {
        let text = NodeConfig::new(0, ports(4000), "/tmp/s".into()).render();
        assert_eq!(
            text,
            "server_name: \"n0\"\nlisten: \"127.0.0.1:4000\"\nhttp: \"127.0.0.1:4002\"\n\
             jetstream {\n  store_dir: \"/tmp/s\"\n}\n"
        );
    }

    #[test]
    fn a_cluster_node_routes_and_advertises() {
        let mut node = NodeConfig::new(2, ports(4010), "/tmp/n2".into());
        node.jetstream_extra = "  sync_interval: always\n".into();
        node.cluster = Some(ClusterConfig { name: "test".into(), routes: vec![5001, 5002], advertise: Some(5999) });
        let text = node.render();
        assert!(text.starts_with("server_name: \"n2\"\n"), "{text}");
        assert!(text.contains("jetstream {\n  store_dir: \"/tmp/n2\"\n  sync_interval: always\n}\n"), "{text}");
        assert!(text.ends_with(
            "cluster {\n  name: \"test\"\n  listen: \"127.0.0.1:4011\"\n  advertise: \"127.0.0.1:5999\"\n  \
             routes: [\"nats-route://127.0.0.1:5001\", \"nats-route://127.0.0.1:5002\"]\n}\n"
        ));
        node.cluster.as_mut().unwrap().advertise = None;
        assert!(!node.render().contains("advertise"));
    }

    #[test]
    fn node_names_round_trip() {
        for i in [0, 1, 2, 17] {
            assert_eq!(node_index(&node_name(i)), Some(i));
        }
        for other in ["", "n", "x1", "n-1", "n1a", "N1"] {
            assert_eq!(node_index(other), None, "{other}");
        }
    }

    #[test]
    fn urls_replicas_and_ports() {
        assert_eq!(cluster_url(&[ports(4000), ports(4100)]), "nats://127.0.0.1:4000,nats://127.0.0.1:4100");
        assert_eq!([1, 2, 3, 5].map(replicas), [1, 2, 3, 3]);
        let free = NodePorts::free(3).unwrap();
        let mut all: Vec<u16> = free.iter().flat_map(|p| [p.client, p.route, p.monitor]).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 9);
    }
}
