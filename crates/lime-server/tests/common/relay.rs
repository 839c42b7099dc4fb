//! A TCP relay from a loopback port of its own to a database server: what a test
//! puts between a store and the database to take the database away and give it
//! back, without touching the database server itself.
//!
//! `cut` closes every relayed connection at once and turns new ones away (each is
//! closed as soon as it is accepted), as a crashed database server would;
//! `restore` forwards again, on the same port. `arm` breaks the next COMMIT that
//! goes through, once: just before forwarding it, or just after the server
//! executed it (its answer is never forwarded); either way the relay is then cut,
//! so the client cannot know what happened to its COMMIT, and the test can look at
//! the database directly meanwhile.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Where the next COMMIT is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trap {
    /// COMMIT never reaches the server: the transaction rolls back.
    BeforeCommit,
    /// COMMIT reaches the server; its answer is dropped with the connection.
    AfterCommit,
}

/// A relay: forwards 127.0.0.1:[`Relay::port`] to its target until dropped.
pub struct Relay {
    /// Where clients connect, the same across cuts.
    addr: SocketAddr,
    /// The database server.
    target: SocketAddr,
    state: Arc<State>,
    /// The accept loop, which owns the listener for the relay's whole life: the
    /// port is never given up, so no one else can take it during a cut.
    accepting: JoinHandle<()>,
}

/// What the accept loop, the relayed connections and the test share.
#[derive(Default)]
struct State {
    links: Mutex<Links>,
    /// The armed trap, taken by the first COMMIT that goes through.
    trap: Mutex<Option<Trap>>,
    /// Whether the trap broke a COMMIT.
    sprung: AtomicBool,
}

/// The relayed connections, and whether new ones are turned away. One lock for
/// both, so that no connection is let in by a cut that is under way.
#[derive(Default)]
struct Links {
    down: bool,
    /// Every relayed connection's task: aborting it closes both its sockets.
    tasks: Vec<JoinHandle<()>>,
}

impl State {
    /// Turns new connections away and aborts every relayed one; their tasks, to
    /// be awaited by a caller that may.
    fn go_down(&self) -> Vec<JoinHandle<()>> {
        let mut links = self.links.lock().unwrap();
        links.down = true;
        let tasks = std::mem::take(&mut links.tasks);
        for task in &tasks {
            task.abort();
        }
        tasks
    }
}

impl Relay {
    /// Relays a new loopback port to `target` (`"127.0.0.1:3306"`).
    pub async fn start(target: &str) -> Relay {
        let target: SocketAddr = target
            .parse()
            .unwrap_or_else(|error| panic!("relay target {target}: {error}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let accepting = tokio::spawn(accept(listener, target, state.clone()));
        Relay {
            addr,
            target,
            state,
            accepting,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `url` (which names the relay's target, as `127.0.0.1:3306`) made to name
    /// the relay instead: a store opened on it goes through the relay.
    pub fn route(&self, url: &str) -> String {
        let target = self.target.to_string();
        assert!(url.contains(&target), "{url} does not name {target}");
        url.replacen(&target, &self.addr.to_string(), 1)
    }

    /// Closes every relayed connection and turns new ones away; returns once
    /// every connection is closed.
    pub async fn cut(&self) {
        for task in self.state.go_down() {
            let _ = task.await;
        }
    }

    /// Forwards new connections again, on the same port.
    pub fn restore(&self) {
        self.state.links.lock().unwrap().down = false;
    }

    /// Breaks the next COMMIT that goes through, as `trap` says.
    pub fn arm(&self, trap: Trap) {
        self.state.sprung.store(false, Ordering::SeqCst);
        *self.state.trap.lock().unwrap() = Some(trap);
    }

    /// Whether the trap broke a COMMIT.
    pub fn sprung(&self) -> bool {
        self.state.sprung.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.go_down();
        self.accepting.abort();
    }
}

/// Accepts connections for as long as the relay lives: relays each, or closes it
/// at once while the relay is cut.
async fn accept(listener: TcpListener, target: SocketAddr, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors, say: try again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut links = state.links.lock().unwrap();
        if links.down {
            continue; // `client` dropped: closed at once
        }
        links.tasks.retain(|task| !task.is_finished());
        links
            .tasks
            .push(tokio::spawn(relay(client, target, state.clone())));
    }
}

/// Copies bytes both ways between one client connection and the target, and
/// springs the trap on the COMMIT it is armed for.
async fn relay(mut client: TcpStream, target: SocketAddr, state: Arc<State>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut to_server = vec![0u8; 64 * 1024];
    let mut to_client = vec![0u8; 64 * 1024];
    let mut commit_forwarded = false;
    loop {
        tokio::select! {
            read = client_read.read(&mut to_server) => {
                let Ok(n @ 1..) = read else { return };
                let chunk = &to_server[..n];
                // A COMMIT on its own: MySQL's COM_QUERY packet ends with the
                // text, PostgreSQL's Query message with the text and a NUL (not
                // the "READ COMMITTED" of a BEGIN).
                if chunk.ends_with(b"COMMIT") || chunk.ends_with(b"COMMIT\0") {
                    let trap = state.trap.lock().unwrap().take();
                    match trap {
                        Some(Trap::BeforeCommit) => {
                            state.sprung.store(true, Ordering::SeqCst);
                            state.go_down();
                            return;
                        }
                        Some(Trap::AfterCommit) => commit_forwarded = true,
                        None => {}
                    }
                }
                if server_write.write_all(chunk).await.is_err() {
                    return;
                }
            }
            read = server_read.read(&mut to_client) => {
                let Ok(n @ 1..) = read else { return };
                if commit_forwarded {
                    // The server answered COMMIT: it was executed. Drop the answer.
                    state.sprung.store(true, Ordering::SeqCst);
                    state.go_down();
                    return;
                }
                if client_write.write_all(&to_client[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
