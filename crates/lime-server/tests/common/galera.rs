//! A MariaDB Galera cluster on loopback for the tests, through
//! `scripts/galera-cluster.sh` (which starts, kills and restarts its nodes): SQL
//! ports 3311.. and group communication 4571.. (the script's defaults), or the
//! next free block of 30 ports above both when another cluster holds them; apart
//! from the machine's own MariaDB on 3306. Torn down when dropped, also when the
//! test panics.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The script that runs the nodes.
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/galera-cluster.sh"
);

/// The SQL port of node 0 (node `i` is at `base + i`, from 1), and the group
/// communication's (its IST and SST ports are 10 and 20 above), by default.
const SQL_PORT_BASE: u16 = 3310;
const GROUP_PORT_BASE: u16 = 4570;

/// A running cluster of `nodes` nodes, numbered from 1.
pub struct GaleraCluster {
    /// Where the nodes keep their data; removed by `stop`.
    dir: PathBuf,
    /// How many nodes it has.
    pub nodes: usize,
    /// The SQL port of node 0, and the group communication's.
    ports: (u16, u16),
}

impl GaleraCluster {
    /// Starts `nodes` nodes and waits (bounded by the script) until every one is
    /// synced in a cluster of that size.
    pub fn start(nodes: usize) -> GaleraCluster {
        // The dir is the script's to make (and chown to the nodes' user) and to
        // remove: only a free name is taken here.
        let dir = std::env::temp_dir().join(format!("lime-galera-{:08x}", rand::random::<u32>()));
        let ports = free_ports(nodes);
        let cluster = GaleraCluster { dir, nodes, ports };
        // Owned from here: a failed start is torn down by Drop.
        cluster.script(&["start", &nodes.to_string()]);
        cluster
    }

    /// The store URL of `database` on node `node`, as root.
    pub fn url(&self, node: usize, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.sql_port(node))
    }

    /// The SQL port of node `node`.
    pub fn sql_port(&self, node: usize) -> u16 {
        self.ports.0 + u16::try_from(node).expect("a small node number")
    }

    /// Kills node `node` with SIGKILL (its data stays).
    pub fn kill_node(&self, node: usize) {
        self.script(&["kill-node", &node.to_string()]);
    }

    /// Starts node `node` again and waits until it has rejoined, synced.
    pub fn start_node(&self, node: usize) {
        self.script(&["start-node", &node.to_string()]);
    }

    fn script(&self, args: &[&str]) {
        let (command, rest) = args.split_first().expect("a command");
        let status = self
            .command()
            .arg(command)
            .arg(&self.dir)
            .args(rest)
            .status()
            .expect("run galera-cluster.sh");
        assert!(
            status.success(),
            "galera-cluster.sh {args:?} failed ({status}); node logs in {}",
            self.dir.display()
        );
    }

    /// The script, told the cluster's ports.
    fn command(&self) -> Command {
        let mut command = Command::new(SCRIPT);
        command
            .env("GALERA_SQL_PORT", self.ports.0.to_string())
            .env("GALERA_PORT", self.ports.1.to_string());
        command
    }
}

/// The first block of ports (30 apart) where every port a cluster of `nodes`
/// needs is free on loopback now.
fn free_ports(nodes: usize) -> (u16, u16) {
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    (0..10)
        .map(|block| (SQL_PORT_BASE + 30 * block, GROUP_PORT_BASE + 30 * block))
        .find(|&(sql, group)| {
            (1..=nodes as u16).all(|node| {
                [
                    sql + node,
                    group + node,
                    group + 10 + node,
                    group + 20 + node,
                ]
                .into_iter()
                .all(free)
            })
        })
        .expect("no free block of ports for a Galera cluster")
}

impl Drop for GaleraCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_logs(&self.dir);
        }
        let _ = self.command().arg("stop").arg(&self.dir).status();
    }
}

/// The end of each node's log, to tell why a test failed.
fn print_logs(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let log = entry.path().join("error.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- {}:", log.display());
        for line in &lines[lines.len().saturating_sub(15)..] {
            eprintln!("{line}");
        }
    }
}
