//! A MariaDB Galera cluster on loopback for the tests, through
//! `scripts/galera-cluster.sh` (which starts, kills and restarts its nodes): SQL
//! ports 3311.. and group communication 4571.. (the script's defaults), apart
//! from the machine's own MariaDB on 3306. Torn down when dropped, also when the
//! test panics.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The script that runs the nodes.
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/galera-cluster.sh"
);

/// The SQL port of node 0 (node `i` is at `SQL_PORT_BASE + i`, from 1).
const SQL_PORT_BASE: u16 = 3310;

/// A running cluster of `nodes` nodes, numbered from 1.
pub struct GaleraCluster {
    /// Where the nodes keep their data; removed by `stop`.
    dir: PathBuf,
    /// How many nodes it has.
    pub nodes: usize,
}

impl GaleraCluster {
    /// Starts `nodes` nodes and waits (bounded by the script) until every one is
    /// synced in a cluster of that size.
    pub fn start(nodes: usize) -> GaleraCluster {
        // The dir is the script's to make (and chown to the nodes' user) and to
        // remove: only a free name is taken here.
        let dir = std::env::temp_dir().join(format!("lime-galera-{:08x}", rand::random::<u32>()));
        let cluster = GaleraCluster { dir, nodes };
        // Owned from here: a failed start is torn down by Drop.
        cluster.script(&["start", &nodes.to_string()]);
        cluster
    }

    /// The store URL of `database` on node `node`, as root.
    pub fn url(&self, node: usize, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", sql_port(node))
    }

    /// Kills node `node` with SIGKILL (its data stays).
    pub fn kill_node(&self, node: usize) {
        self.script(&["kill-node", &node.to_string()]);
    }

    /// Starts node `node` again and waits until it has rejoined, synced.
    pub fn start_node(&self, node: usize) {
        self.script(&["start-node", &node.to_string()]);
    }

    /// The nodes' state, as the script reports it.
    pub fn status(&self) -> String {
        let output = Command::new(SCRIPT)
            .arg("status")
            .arg(&self.dir)
            .output()
            .expect("run galera-cluster.sh");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Where node `node` keeps its files (`error.log` among them).
    pub fn node_dir(&self, node: usize) -> PathBuf {
        self.dir.join(format!("node{node}"))
    }

    fn script(&self, args: &[&str]) {
        let (command, rest) = args.split_first().expect("a command");
        let status = Command::new(SCRIPT)
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
}

/// The SQL port of node `node`.
pub fn sql_port(node: usize) -> u16 {
    SQL_PORT_BASE + u16::try_from(node).expect("a small node number")
}

impl Drop for GaleraCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_logs(&self.dir);
        }
        let _ = Command::new(SCRIPT).arg("stop").arg(&self.dir).status();
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
