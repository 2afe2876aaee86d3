//! What the kernel says about the processes under test: CPU time and resident memory from /proc, the process
//! listening on a port, and the fleet's processes by name, so a report can say where the CPU went.
//!
//! Linux only. It reads; it never signals or changes a process.

use anyhow::{Context, Result};
use std::collections::BTreeMap;

/// Clock ticks per second in /proc/<pid>/stat (USER_HZ, fixed at 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// User plus system CPU time of a process (all its threads), in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid} is gone"))?;
    // The command name is in parentheses and may hold spaces; the fields after it are plain.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).context("unreadable /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the whole line (utime, stime) are the 12th and 13th after the name.
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / TICKS_PER_SEC)
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid} is gone"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kib * 1024)
}

/// The process holding a listening TCP socket on `port`, if this user can see it.
pub fn pid_listening_on(port: u16) -> Result<Option<u32>> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT, st 0A is LISTEN, inode is the 10th field.
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else { continue };
            let listening_port = local.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && listening_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return Ok(None);
    }
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Ok(Some(pid));
                }
            }
        }
    }
    Ok(None)
}

/// The processes whose name starts with one of the fleet's programs, by pid, with their names; this process is
/// `loadtest`.
pub fn fleet_processes() -> BTreeMap<u32, String> {
    const NAMES: [&str; 6] =
        ["switchyard-gate", "switchyard-rout", "switchyard-pers", "switchyard-load", "nats-server", "redis-server"];
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else { continue };
        let comm = comm.trim();
        if pid == std::process::id() {
            found.insert(pid, "loadtest".to_owned());
        } else if NAMES.iter().any(|n| comm.starts_with(n)) {
            found.insert(pid, comm.to_owned());
        }
    }
    found
}

/// CPU seconds of a set of processes at one moment; two of them give each process's share of a phase.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot(BTreeMap<u32, (String, f64)>);

impl CpuSnapshot {
    pub fn take(processes: &BTreeMap<u32, String>) -> CpuSnapshot {
        CpuSnapshot(
            processes.iter().filter_map(|(pid, name)| Some((*pid, (name.clone(), cpu_secs(*pid).ok()?)))).collect(),
        )
    }

    /// CPU seconds spent since `earlier`, summed by process name.
    pub fn since(&self, earlier: &CpuSnapshot) -> BTreeMap<String, f64> {
        let mut by_name = BTreeMap::new();
        for (pid, (name, now)) in &self.0 {
            if let Some((_, before)) = earlier.0.get(pid) {
                *by_name.entry(name.clone()).or_insert(0.0) += now - before;
            }
        }
        by_name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 1024 * 1024);
        let before = cpu_secs(me).unwrap();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_secs(me).unwrap() >= before);
    }

    #[test]
    fn finds_the_listener_of_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port).unwrap(), Some(std::process::id()));
    }
}
