//! Connection limits of keymeter's two listeners. Each has a cap on open connections,
//! so that neither can run the process out of file descriptors and starve the other
//! (a slowloris on the admin port must not keep Envoy from connecting); a new gRPC
//! connection must say something within [`GRPC_HANDSHAKE_TIMEOUT`], so idle sockets
//! cannot hold its slots; and the open-file limit is raised to fit the caps.
//!
//! Everything here happens once per connection, none of it per request: a Check pays
//! one branch per socket read.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use prometheus_client::metrics::counter::Counter;

use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::metrics::label::Listener;

/// A new gRPC connection that has not sent [`HANDSHAKE_MIN_BYTES`] by then is closed:
/// Envoy sends its preface at once, so only a stuck or idle client is cut, and it
/// cannot hold one of the connection cap's slots for longer.
pub const GRPC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The HTTP/2 client preface is 24 bytes; a TLS ClientHello is longer.
const HANDSHAKE_MIN_BYTES: usize = 24;
/// After a failed accept (out of file descriptors) the listener stays readable:
/// retrying at once would spin a core, this long a pause does not.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Refused connections and accept errors are logged at most this often; the rest
/// are counted in the next line.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// File descriptors kept for all but the listeners' connections: outbox segments,
/// the broker connection, the keys file, the runtime.
const RESERVED_FDS: u64 = 256;

/// The open connections of one listener, counted without a lock.
#[derive(Debug, Clone)]
pub struct ConnectionCap {
    open: Arc<AtomicUsize>,
    max: usize,
}

/// One admitted connection; frees its place when dropped.
#[derive(Debug)]
pub struct ConnectionPermit(Arc<AtomicUsize>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionCap {
    pub fn new(max: usize) -> Self {
        ConnectionCap {
            open: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for one more connection, unless `max` are open.
    pub fn try_admit(&self) -> Option<ConnectionPermit> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionPermit(self.open.clone()))
    }
}

/// Accepts the connections of one listener, riding out accept errors: a connection
/// that went away before it was accepted is skipped, and running out of file
/// descriptors is logged and retried after a pause, never the end of the listener.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    /// Names the listener and its `listen.*_max_connections` key.
    name: Listener,
    /// `keymeter_connections_refused_total{listener}`.
    refused: Counter,
    backoff: Option<Pin<Box<Sleep>>>,
    error_log: LogLimiter,
    refused_log: LogLimiter,
}

impl Acceptor {
    /// The acceptor of listener `name`, counting its refusals in `metrics`.
    pub fn new(listener: TcpListener, name: Listener, metrics: &Metrics) -> Self {
        Acceptor {
            listener,
            name,
            refused: metrics.connections_refused(name),
            backoff: None,
            error_log: LogLimiter::new(LOG_INTERVAL),
            refused_log: LogLimiter::new(LOG_INTERVAL),
        }
    }

    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<TcpStream> {
        loop {
            if let Some(backoff) = &mut self.backoff {
                ready!(backoff.as_mut().poll(cx));
                self.backoff = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) => return Poll::Ready(stream),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    if let Some(suppressed) = self.error_log.admit() {
                        tracing::error!(
                            listener = self.name.as_str(),
                            error = %e,
                            also_failed_since_last_log = suppressed,
                            "cannot accept connections (out of file descriptors?); retrying"
                        );
                    }
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_BACKOFF)));
                }
            }
        }
    }

    pub async fn accept(&mut self) -> TcpStream {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Turns away a connection over the cap at once, with a reset (the client sees
    /// `connection reset`, and Envoy tries another keymeter), counts and logs it.
    pub fn refuse(&mut self, stream: TcpStream, max: usize) {
        self.refused.inc();
        let peer = stream.peer_addr().ok();
        // A zero linger makes close() send RST and keep no TIME_WAIT state.
        let _ = stream.set_zero_linger();
        drop(stream);
        if let Some(suppressed) = self.refused_log.admit() {
            tracing::warn!(
                listener = self.name.as_str(),
                max_connections = max,
                peer = ?peer,
                also_refused_since_last_log = suppressed,
                "connection refused: the listener has its maximum of open connections ({})",
                self.name.cap_key()
            );
        }
    }
}

/// The gRPC listener's connections for tonic: at most `cap` open at once (more are
/// refused), TCP_NODELAY, and each with a handshake deadline
/// ([`GRPC_HANDSHAKE_TIMEOUT`] in production).
#[derive(Debug)]
pub struct GrpcIncoming {
    acceptor: Acceptor,
    cap: ConnectionCap,
    handshake_timeout: Duration,
}

impl GrpcIncoming {
    /// The connections of listener `name`; those turned away over the cap are counted
    /// in `metrics`.
    pub fn new(
        listener: TcpListener,
        name: Listener,
        cap: ConnectionCap,
        handshake_timeout: Duration,
        metrics: &Metrics,
    ) -> Self {
        GrpcIncoming {
            acceptor: Acceptor::new(listener, name, metrics),
            cap,
            handshake_timeout,
        }
    }
}

impl Stream for GrpcIncoming {
    type Item = io::Result<LimitedStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let stream = ready!(this.acceptor.poll_accept(cx));
            match this.cap.try_admit() {
                Some(permit) => {
                    // Checks are small and latency-bound.
                    let _ = stream.set_nodelay(true);
                    let stream = LimitedStream::new(stream, permit, this.handshake_timeout);
                    return Poll::Ready(Some(Ok(stream)));
                }
                None => this.acceptor.refuse(stream, this.cap.max()),
            }
        }
    }
}

/// An admitted gRPC connection: holds its place under the cap until dropped, and fails
/// its reads if the client has not sent [`HANDSHAKE_MIN_BYTES`] within the handshake
/// timeout (then it is closed).
#[derive(Debug)]
pub struct LimitedStream {
    inner: TcpStream,
    _permit: ConnectionPermit,
    /// Until the first bytes arrived: the deadline and what was received.
    handshake: Option<(Pin<Box<Sleep>>, usize)>,
}

impl LimitedStream {
    fn new(inner: TcpStream, permit: ConnectionPermit, handshake_timeout: Duration) -> Self {
        LimitedStream {
            inner,
            _permit: permit,
            handshake: Some((Box::pin(tokio::time::sleep(handshake_timeout)), 0)),
        }
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some((deadline, received)) = &mut this.handshake else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                *received += read;
                if read == 0 || *received >= HANDSHAKE_MIN_BYTES {
                    this.handshake = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface or TLS ClientHello within the handshake timeout",
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Connected for LimitedStream {
    /// The TCP peer, as for a plain `TcpStream`: `Request::remote_addr` keeps working.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does: many
/// systems start services with a soft limit of 1024) and warns when it still cannot
/// hold `connections` plus a reserve: past it accept fails on both listeners,
/// Envoy's connections included.
pub fn fit_open_file_limit(connections: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    // The kernel refuses an unlimited soft limit for files (fs.nr_open caps it).
    let target = limit.rlim_max.min(1 << 20);
    if limit.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(
                from = limit.rlim_cur,
                to = target,
                "raised the open-file limit"
            );
            limit.rlim_cur = target;
        }
    }
    let needed = connections.saturating_add(RESERVED_FDS);
    if limit.rlim_cur < needed {
        tracing::warn!(
            limit = limit.rlim_cur,
            needed,
            "the open-file limit is below listen.grpc_max_connections + listen.admin_max_connections + {RESERVED_FDS}: \
             connections past it fail; raise the limit (ulimit -n, LimitNOFILE) or lower the caps"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_admits_up_to_max_and_frees_places_on_drop() {
        let cap = ConnectionCap::new(2);
        let a = cap.try_admit().unwrap();
        let _b = cap.try_admit().unwrap();
        assert!(cap.try_admit().is_none());
        drop(a);
        assert!(cap.try_admit().is_some());
        assert!(ConnectionCap::new(0).try_admit().is_none());
    }

    #[tokio::test]
    async fn a_silent_connection_fails_its_reads_after_the_handshake_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_stream::StreamExt;
        const TIMEOUT: Duration = Duration::from_millis(200);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = GrpcIncoming::new(
            listener,
            Listener::Grpc,
            ConnectionCap::new(8),
            TIMEOUT,
            &Metrics::new(),
        );
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut silent = incoming.next().await.unwrap().unwrap();
        let mut talking = incoming.next().await.unwrap().unwrap();
        talker
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(talking.read(&mut buf).await.unwrap(), 24);
        let started = tokio::time::Instant::now();
        let err = silent.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < TIMEOUT + Duration::from_secs(5));
        // The deadline is gone once the preface arrived.
        tokio::time::sleep(TIMEOUT).await;
        talker.write_all(b"x").await.unwrap();
        assert_eq!(talking.read(&mut buf).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_reset() {
        use tokio::io::AsyncReadExt;
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = GrpcIncoming::new(
            listener,
            Listener::Grpc,
            ConnectionCap::new(1),
            GRPC_HANDSHAKE_TIMEOUT,
            &Metrics::new(),
        );
        let _first = TcpStream::connect(addr).await.unwrap();
        let admitted = incoming.next().await.unwrap().unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        let next = tokio::spawn(async move { incoming.next().await.map(|r| r.unwrap()) });
        let err = second.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        // Its place is free again once the first one is gone.
        drop(admitted);
        let _third = TcpStream::connect(addr).await.unwrap();
        assert!(next.await.unwrap().is_some());
    }
}
