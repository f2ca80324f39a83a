//! The session's socket work: one poll function that writes what is buffered
//! for each side and reads from whichever side has data, so a session never
//! blocks writing to one peer while the other waits for it to read.

use super::Session;
use crate::server::ServerConnection;
use crate::stream::Stream;
use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncWrite, AsyncWriteExt};

pub(super) enum Event {
    /// The proxy is shutting down (reported once).
    Stop,
    /// The console killed the client.
    Killed,
    ClientData,
    ServerData,
    ClientClosed,
    ServerLost(io::Error),
}

impl Session {
    pub(super) fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let fired = self.client.ending.poll_from(cx, &mut self.ending_waker);
        if fired != 0 {
            use crate::clients::Ending;
            if fired & Ending::KILL != 0 {
                return Poll::Ready(Event::Killed);
            }
            if !self.stopping {
                self.stopping = true;
                return Poll::Ready(Event::Stop);
            }
        }
        // Writes first: they free buffer space that gates the reads below.
        if let Some(server) = self.server.as_mut() {
            if let Err(e) = poll_drain(server.writer(), &mut self.server_out, cx, |_| {}) {
                return Poll::Ready(Event::ServerLost(e));
            }
        }
        self.count_queued();
        let meter = &mut self.meter;
        let drained = poll_drain(&mut self.login.stream, &mut self.client_out, cx, |w| {
            meter.drained(w.len())
        });
        if drained.is_err() {
            return Poll::Ready(Event::ClientClosed);
        }
        if self.client_out.len() < super::BACKPRESSURE {
            // A connection kept while the client is waited on (in a
            // transaction, or kept between them) is read through its watch.
            let keeps = self.keeps_connection();
            if let Some(server) = self.server.as_mut() {
                let server: &mut ServerConnection = server;
                let watch = keeps || server.tx_status != b'I';
                match server.poll_fill(cx, watch) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Event::ServerLost(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "server closed the connection",
                        )))
                    }
                    Poll::Ready(Ok(_)) => return Poll::Ready(Event::ServerData),
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerLost(e)),
                    Poll::Pending => {}
                }
            }
        }
        if self.server_out.len() < super::BACKPRESSURE {
            if let Poll::Ready(event) = self.poll_client_read(cx) {
                return Poll::Ready(event);
            }
        }
        Poll::Pending
    }

    /// Reads what the client sent into `client_in`, within its bound:
    /// `ClientData` or `ClientClosed`.
    fn poll_client_read(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if !self.reads_client() {
            return Poll::Pending;
        }
        let (stream, buf) = (&mut self.login.stream, &mut self.client_in);
        let read = if stream.is_tls() {
            // rustls may read or write the socket on other paths of
            // the stream: its reads are always polled.
            stream.poll_read_into(buf, cx)
        } else {
            // Woken by the server, say: a client read already waiting
            // for data is not polled again.
            self.client_read
                .poll(cx, |cx| stream.poll_read_into(buf, cx))
        };
        match read {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Event::ClientClosed),
            Poll::Ready(Ok(n)) => {
                if let Some(at) = self.meter.received(n) {
                    self.client.request(at);
                }
                Poll::Ready(Event::ClientData)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// While the session waits on a unit's shards (`Session::leg_next`):
    /// ready when the client left (closed its socket) or was killed from
    /// the console. What it sends meanwhile (the rest of a pipeline) is
    /// read into `client_in` for after the unit, within its bound; a
    /// shutdown is noted for the session's next idle moment.
    pub(super) fn poll_client_left(&mut self, cx: &mut Context<'_>) -> Poll<super::End> {
        let fired = self.client.ending.poll_from(cx, &mut self.ending_waker);
        if fired & crate::clients::Ending::KILL != 0 {
            return Poll::Ready(super::End::Fatal(super::killed()));
        }
        if fired != 0 {
            self.stopping = true;
        }
        loop {
            match self.poll_client_read(cx) {
                Poll::Ready(Event::ClientData) => continue,
                Poll::Ready(_) => return Poll::Ready(super::End::ClientGone),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Whether to read more from the client: while what it sent waits
    /// (for a server, or behind a unit in flight) at most
    /// `CLIENT_IN_LIMIT` bytes are held, beyond the one message still
    /// arriving, so a client streaming while its session waits is slowed
    /// by TCP, not buffered.
    fn reads_client(&self) -> bool {
        if self.client_in.len() < super::CLIENT_IN_LIMIT {
            return true;
        }
        // The front message still arriving (its size is bounded by
        // `max_message_size` when its header is read).
        match crate::protocol::peek_header(&self.client_in, usize::MAX) {
            Ok(Some((_, len))) => self.client_in.len() < len,
            _ => true,
        }
    }

    /// Counts what was added to the client's output buffer before it is
    /// written (`more`: the client has sent more than what is answered).
    #[inline(always)]
    pub(super) fn count_queued(&mut self) {
        let more = !self.client_in.is_empty();
        let sinks = crate::stats::Sinks {
            user: &self.login.user.stats,
            events: &self.shared.events,
            shards: &self.shared.topology.shards,
            slow_us: self.shared.slow_us,
        };
        if self.shared.caching {
            let from = self.meter.counted(&self.client_out);
            let ready = self.meter.queued(&self.client_out, more, sinks);
            self.cache_queued(from, ready);
        } else {
            self.meter.queued(&self.client_out, more, sinks);
        }
        if let Some(us) = self.meter.take_slow() {
            self.log_slow(us);
        }
    }

    /// Writes everything buffered for the client (used when ending a session).
    pub(super) async fn flush_client(&mut self) {
        let _ = self.write_client().await;
    }

    /// Writes everything buffered for the client, waiting as long as it takes.
    pub(super) async fn write_client(&mut self) -> io::Result<()> {
        self.count_queued();
        self.login.stream.write_all(&self.client_out).await?;
        self.login.stream.flush().await?;
        self.meter.drained(self.client_out.len());
        self.client_out.clear();
        Ok(())
    }
}

/// Writes as much of `buf` as the socket takes without blocking, showing
/// what was written to `written` first.
fn poll_drain(
    stream: &mut Stream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    mut written: impl FnMut(&[u8]),
) -> io::Result<()> {
    while !buf.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                written(&buf[..n]);
                buf.advance(n);
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(()),
        }
    }
    // Written out: a buffer grown for a large message is given back now,
    // not at the session's next event.
    shrink(buf);
    if stream.is_tls() {
        // rustls may hold ciphertext until flushed.
        if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_flush(cx) {
            return Err(e);
        }
    }
    Ok(())
}

/// Buffers above this capacity are given back once mostly empty: one
/// large message must not leave its size allocated for the session's (or
/// the pooled connection's) lifetime.
const SHRINK_ABOVE: usize = 1 << 20;

/// Gives a grown buffer's memory back when what it holds is a small part
/// of it (the bytes kept are copied into a buffer of their own size).
#[inline]
pub(super) fn shrink(buf: &mut BytesMut) {
    // Checked for four buffers after every event: kept to one comparison
    // inline, the copy out of line.
    if buf.capacity() > SHRINK_ABOVE && buf.len() < buf.capacity() / 4 {
        shrink_now(buf);
    }
}

#[cold]
fn shrink_now(buf: &mut BytesMut) {
    let mut small = BytesMut::with_capacity(buf.len().max(16 * 1024));
    small.extend_from_slice(buf);
    *buf = small;
}

impl Session {
    /// After each event: buffers grown for a large message shrink back.
    pub(super) fn shrink_buffers(&mut self) {
        shrink(&mut self.client_in);
        shrink(&mut self.client_out);
        shrink(&mut self.server_out);
        if let Some(server) = self.server.as_mut() {
            shrink(&mut server.read_buf);
        }
    }
}

/// Clears everything a session left on a connection (session pooling).
pub(super) async fn reset_connection(conn: &mut ServerConnection) -> io::Result<()> {
    let (_, status) = conn
        .simple_query("DISCARD ALL")
        .await
        .map_err(io::Error::other)?;
    conn.statements.clear();
    conn.vars = Default::default();
    conn.unnamed_token = 0;
    if conn.read_buf.is_empty() && status == b'I' {
        Ok(())
    } else {
        Err(io::Error::other("unexpected data after DISCARD ALL"))
    }
}
