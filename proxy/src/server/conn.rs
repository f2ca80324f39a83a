//! A raw connection to one Postgres server: connect, optional TLS, startup and
//! authentication (SCRAM-SHA-256, md5, cleartext, trust). After startup the
//! session drives the socket directly; this type only carries the connection's
//! state so the pool can tell a clean connection from a dirty one.

use crate::protocol::backend::{parse_error_fields, ErrorFields};
use crate::protocol::startup;
use crate::server::statements::ServerStatements;
use crate::server::vars::SessionVars;
use crate::stream::Stream;
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{AuthenticationSaslBody, Message};
use postgres_protocol::message::frontend;
use shardline_config::ServerTlsMode;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything needed to open a connection to one server as one role.
#[derive(Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub tls_mode: ServerTlsMode,
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// Sent as `application_name` (set for the proxy's own connections).
    pub application_name: Option<&'static str>,
}

impl ServerTarget {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Whether connections opened for `other` would be the same logins.
    pub fn same_login(&self, other: &ServerTarget) -> bool {
        self.host == other.host
            && self.port == other.port
            && self.user == other.user
            && self.password == other.password
            && self.database == other.database
            && self.tls_mode == other.tls_mode
            && self.application_name == other.application_name
    }
}

impl std::fmt::Debug for ServerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not connect to server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("server {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("server {addr}: TLS: {message}")]
    Tls { addr: String, message: String },
    #[error("server {addr} refused the connection: {} {}", fields.code, fields.message)]
    Refused { addr: String, fields: ErrorFields },
    #[error("server {addr}: {message}")]
    Protocol { addr: String, message: String },
}

/// One server connection and what the proxy knows of its state.
pub struct ServerConnection {
    /// Listed in its node's registry so a failed node's connections can be
    /// cut at once. Declared first: dropped (unlisted) before the socket closes.
    pub listed: Option<Listed>,
    /// Reached through `poll_fill` (the session's reads), `writer` (writes)
    /// and `stream` (anything else), so no read escapes `read_watch`.
    stream: Stream,
    /// Whether the last read of `stream` through `poll_fill` went pending
    /// with nothing since (`wake::ReadWatch`).
    read_watch: crate::wake::ReadWatch,
    /// Bytes read from the server not yet processed.
    pub read_buf: BytesMut,
    pub addr: Arc<str>,
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus values the server reported at startup.
    pub params: Vec<(String, String)>,
    /// Transaction status from the last ReadyForQuery: `I`, `T` or `E`.
    pub tx_status: u8,
    /// Set when the connection's state is unknown (error mid-message, desync).
    pub broken: bool,
    /// Session variables in effect on this connection.
    pub vars: Arc<SessionVars>,
    /// Named statements prepared on this connection.
    pub statements: ServerStatements,
    /// Token of the client Parse that last set the unnamed statement.
    pub unnamed_token: u64,
    pub created: Instant,
    /// The pool's generation when it was opened (`pool.rs`, RECONNECT).
    pub generation: u64,
}

impl ServerConnection {
    /// Reads what the server sent into `read_buf`. With `watch`, a plain
    /// socket whose last read here went pending is not polled again until
    /// it wakes the watch: a session woken by its client between the
    /// statements of a transaction does not poll its server on the way.
    /// Without it the socket is polled with the task's own waker, which
    /// costs less when the session lets the connection go once answered
    /// (the watch registers the task on every pending read). TLS reads are
    /// always polled, as rustls may read on other paths of the stream.
    #[inline]
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, watch: bool) -> Poll<io::Result<usize>> {
        let (stream, buf) = (&mut self.stream, &mut self.read_buf);
        if watch && !stream.is_tls() {
            self.read_watch
                .poll(cx, |cx| stream.poll_read_into(buf, cx))
        } else {
            self.read_watch.forget();
            stream.poll_read_into(buf, cx)
        }
    }

    /// The stream, to write to only: writing leaves the read's waker alone.
    #[inline]
    pub fn writer(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// The stream, for any use: the next `poll_fill` polls it again.
    pub fn stream(&mut self) -> &mut Stream {
        self.read_watch.forget();
        &mut self.stream
    }

    /// The stream, to look at (its socket's address, whether it is closed).
    pub fn socket(&self) -> &Stream {
        &self.stream
    }

    /// The connection goes back to its pool: the session that polled it
    /// last is let go (`wake::ReadWatch::release`).
    #[inline]
    pub fn idle(&mut self) {
        self.read_watch.release();
    }

    /// Whether the connection may be handed to another client.
    pub fn is_clean(&self) -> bool {
        !self.broken && self.tx_status == b'I' && self.read_buf.is_empty()
    }

    pub async fn connect(
        target: &ServerTarget,
        max_prepared: usize,
    ) -> Result<ServerConnection, ServerError> {
        let addr = target.address();
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| ServerError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let io_err = |source| ServerError::Io {
            addr: addr.clone(),
            source,
        };
        let mut stream = match target.tls_mode {
            ServerTlsMode::Disable => Stream::Plain(tcp),
            mode => negotiate_tls(tcp, target, mode == ServerTlsMode::Require).await?,
        };
        let mut params = vec![
            ("user", target.user.as_str()),
            ("database", target.database.as_str()),
        ];
        params.push(("client_encoding", "UTF8"));
        if let Some(name) = target.application_name {
            params.push(("application_name", name));
        }
        stream
            .write_all(&startup::startup_message(&params))
            .await
            .map_err(io_err)?;

        let mut conn = ServerConnection::over(stream, addr.into(), max_prepared);
        conn.authenticate(target).await?;
        Ok(conn)
    }

    /// A connection over `stream`, before its startup is answered.
    fn over(stream: Stream, addr: Arc<str>, max_prepared: usize) -> ServerConnection {
        ServerConnection {
            listed: None,
            stream,
            read_watch: Default::default(),
            read_buf: BytesMut::with_capacity(16 * 1024),
            addr,
            pid: 0,
            secret: 0,
            params: Vec::new(),
            tx_status: b'I',
            broken: false,
            vars: Arc::default(),
            statements: ServerStatements::new(max_prepared),
            unnamed_token: 0,
            created: Instant::now(),
            generation: 0,
        }
    }

    /// Runs one simple query and returns its rows as text (NULL as `None`)
    /// with the transaction status it ended in. For the proxy's own work
    /// (health checks, resets), not for clients' queries. A server error
    /// becomes `ServerError::Refused`.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<(Vec<Vec<Option<String>>>, u8), ServerError> {
        use crate::protocol::backend::{DATA_ROW, ERROR_RESPONSE, READY_FOR_QUERY};
        // A simple query drops the connection's unnamed statement.
        self.unnamed_token = 0;
        let mut out = BytesMut::new();
        crate::protocol::frontend::write_query(&mut out, sql);
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            while let Ok(Some((tag, len))) =
                crate::protocol::peek_header(&self.read_buf, usize::MAX)
            {
                if self.read_buf.len() < len {
                    break;
                }
                let msg = self.read_buf.split_to(len);
                let body = &msg[5..];
                match tag {
                    DATA_ROW => rows.push(
                        crate::protocol::rows::row_values(&msg)
                            .ok_or_else(|| self.protocol_error("malformed DataRow".into()))?
                            .into_iter()
                            .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                            .collect(),
                    ),
                    ERROR_RESPONSE => error = Some(parse_error_fields(body)),
                    READY_FOR_QUERY => {
                        self.tx_status = body.first().copied().unwrap_or(b'E');
                        return match error {
                            Some(fields) => Err(ServerError::Refused {
                                addr: self.addr.to_string(),
                                fields,
                            }),
                            None => Ok((rows, self.tx_status)),
                        };
                    }
                    _ => {}
                }
            }
            self.read_more("").await?;
        }
    }

    /// Reads more of the server's bytes into `read_buf`; end of stream is an error.
    async fn read_more(&mut self, during: &str) -> Result<(), ServerError> {
        self.read_watch.forget();
        let n = self
            .stream
            .read_buf(&mut self.read_buf)
            .await
            .map_err(|source| ServerError::Io {
                addr: self.addr.to_string(),
                source,
            })?;
        if n == 0 {
            return Err(self.protocol_error(format!("server closed the connection{during}")));
        }
        Ok(())
    }

    /// The server's next whole message as it came (tag, length, body),
    /// noting the transaction status a ReadyForQuery carries. Messages
    /// already buffered are returned without awaiting anything but a unit
    /// of the task's budget (which yields to the runtime when spent): a
    /// merge reading millions of rows would otherwise keep the worker
    /// thread from every other client.
    pub async fn raw_message(&mut self) -> Result<BytesMut, String> {
        tokio::task::consume_budget().await;
        loop {
            if let Ok(Some((_, len))) = crate::protocol::peek_header(&self.read_buf, usize::MAX) {
                if self.read_buf.len() >= len {
                    let msg = self.read_buf.split_to(len);
                    if msg[0] == crate::protocol::backend::READY_FOR_QUERY {
                        self.tx_status = msg.get(5).copied().unwrap_or(b'E');
                    }
                    return Ok(msg);
                }
            }
            self.read_watch.forget();
            let n = self
                .stream
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|e| format!("server {}: {e}", self.addr))?;
            if n == 0 {
                return Err(format!("server {} closed the connection", self.addr));
            }
        }
    }

    async fn read_message(&mut self) -> Result<Message, ServerError> {
        loop {
            match Message::parse(&mut self.read_buf) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => {
                    return Err(self.protocol_error(format!("bad message during startup: {e}")))
                }
            }
            self.read_more(" during startup").await?;
        }
    }

    fn protocol_error(&self, message: String) -> ServerError {
        ServerError::Protocol {
            addr: self.addr.to_string(),
            message,
        }
    }

    async fn send(&mut self, buf: &BytesMut) -> Result<(), ServerError> {
        self.writer()
            .write_all(buf)
            .await
            .map_err(|source| ServerError::Io {
                addr: self.addr.to_string(),
                source,
            })
    }

    fn password<'a>(&self, target: &'a ServerTarget) -> Result<&'a str, ServerError> {
        target.password.as_deref().ok_or_else(|| {
            self.protocol_error(format!(
                "server asks user {} for a password but none is configured (set password or server_password)",
                target.user
            ))
        })
    }

    async fn authenticate(&mut self, target: &ServerTarget) -> Result<(), ServerError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let mut out = BytesMut::new();
            match self.read_message().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = self.password(target)?;
                    frontend::password_message(pw.as_bytes(), &mut out)
                        .map_err(|e| self.protocol_error(e.to_string()))?;
                    self.send(&out).await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = self.password(target)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        target.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|e| self.protocol_error(e.to_string()))?;
                    self.send(&out).await?;
                }
                Message::AuthenticationSasl(body) => {
                    if !sasl_offers_scram(&body) {
                        return Err(self.protocol_error(
                            "server offers no SASL mechanism the proxy supports".into(),
                        ));
                    }
                    let pw = self.password(target)?;
                    let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                        .map_err(|e| self.protocol_error(e.to_string()))?;
                    scram = Some(s);
                    self.send(&out).await?;
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol_error("unexpected SASL continue".into()))?;
                    s.update(body.data())
                        .map_err(|e| self.protocol_error(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut out)
                        .map_err(|e| self.protocol_error(e.to_string()))?;
                    self.send(&out).await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let mut s = scram
                        .take()
                        .ok_or_else(|| self.protocol_error("unexpected SASL final".into()))?;
                    s.finish(body.data()).map_err(|e| {
                        self.protocol_error(format!("server's SCRAM signature is invalid: {e}"))
                    })?;
                }
                Message::ParameterStatus(body) => {
                    let (Ok(k), Ok(v)) = (body.name(), body.value()) else {
                        return Err(self.protocol_error("bad ParameterStatus".into()));
                    };
                    self.params.push((k.to_string(), v.to_string()));
                }
                Message::BackendKeyData(body) => {
                    self.pid = body.process_id();
                    self.secret = body.secret_key();
                }
                Message::ReadyForQuery(body) => {
                    self.tx_status = body.status();
                    return Ok(());
                }
                Message::ErrorResponse(body) => {
                    let raw = body_bytes_of_error(&body);
                    return Err(ServerError::Refused {
                        addr: self.addr.to_string(),
                        fields: parse_error_fields(&raw),
                    });
                }
                Message::NoticeResponse(_) => {}
                _ => return Err(self.protocol_error("unexpected message during startup".into())),
            }
        }
    }
}

fn sasl_offers_scram(body: &AuthenticationSaslBody) -> bool {
    use fallible_iterator::FallibleIterator;
    let mut it = body.mechanisms();
    while let Ok(Some(m)) = it.next() {
        if m == "SCRAM-SHA-256" {
            return true;
        }
    }
    false
}

/// Re-encodes an ErrorResponse's fields so `parse_error_fields` can read them.
fn body_bytes_of_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> Vec<u8> {
    use fallible_iterator::FallibleIterator;
    let mut out = Vec::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        out.push(f.type_());
        out.extend_from_slice(f.value_bytes());
        out.push(0);
    }
    out.push(0);
    out
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    target: &ServerTarget,
    required: bool,
) -> Result<Stream, ServerError> {
    let addr = target.address();
    let io_err = |source| ServerError::Io {
        addr: addr.clone(),
        source,
    };
    tcp.write_all(&startup::code_packet(startup::SSL_REQUEST, &[]))
        .await
        .map_err(io_err)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io_err)?;
    match (answer[0], &target.tls) {
        (b'S', Some(connector)) => {
            let name = crate::tls::server_name(&target.host).map_err(|e| ServerError::Tls {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| ServerError::Tls {
                    addr: addr.clone(),
                    message: e.to_string(),
                })?;
            Ok(Stream::ClientTls(Box::new(tls)))
        }
        (b'N', _) if !required => Ok(Stream::Plain(tcp)),
        (b'N', _) => Err(ServerError::Tls {
            addr,
            message: "server does not support TLS and server_tls = \"require\"".into(),
        }),
        _ => Err(ServerError::Tls {
            addr,
            message: "unexpected answer to SSLRequest".into(),
        }),
    }
}

/// The open connections to one node, by socket, so that they can all be
/// cut at once when the node stops answering, and listed by the console.
#[derive(Default)]
pub struct Connections {
    open: Mutex<HashMap<u64, (RawFd, Listing)>>,
    next: AtomicU64,
    /// Cuts so far: a connection listed before the last one was cut.
    cuts: AtomicU64,
}

/// What the console shows of a server connection (SHOW SERVERS).
#[derive(Debug, Clone)]
pub struct Listing {
    pub pid: i32,
    pub user: String,
    pub database: String,
    pub local: Option<std::net::SocketAddr>,
    pub connected: std::time::SystemTime,
    /// The proxy's own (health checks, 2PC) rather than a pool's.
    pub application_name: Option<&'static str>,
}

impl Connections {
    /// Lists a connection until the returned entry is dropped.
    pub fn list(self: &Arc<Self>, conn: &ServerConnection, target: &ServerTarget) -> Listed {
        let tcp = conn.socket().tcp();
        let listing = Listing {
            pid: conn.pid,
            user: target.user.clone(),
            database: target.database.clone(),
            local: tcp.local_addr().ok(),
            connected: std::time::SystemTime::now(),
            application_name: target.application_name,
        };
        self.enter(tcp.as_raw_fd(), listing)
    }

    fn enter(self: &Arc<Self>, fd: RawFd, listing: Listing) -> Listed {
        let id = self.next.fetch_add(1, Relaxed);
        // Read under the lock a cut takes: listed before a cut or after it.
        let open = self.open.lock();
        let epoch = self.cuts.load(Relaxed);
        if let Ok(mut m) = open {
            m.insert(id, (fd, listing));
        }
        Listed {
            registry: self.clone(),
            id,
            epoch,
        }
    }

    /// Every listed connection, oldest first.
    pub fn listings(&self) -> Vec<Listing> {
        let Ok(m) = self.open.lock() else {
            return Vec::new();
        };
        let mut all: Vec<(u64, Listing)> = m.iter().map(|(id, (_, l))| (*id, l.clone())).collect();
        all.sort_by_key(|(id, _)| *id);
        all.into_iter().map(|(_, l)| l).collect()
    }

    /// Shuts down every listed connection and forgets them (a shut-down
    /// socket stays shut: the next cut counts only connections opened
    /// since). Returns how many it cut.
    pub fn cut(&self) -> usize {
        let Ok(mut m) = self.open.lock() else {
            return 0;
        };
        for (fd, _) in m.values() {
            // SAFETY: the fd is open: a connection unlists itself (under this
            // lock) before its socket is closed, and one unlisted here is
            // never touched again. shutdown() does not close it.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
        let cut = m.len();
        m.clear();
        self.cuts.fetch_add(1, Relaxed);
        cut
    }
}

/// A connection's entry in its node's [`Connections`]; removed on drop.
pub struct Listed {
    registry: Arc<Connections>,
    id: u64,
    /// The registry's cuts when listed.
    epoch: u64,
}

impl Listed {
    /// Whether the connection was cut (its socket shut down) since listed.
    pub fn is_cut(&self) -> bool {
        self.registry.cuts.load(Relaxed) != self.epoch
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        if let Ok(mut m) = self.registry.open.lock() {
            m.remove(&self.id);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wake::tests::counted_task;
    use std::io::Read;

    /// A cut shuts the listed sockets once: the next cut finds (and
    /// counts) none of them again, while the sockets stay shut down.
    #[test]
    fn connections_are_cut_once() {
        let registry = Arc::new(Connections::default());
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        let listing = Listing {
            pid: 1,
            user: "u".into(),
            database: "d".into(),
            local: None,
            connected: std::time::SystemTime::now(),
            application_name: None,
        };
        let listed = registry.enter(ours.as_raw_fd(), listing.clone());
        assert!(!listed.is_cut());
        assert_eq!(registry.cut(), 1);
        assert!(listed.is_cut(), "known to be cut, as a pool checks");
        let (later, _peer) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        let after = registry.enter(later.as_raw_fd(), listing);
        assert!(!after.is_cut(), "listed after the cut");
        drop(after);
        assert_eq!(registry.cut(), 0, "counted once");
        let mut buf = [0u8; 1];
        assert_eq!(
            theirs.read(&mut buf).expect("read"),
            0,
            "the peer sees the end"
        );
        drop(ours);
    }

    /// A connection over a local socket, and the socket's other end.
    pub(crate) async fn local_pair() -> (ServerConnection, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let ours = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (theirs, _) = listener.accept().await.expect("accept");
        let conn = ServerConnection::over(Stream::Plain(ours), "local".into(), 8);
        (conn, theirs)
    }

    /// A connection whose watched read went pending is read `elsewhere`
    /// (with the task's waker at hand); then its peer sends a byte: once
    /// the socket is readable, a watched `poll_fill` must read it, not wait
    /// for a wake-up that now goes to another waker.
    async fn assert_watched_fill_reads_after(
        elsewhere: impl FnOnce(&mut ServerConnection, &mut Context<'_>),
    ) {
        let (mut conn, mut peer) = local_pair().await;
        let (_task, waker) = counted_task();
        let mut cx = Context::from_waker(&waker);
        assert!(conn.poll_fill(&mut cx, true).is_pending());
        elsewhere(&mut conn, &mut cx);
        peer.write_all(b"x").await.expect("write");
        conn.socket().tcp().readable().await.expect("readable");
        assert!(
            matches!(conn.poll_fill(&mut cx, true), Poll::Ready(Ok(1))),
            "the byte is read"
        );
        assert_eq!(&conn.read_buf[..], b"x");
    }

    /// A read of the socket other than `poll_fill` (the fan-out's, a
    /// reset's) takes the socket's registration from the watch.
    #[tokio::test]
    async fn a_read_through_the_stream_makes_the_next_fill_read() {
        use tokio::io::{AsyncRead, ReadBuf};
        assert_watched_fill_reads_after(|conn, _| {
            let (_other, other_waker) = counted_task();
            let mut byte = [0u8; 1];
            let mut buf = ReadBuf::new(&mut byte);
            assert!(std::pin::Pin::new(conn.stream())
                .poll_read(&mut Context::from_waker(&other_waker), &mut buf)
                .is_pending());
        })
        .await;
    }

    /// An unwatched read (a connection that was let go once answered) holds
    /// the task's own waker.
    #[tokio::test]
    async fn an_unwatched_read_makes_the_next_watched_one_read() {
        assert_watched_fill_reads_after(|conn, cx| {
            assert!(conn.poll_fill(cx, false).is_pending());
        })
        .await;
    }

    /// A connection back in its pool lets its last session's task go; what
    /// its server sends meanwhile is read by the next session's first poll.
    #[tokio::test]
    async fn an_idle_connection_wakes_no_one_and_keeps_its_wake_up() {
        let (mut conn, mut peer) = local_pair().await;
        let (first, first_waker) = counted_task();
        assert!(conn
            .poll_fill(&mut Context::from_waker(&first_waker), true)
            .is_pending());
        conn.idle();
        peer.write_all(b"N").await.expect("write");
        conn.socket().tcp().readable().await.expect("readable");
        assert_eq!(first.0.load(Relaxed), 0, "the session let go is not woken");
        let (_next, next_waker) = counted_task();
        assert!(
            matches!(
                conn.poll_fill(&mut Context::from_waker(&next_waker), true),
                Poll::Ready(Ok(1))
            ),
            "the next session reads what came meanwhile"
        );
    }
}
