//! A TCP relay to a database server that can break a connection at COMMIT, once:
//! just before forwarding it, or just after the server executed it (its answer is
//! never forwarded). Either way the relay then goes down (every link dropped, new
//! ones refused) until `restore`: the client cannot know what happened to its
//! COMMIT, and the test can look at the database directly meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

#[derive(Default)]
struct State {
    down: AtomicBool,
    sprung: AtomicBool,
    trap: Mutex<Option<Trap>>,
    links: Mutex<Vec<JoinHandle<()>>>,
}

impl State {
    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

pub struct CommitRelay {
    pub port: u16,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl CommitRelay {
    /// Relays 127.0.0.1:<port> to `target`.
    pub async fn start(target: &'static str) -> CommitRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let accept = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if state.down.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let link = tokio::spawn(relay(client, target, state.clone()));
                    state.links.lock().unwrap().push(link);
                }
            }
        });
        CommitRelay {
            port,
            state,
            accept,
        }
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

    /// Lets connections through again.
    pub fn restore(&self) {
        self.state.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for CommitRelay {
    fn drop(&mut self) {
        self.state.cut();
        self.accept.abort();
    }
}

async fn relay(mut client: TcpStream, target: &'static str, state: Arc<State>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
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
                            state.cut();
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
                    state.cut();
                    return;
                }
                if client_write.write_all(&to_client[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
