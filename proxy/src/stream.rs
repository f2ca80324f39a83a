//! One socket type for both sides, plain or TLS, so the data path is written once.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// One read or write (`op`, which moves up to `whole` bytes) straight on
/// the socket, when tokio takes it as ready for `interest` (else `None`,
/// without a system call: the caller waits for readiness). One that moves
/// less than `whole` drained the socket (a read) or filled its buffer (a
/// write): it is marked not ready, as tokio's own `poll_read` and
/// `poll_write` do, so that the next poll waits for its wake-up instead of
/// asking it again. The operation runs inside `try_io`, which clears
/// readiness as of before it: a wake-up noted meanwhile (by the I/O driver
/// on another thread) is kept.
fn direct(
    s: &TcpStream,
    interest: Interest,
    whole: usize,
    op: impl FnOnce() -> io::Result<usize>,
) -> Option<io::Result<usize>> {
    let mut done = 0;
    let result = s.try_io(interest, || {
        done = op()?;
        if done > 0 && done < whole {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(done)
        }
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => (done > 0).then_some(Ok(done)),
        result => Some(result),
    }
}

pub enum Stream {
    Plain(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::ServerTls(s) => s.get_ref().0,
            Stream::ClientTls(s) => s.get_ref().0,
        }
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// Reads into the spare capacity of `buf`, growing it when nearly full.
    #[inline]
    pub fn poll_read_into(
        &mut self,
        buf: &mut bytes::BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        if let Stream::Plain(s) = self {
            if crate::turn::take_direct() {
                loop {
                    let room = buf.capacity() - buf.len();
                    if let Some(read) = direct(s, Interest::READABLE, room, || s.try_read_buf(buf))
                    {
                        return Poll::Ready(read);
                    }
                    // Not known readable: the task is registered for the
                    // socket's wake-up, unless it woke since.
                    if let Err(e) = std::task::ready!(s.poll_read_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
        tokio_util::io::poll_read_buf(Pin::new(self), cx, buf)
    }

    /// Whether the peer has closed the socket or sent bytes nobody asked for,
    /// checked without blocking. Only meaningful for a connection at rest.
    pub fn has_closed_or_unread(&self) -> bool {
        let mut b = [0u8; 1];
        !matches!(self.tcp().try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => {
                if crate::turn::take_direct() {
                    if let Some(write) =
                        direct(s, Interest::WRITABLE, buf.len(), || s.try_write(buf))
                    {
                        return Poll::Ready(write);
                    }
                }
                Pin::new(s).poll_write(cx, buf)
            }
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::Turn;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (Stream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (Stream::Plain(l.accept().await.unwrap().0), peer)
    }

    /// Whether tokio still takes `s` as readable: it tries an operation
    /// only then.
    fn known_readable(s: &Stream) -> bool {
        let tried = AtomicBool::new(false);
        let _ = s.tcp().try_io(Interest::READABLE, || {
            tried.store(true, Ordering::Relaxed);
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
        tried.load(Ordering::Relaxed)
    }

    /// Polls a read into `buf` in a turn of its own, as a session does.
    async fn read_in_turn(s: &mut Stream, buf: &mut bytes::BytesMut) -> usize {
        Turn(std::future::poll_fn(|cx| s.poll_read_into(buf, cx)))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_direct_read_that_drains_the_socket_waits_for_the_next_wake_up() {
        let (mut s, mut peer) = pair().await;
        let mut buf = bytes::BytesMut::new();
        peer.write_all(b"first").await.unwrap();
        assert_eq!(read_in_turn(&mut s, &mut buf).await, 5);
        // Drained: the next poll would not ask the socket again (which
        // would cost a system call that finds nothing).
        assert!(!known_readable(&s));
        // And data sent later wakes the reader.
        let reader = tokio::spawn(async move {
            let mut buf = bytes::BytesMut::new();
            let n = read_in_turn(&mut s, &mut buf).await;
            (n, buf)
        });
        crate::timer::sleep(std::time::Duration::from_millis(20)).await;
        peer.write_all(b"second").await.unwrap();
        let (n, buf) = crate::timer::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the read was woken")
            .unwrap();
        assert_eq!((n, &buf[..]), (6, &b"second"[..]));
    }

    #[tokio::test]
    async fn direct_writes_reach_the_peer_and_a_full_socket_waits() {
        let (mut s, mut peer) = pair().await;
        let chunk = vec![7u8; 64 * 1024];
        // Written in a turn until the socket's buffers are full (the peer
        // reads nothing meanwhile).
        let mut written = 0;
        loop {
            let w = Turn(std::future::poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut s).poll_write(cx, &chunk))
            }))
            .await;
            match w {
                Poll::Ready(Ok(n)) => written += n,
                Poll::Pending => break,
                Poll::Ready(Err(e)) => panic!("{e}"),
            }
        }
        assert!(written > 0);
        // What was written arrives whole.
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; written];
            tokio::io::AsyncReadExt::read_exact(&mut peer, &mut got)
                .await
                .unwrap();
            got.iter().all(|&b| b == 7)
        });
        assert!(reader.await.unwrap());
    }
}
