//! Draining on SIGTERM: from the signal on, new API requests get a 503
//! (and `/ready` says not ready, so a load balancer moves on), while the
//! requests already in flight, streams included, run to their end or to
//! the grace period's, whichever comes first. A request counts as in
//! flight until its response body is finished or dropped. At the end of
//! the grace period the bodies still open are ended (`cut`), which drops
//! their streams, so each bills what it produced before the ledger's last
//! flush.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use tokio::sync::Notify;

use super::AppState;
use crate::error::ApiError;

#[derive(Default)]
struct Shared {
    draining: AtomicBool,
    /// Set when the grace period is over: open bodies end.
    cut: AtomicBool,
    since: OnceLock<Instant>,
    in_flight: AtomicUsize,
    changed: Notify,
}

/// The drain state of one server, shared by its handlers and its shutdown.
#[derive(Clone, Default)]
pub struct Drain(Arc<Shared>);

/// Held while a request is in flight.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::SeqCst)
    }

    /// Refuses new requests from now on.
    pub fn begin(&self) {
        self.0.since.get_or_init(Instant::now);
        self.0.draining.store(true, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }

    /// Ends every response body still open.
    pub fn cut(&self) {
        self.0.cut.store(true, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }

    /// Waits until no request is in flight, or `grace` after `begin`.
    pub async fn settled(&self, grace: Duration) {
        let deadline = self.deadline(grace);
        loop {
            let changed = self.0.changed.notified();
            if self.in_flight() == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// `grace` after `begin` (or from now, if it has not begun).
    pub fn deadline(&self, grace: Duration) -> tokio::time::Instant {
        let since = *self.0.since.get_or_init(Instant::now);
        tokio::time::Instant::from_std(since + grace)
    }

    fn enter(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.0.clone())
    }
}

/// Refuses API requests while draining; counts the others in flight until
/// their body ends.
pub async fn gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let drain = &state.drain;
    if drain.is_draining() {
        return ApiError::unavailable(
            "The server is shutting down; send the request to another instance.",
        )
        .into_response();
    }
    let held = drain.enter();
    let response = next.run(req).await;
    let shared = drain.0.clone();
    let cut = Box::pin(async move {
        loop {
            let changed = shared.changed.notified();
            if shared.cut.load(Ordering::SeqCst) {
                return;
            }
            changed.await;
        }
    });
    response.map(|body| {
        Body::new(Cuttable {
            inner: Some(body),
            cut,
            _held: held,
        })
    })
}

/// A response body that ends when the drain cuts it, and holds its
/// request's place in flight until then.
struct Cuttable {
    inner: Option<Body>,
    cut: Pin<Box<dyn Future<Output = ()> + Send>>,
    _held: InFlight,
}

impl HttpBody for Cuttable {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.cut.as_mut().poll(cx).is_ready() {
            // Dropping the inner body drops its stream, which bills it.
            this.inner = None;
        }
        match this.inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }
}
