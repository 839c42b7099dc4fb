//! A server-side TLS stream over rustls's unbuffered API, whose buffers are
//! allocated only while bytes are in them.
//!
//! Why not tokio-rustls: its stream runs rustls's buffered `ServerConnection`,
//! which keeps a read buffer of 4 KiB for the connection's whole life once it
//! has read (rustls 0.23, `DeframerVecBuffer::prepare_read`: it shrinks to
//! 4 KiB, never below, and no API lets it go). That was 40% of what an idle
//! keep-alive connection held. With the unbuffered API the buffers are ours:
//! the TLS bytes received are kept only until rustls has decrypted them, the
//! plaintext only until hyper has read it, the TLS bytes to send only until the
//! socket has taken them. A connection waiting for its client holds none of
//! them. No crate on crates.io runs the unbuffered API under tokio (checked on
//! 2026-12-03), hence this adapter: rustls still does all of TLS (handshake,
//! records, alerts, key updates); this only moves bytes between it, the socket
//! and hyper.

use rustls::ServerConfig;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus,
};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What one read from the socket asks room for.
const READ_SIZE: usize = 4096;

/// The most TLS bytes kept while a handshake message is incomplete: rustls's own
/// bound for a handshake message (64 KiB, e.g. a long client certificate chain),
/// plus a record's header.
const MAX_HANDSHAKE_BYTES: usize = 0xffff + 5;

/// The most TLS bytes kept after the handshake: one whole record, the largest
/// TLS allows (a 5-byte header and 2^14 + 2,048 bytes), since a complete record
/// is decrypted as soon as it is in.
const MAX_RECORD_BYTES: usize = 5 + (1 << 14) + 2048;

/// The most plaintext one write encrypts (four records): what is queued to
/// send stays bounded whatever the caller writes at once.
const MAX_WRITE: usize = 4 << 14;

/// A TLS session on its TCP connection, the server's side.
pub struct TlsStream {
    tcp: TcpStream,
    session: UnbufferedServerConnection,
    /// TLS bytes received and not yet processed: `incoming[..received]`.
    incoming: Vec<u8>,
    received: usize,
    /// Decrypted bytes not yet read: `plaintext[taken..]`.
    plaintext: Vec<u8>,
    taken: usize,
    /// TLS bytes to send: `outgoing[sent..]`.
    outgoing: Vec<u8>,
    sent: usize,
    /// The client sent its close_notify.
    peer_closed: bool,
    /// The client closed its side of the TCP connection.
    eof: bool,
    /// Our close_notify is queued or sent.
    close_sent: bool,
}

/// Where [`TlsStream::step`] stopped.
enum Reached {
    /// More TLS bytes from the client are needed.
    NeedsInput,
    /// The session is open; what was to be written is queued.
    Open,
    /// Both sides sent their close_notify.
    Closed,
}

/// What [`TlsStream::step`] is asked to do once the session can send.
enum Want<'a> {
    Read,
    Write(&'a [u8]),
    Close,
}

impl TlsStream {
    /// Runs the server's side of the handshake on `tcp`. The caller bounds its time.
    pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<TlsStream> {
        let session = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut stream = TlsStream {
            tcp,
            session,
            incoming: Vec::new(),
            received: 0,
            plaintext: Vec::new(),
            taken: 0,
            outgoing: Vec::new(),
            sent: 0,
            peer_closed: false,
            eof: false,
            close_sent: false,
        };
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let reached = self.step_or_alert(Want::Read)?;
            ready!(self.poll_send(cx))?;
            if !self.session.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if matches!(reached, Reached::Closed) || self.peer_closed || self.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed during the TLS handshake",
                )));
            }
            ready!(self.poll_receive(cx))?;
        }
    }

    /// The TCP connection.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The TLS session: the protocol chosen by ALPN, the client's certificates.
    pub fn session(&self) -> &rustls::CommonState {
        &self.session
    }

    /// What the stream holds in buffers now, in bytes of capacity: none while
    /// it waits for its client.
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }

    /// Runs rustls on the bytes received until it needs more, or can send.
    /// Records it decrypts go to `plaintext`, TLS bytes it has to send (handshake,
    /// alerts, what `want` writes) to `outgoing`.
    fn step(&mut self, want: Want<'_>) -> Result<Reached, rustls::Error> {
        loop {
            let UnbufferedStatus { mut discard, state } = self
                .session
                .process_tls_records(&mut self.incoming[..self.received]);
            let reached = state.and_then(|state| {
                handle_state(
                    state,
                    &want,
                    &mut discard,
                    &mut self.plaintext,
                    &mut self.outgoing,
                    &mut self.peer_closed,
                )
            });
            // Whatever happened, rustls is done with these bytes.
            self.discard(discard);
            if let Some(reached) = reached? {
                return Ok(reached);
            }
        }
    }

    /// Drops the first `discard` bytes received, as rustls says once it is done
    /// with them. The rest moves to the front: rustls knows the handshake
    /// messages it still holds (a flight of several, one split across records)
    /// as offsets from the buffer's start, counted after the discard.
    fn discard(&mut self, discard: usize) {
        self.incoming.copy_within(discard..self.received, 0);
        self.received -= discard;
    }

    /// [`Self::step`], and on an error, the alert rustls queued for the client
    /// (a bad certificate, a bad record) sent if the socket takes it now.
    fn step_or_alert(&mut self, want: Want<'_>) -> io::Result<Reached> {
        self.step(want).map_err(|error| {
            // After an error rustls hands out what it queued (the alert) before
            // it looks at the buffer again, and it is asked for no more than
            // that: with its queue empty it would read the buffer again,
            // deframing once more the bytes that failed (and queueing a second
            // alert), or the rest of a flight it holds as offsets into them (a
            // client's CertificateVerify and Finished after a refused
            // certificate), which must then be the same bytes.
            while self.session.wants_write() {
                let UnbufferedStatus {
                    state: Ok(ConnectionState::EncodeTlsData(mut encode)),
                    discard,
                } = self
                    .session
                    .process_tls_records(&mut self.incoming[..self.received])
                else {
                    break;
                };
                let queued = queue_encoded(&mut self.outgoing, &mut encode);
                self.discard(discard);
                if queued.is_err() {
                    break;
                }
            }
            let _ = self.tcp.try_write(&self.outgoing[self.sent..]);
            tls_error(error)
        })
    }

    /// Sends what is queued in `outgoing`; its buffer is let go once sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let sent = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if sent == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += sent;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads more TLS bytes from the socket into `incoming`, which is allocated
    /// only once the socket is readable and let go again when nothing came.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let limit = if self.session.is_handshaking() {
            MAX_HANDSHAKE_BYTES
        } else {
            MAX_RECORD_BYTES
        };
        if self.received >= limit {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS message over {limit} bytes"),
            )));
        }
        // Room is made only once the socket is readable. tokio's `poll_read`
        // then reads, and takes a short read as the socket drained (epoll), so
        // that waiting for the next bytes costs no second `recv`.
        if self.tcp.poll_read_ready(cx)?.is_ready() {
            let room = (self.received + READ_SIZE).min(limit);
            if self.incoming.len() < room {
                self.incoming.resize(room, 0);
            }
            let mut read = ReadBuf::new(&mut self.incoming[self.received..]);
            if let Poll::Ready(result) = Pin::new(&mut self.tcp).poll_read(cx, &mut read) {
                result?;
                let read = read.filled().len();
                self.eof = read == 0;
                self.received += read;
                return Poll::Ready(Ok(()));
            }
        }
        // Waiting: no buffer is held for bytes that may be long to come.
        if self.received == 0 {
            self.incoming = Vec::new();
        }
        Poll::Pending
    }
}

/// What the stream does in one of rustls's states: decrypted records to
/// `plaintext` (their bytes added to `discard`), TLS bytes to send to
/// `outgoing`; `Some` where [`TlsStream::step`] stops.
fn handle_state(
    state: ConnectionState<'_, '_, ServerConnectionData>,
    want: &Want<'_>,
    discard: &mut usize,
    plaintext: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
    peer_closed: &mut bool,
) -> Result<Option<Reached>, rustls::Error> {
    Ok(match state {
        ConnectionState::ReadTraffic(mut traffic) => {
            while let Some(record) = traffic.next_record() {
                let record = record?;
                *discard += record.discard;
                plaintext.extend_from_slice(record.payload);
            }
            None
        }
        ConnectionState::EncodeTlsData(mut encode) => {
            queue_encoded(outgoing, &mut encode)?;
            None
        }
        // Queued in `outgoing`, which `poll_send` sends before the
        // stream waits for the client.
        ConnectionState::TransmitTlsData(transmit) => {
            transmit.done();
            None
        }
        ConnectionState::BlockedHandshake => Some(Reached::NeedsInput),
        ConnectionState::WriteTraffic(mut traffic) => match want {
            Want::Read => Some(Reached::NeedsInput),
            Want::Write(data) => {
                append(outgoing, data.len() + 64, |room| {
                    traffic.encrypt(data, room).map_err(encrypt_room)
                })?;
                Some(Reached::Open)
            }
            Want::Close => {
                append(outgoing, 64, |room| {
                    traffic.queue_close_notify(room).map_err(encrypt_room)
                })?;
                Some(Reached::Open)
            }
        },
        ConnectionState::PeerClosed => {
            *peer_closed = true;
            None
        }
        ConnectionState::Closed => Some(Reached::Closed),
        // Early data is off (`ServerConfig::max_early_data_size` is 0).
        _ => return Err(rustls::Error::General("unexpected TLS state".into())),
    })
}

/// Appends what `write` puts in the room it is given to `buffer`, giving it at
/// first `guess` bytes, then what it says it needs (`Err(Some(needed))`).
fn append(
    buffer: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> Result<(), rustls::Error> {
    let start = buffer.len();
    let mut room = guess;
    loop {
        buffer.resize(start + room, 0);
        match write(&mut buffer[start..]) {
            Ok(written) => {
                buffer.truncate(start + written);
                return Ok(());
            }
            Err(Some(needed)) if needed > room => room = needed,
            Err(_) => {
                buffer.truncate(start);
                return Err(rustls::Error::General("cannot encode a TLS record".into()));
            }
        }
    }
}

/// Appends the handshake or alert record rustls has to send to `outgoing`.
fn queue_encoded(
    outgoing: &mut Vec<u8>,
    encode: &mut EncodeTlsData<'_, ServerConnectionData>,
) -> Result<(), rustls::Error> {
    append(outgoing, 512, |room| {
        encode.encode(room).map_err(|error| match error {
            EncodeError::InsufficientSize(size) => Some(size.required_size),
            EncodeError::AlreadyEncoded => None,
        })
    })
}

/// The room an encryption asks for, if that is why it failed.
fn encrypt_room(error: EncryptError) -> Option<usize> {
    match error {
        EncryptError::InsufficientSize(size) => Some(size.required_size),
        _ => None,
    }
}

fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.plaintext.len() {
                let n = buf.remaining().min(this.plaintext.len() - this.taken);
                buf.put_slice(&this.plaintext[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.plaintext.len() {
                    this.plaintext = Vec::new();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            let reached = this.step_or_alert(Want::Read)?;
            // What rustls queued meanwhile (a key update's answer) goes out
            // when the socket takes it; a full socket does not stop reading.
            if let Poll::Ready(Err(error)) = this.poll_send(cx) {
                return Poll::Ready(Err(error));
            }
            if !this.plaintext.is_empty() || this.peer_closed {
                continue;
            }
            if matches!(reached, Reached::Closed) {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Without close_notify: an end of stream only between records.
                return Poll::Ready(if this.received == 0 {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed within a TLS record",
                    ))
                });
            }
            ready!(this.poll_receive(cx))?;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // What was written before goes out first: the socket sets the pace.
        ready!(this.poll_send(cx))?;
        let data = &data[..data.len().min(MAX_WRITE)];
        match this.step_or_alert(Want::Write(data))? {
            Reached::Open => {}
            Reached::NeedsInput | Reached::Closed => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the TLS session cannot send",
                )));
            }
        }
        // Queued: it goes out now if the socket takes it, or at the next write
        // or flush.
        if let Poll::Ready(Err(error)) = this.poll_send(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_send(cx))?;
            this.step_or_alert(Want::Close)?;
            this.close_sent = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, RootCertStore};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream as ClientStream;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A server configuration with a fresh self-signed certificate for
    /// localhost, and a client configuration (TLS 1.3 and 1.2, or only
    /// `versions`) that trusts it.
    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let certificate = CertificateDer::from(certified.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![certificate.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(certificate).unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A server stream and the client's end of it, handshake done.
    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (TlsStream, ClientStream<TcpStream>) {
        let (server, client) = configs(versions);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connecting = tokio::spawn(async move {
            let tcp = TcpStream::connect(address).await.unwrap();
            TlsConnector::from(client)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let server = TlsStream::accept(server, tcp).await.unwrap();
        (server, connecting.await.unwrap())
    }

    /// Reads exactly `n` bytes.
    async fn read_n(stream: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
        let mut data = vec![0; n];
        stream.read_exact(&mut data).await.unwrap();
        data
    }

    #[tokio::test]
    async fn a_stream_waiting_for_its_client_holds_no_buffer() {
        let (mut server, mut client) = pair(rustls::ALL_VERSIONS).await;
        client
            .write_all(b"POST /lime HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_n(&mut server, 23).await,
            b"POST /lime HTTP/1.1\r\n\r\n"
        );
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(read_n(&mut client, 19).await, b"HTTP/1.1 200 OK\r\n\r\n");
        // The next read waits for the client: nothing is kept meanwhile.
        let mut next = [0u8; 1];
        let waiting = tokio::time::timeout(Duration::from_millis(50), server.read(&mut next));
        assert!(waiting.await.is_err(), "nothing was sent");
        assert_eq!(server.buffered_capacity(), 0);
        // And the stream still works.
        client.write_all(b"again").await.unwrap();
        assert_eq!(read_n(&mut server, 5).await, b"again");
    }

    #[tokio::test]
    async fn large_reads_and_writes_cross_records_and_reads_whole_on_tls_1_3_and_1_2() {
        for versions in [&[&rustls::version::TLS13], &[&rustls::version::TLS12]] {
            let (mut server, mut client) = pair(versions).await;
            // Larger than a record, a read of the socket and one write's worth.
            let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let to_server = sent.clone();
            let writer = tokio::spawn(async move {
                client.write_all(&to_server).await.unwrap();
                client.flush().await.unwrap();
                client
            });
            assert_eq!(read_n(&mut server, sent.len()).await, sent);
            let mut client = writer.await.unwrap();
            let echoing = tokio::spawn(async move {
                server.write_all(&sent).await.unwrap();
                server.flush().await.unwrap();
                (server, sent)
            });
            let received = read_n(&mut client, 300_000).await;
            let (_server, sent) = echoing.await.unwrap();
            assert_eq!(received, sent, "{versions:?}");
        }
    }

    #[tokio::test]
    async fn closing_sends_close_notify_and_a_client_close_notify_ends_the_stream() {
        let (mut server, mut client) = pair(rustls::ALL_VERSIONS).await;
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"last");
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"bye", "the client saw a clean end: close_notify");
    }

    #[tokio::test]
    async fn a_connection_cut_within_a_record_is_an_error_not_an_end() {
        let (mut server, client) = pair(rustls::ALL_VERSIONS).await;
        let (mut tcp, _) = client.into_inner();
        // A record's header announcing 100 bytes, and only 3 of them.
        tcp.write_all(&[23, 3, 3, 0, 100, 1, 2, 3]).await.unwrap();
        // Half-closed: a drop with the session tickets unread would reset.
        tcp.shutdown().await.unwrap();
        let mut received = Vec::new();
        let error = server.read_to_end(&mut received).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
    }

    #[tokio::test]
    async fn a_handshake_of_garbage_or_cut_short_fails_with_an_alert_sent() {
        let (config, _) = configs(rustls::ALL_VERSIONS);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Not TLS at all: the server answers with an alert and gives up.
        let mut client = TcpStream::connect(address).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let error = TlsStream::accept(config.clone(), tcp).await.err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer.first(), Some(&21), "an alert record: {answer:?}");
        // A client that leaves within its hello: an end, not a hang.
        let mut client = TcpStream::connect(address).await.unwrap();
        client.write_all(&[22, 3, 1, 1, 0, 1]).await.unwrap();
        drop(client);
        let (tcp, _) = listener.accept().await.unwrap();
        let error = TlsStream::accept(config, tcp).await.err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
    }

    /// The rustls panic seen in CI (`deframer/buffers.rs`, a handshake range
    /// outside the buffer): a client whose certificate is refused has sent it
    /// with its CertificateVerify and Finished in one flight, which rustls still
    /// holds as ranges of our buffer when it fails on the certificate. Sending
    /// its alert must not make rustls read them out of another buffer.
    #[tokio::test]
    async fn a_refused_client_certificate_fails_the_handshake_with_an_alert_not_a_panic() {
        for versions in [&[&rustls::version::TLS13], &[&rustls::version::TLS12]] {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .unwrap();
            let server_identity =
                rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            let server_certificate = CertificateDer::from(server_identity.cert.der().to_vec());
            let server_config = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    vec![server_certificate.clone()],
                    PrivateKeyDer::try_from(server_identity.signing_key.serialize_der()).unwrap(),
                )
                .unwrap();
            // The client's certificate is its own, not the CA's.
            let stranger = rcgen::generate_simple_self_signed(vec!["stranger".to_owned()]).unwrap();
            let mut server_roots = RootCertStore::empty();
            server_roots.add(server_certificate).unwrap();
            let client_config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(server_roots)
                .with_client_auth_cert(
                    vec![CertificateDer::from(stranger.cert.der().to_vec())],
                    PrivateKeyDer::try_from(stranger.signing_key.serialize_der()).unwrap(),
                )
                .unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let accepting = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                TlsStream::accept(Arc::new(server_config), tcp).await.err()
            });
            let tcp = TcpStream::connect(address).await.unwrap();
            let connected = TlsConnector::from(Arc::new(client_config))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await;
            // TLS 1.2's client hears the alert in its handshake, TLS 1.3's on
            // its first read.
            let client_error = match connected {
                Err(error) => error,
                Ok(mut client) => client.read(&mut [0u8; 1]).await.unwrap_err(),
            };
            let server_error = accepting
                .await
                .expect("the server's handshake returns, it does not panic")
                .expect("the server refuses the certificate");
            assert_eq!(
                server_error.kind(),
                io::ErrorKind::InvalidData,
                "{server_error}"
            );
            assert!(
                server_error.to_string().contains("certificate"),
                "{server_error}"
            );
            assert!(
                client_error.to_string().contains("alert"),
                "the client was told why: {client_error}"
            );
        }
    }

    /// A handshake message declared larger than rustls takes (64 KiB) is
    /// refused from its header: the stream does not wait for the rest, nor hold
    /// it, and the connection is closed. (rustls sends no alert for this one.)
    #[tokio::test]
    async fn a_handshake_message_over_64_kib_is_refused_from_its_header() {
        let (config, _) = configs(rustls::ALL_VERSIONS);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(address).await.unwrap();
        // A record holding the header of a ClientHello that declares 16 MiB.
        // (Nothing more is sent: bytes left unread when the server closes would
        // make it reset the connection, and the client lose the alert.)
        client
            .write_all(&[22, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let accepting = TlsStream::accept(config, tcp);
        let error = tokio::time::timeout(Duration::from_secs(5), accepting)
            .await
            .expect("refused without waiting for the rest")
            .err()
            .unwrap();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert!(
            error.to_string().contains("HandshakePayloadTooLarge"),
            "{error}"
        );
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer));
        assert!(closed.await.is_ok(), "the connection is closed");
    }
}
