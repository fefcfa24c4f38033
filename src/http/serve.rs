//! The connection loop under the router, with the deadlines `axum::serve`
//! does not have.
//!
//! A client that trickles its headers, or keeps a connection open and says
//! nothing, would otherwise hold a socket and a task forever; enough of them
//! exhaust the file descriptors and Twilio's webhooks are refused. Each
//! connection therefore runs with a [`Clock`] that knows which phase it is
//! in, and its socket is wrapped in [`Guarded`], which fails a read that
//! waits past the phase's deadline:
//!
//! - *head*: from the connection's opening, or from the first byte of a
//!   request on a kept-alive connection, until hyper has parsed the headers
//!   (`server.header_read_timeout`);
//! - *busy*: the request is in the router; its body is read under
//!   `server.body_timeout` by the body layer (`super::body`), the handler
//!   under the store's own timeouts, so the socket has no deadline here;
//! - *idle*: between a response and the next request (`server.idle_timeout`).
//!
//! hyper's own `header_read_timeout` is not used: it also runs while a
//! kept-alive connection waits for its next request, so the idle time could
//! never be longer than the header time, and a proxy in front wants it longer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The socket deadlines of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub header_read: Duration,
    pub idle: Duration,
}

/// Accepts connections until `shutdown`, then stops accepting (the listener
/// is dropped, so new connections are refused), asks every open connection to
/// finish its request in hand and close, and returns once all have.
pub async fn serve(listener: TcpListener, router: Router, deadlines: Deadlines, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let builder = hyper::server::conn::http1::Builder::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: the next accept may work once
                    // connections have closed; spinning would not help them close.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let clock = Arc::new(Clock::new(deadlines));
        let io = TokioIo::new(Guarded::new(stream, clock.clone()));
        let router = router.clone();
        let service = hyper::service::service_fn(move |request| {
            let busy = clock.busy();
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await;
                drop(busy);
                response
            }
        });
        let connection = graceful.watch(builder.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // A client that went away or was cut off: nothing to act on.
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Busy,
    Idle,
}

/// Which phase a connection is in and since when.
struct Clock {
    deadlines: Deadlines,
    state: Mutex<ClockState>,
}

struct ClockState {
    phase: Phase,
    since: Instant,
    /// The waker of a read that is waiting with no deadline (busy): when the
    /// connection turns idle it must be polled again to arm the idle deadline.
    parked: Option<Waker>,
}

impl Clock {
    fn new(deadlines: Deadlines) -> Clock {
        let state = ClockState { phase: Phase::Head, since: Instant::now(), parked: None };
        Clock { deadlines, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Headers parsed, the request is in the router until the guard drops
    /// (answered, or dropped because the client went away).
    fn busy(self: &Arc<Self>) -> BusyGuard {
        self.lock().phase = Phase::Busy;
        BusyGuard(self.clone())
    }

    /// Bytes arrived: on an idle connection they start a request's head.
    fn bytes_read(&self) {
        let mut s = self.lock();
        if s.phase == Phase::Idle {
            s.phase = Phase::Head;
            s.since = Instant::now();
        }
    }

    /// When a read waiting now must give up; None while busy.
    fn deadline(&self, waker: &Waker) -> Option<Instant> {
        let mut s = self.lock();
        match s.phase {
            Phase::Head => Some(s.since + self.deadlines.header_read),
            Phase::Idle => Some(s.since + self.deadlines.idle),
            Phase::Busy => {
                s.parked = Some(waker.clone());
                None
            }
        }
    }
}

struct BusyGuard(Arc<Clock>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let parked = {
            let mut s = self.0.lock();
            s.phase = Phase::Idle;
            s.since = Instant::now();
            s.parked.take()
        };
        if let Some(waker) = parked {
            waker.wake();
        }
    }
}

/// A socket whose reads fail with `TimedOut` past the connection's deadline.
struct Guarded {
    inner: TcpStream,
    clock: Arc<Clock>,
    sleep: Pin<Box<Sleep>>,
}

impl Guarded {
    fn new(inner: TcpStream, clock: Arc<Clock>) -> Guarded {
        let sleep = Box::pin(tokio::time::sleep(clock.deadlines.header_read));
        Guarded { inner, clock, sleep }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.clock.bytes_read();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some(deadline) = self.clock.deadline(cx.waker()) else {
                    return Poll::Pending;
                };
                if self.sleep.deadline() != deadline {
                    self.sleep.as_mut().reset(deadline);
                }
                match self.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client too slow: no complete request head before the deadline, or idle too long",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
