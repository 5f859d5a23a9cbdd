//! The one shutdown primitive every listener and connection uses.
//!
//! A `Drain` is a cancellation signal ("stop accepting, finish what you have") plus a tracker of
//! the tasks still running. Listeners select on `signaled()`; connection tasks are spawned with
//! `spawn` so `drain_and_wait` can give them a deadline. Children (one per pod) are cancelled with
//! their parent, or alone when a pod leaves the mesh. It owns no sockets.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Default)]
pub struct Drain {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// A drain that is signaled with this one, or on its own (a pod leaving the mesh), and
    /// tracks its own tasks.
    pub fn child(&self) -> Self {
        Drain { token: self.token.child_token(), tracker: TaskTracker::new() }
    }

    /// Resolves once draining started.
    pub fn signaled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// An owned variant of `signaled` for `'static` tasks.
    pub fn signaled_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }

    pub fn is_signaled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Spawns a task that `drain_and_wait` waits for.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Signals the drain and waits up to `deadline` for the tracked tasks. Returns how many were
    /// still running when the deadline passed (they are dropped with the runtime).
    pub async fn drain_and_wait(&self, deadline: Duration) -> usize {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait()).await.is_ok() { 0 } else { self.tracker.len() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_tasks_that_finish_and_reports_stragglers() {
        let d = Drain::new();
        let quick = d.clone();
        d.spawn(async move {
            quick.signaled().await;
        });
        d.spawn(async { tokio::time::sleep(Duration::from_secs(60)).await });
        let left = d.drain_and_wait(Duration::from_millis(100)).await;
        assert_eq!(left, 1, "the sleeping task outlives the deadline, the listener does not");
    }

    #[tokio::test]
    async fn child_is_cancelled_with_parent_but_not_the_reverse() {
        let parent = Drain::new();
        let a = parent.child();
        let b = parent.child();
        assert_eq!(a.drain_and_wait(Duration::from_millis(10)).await, 0);
        assert!(a.is_signaled());
        assert!(!parent.is_signaled() && !b.is_signaled());
        parent.drain_and_wait(Duration::from_millis(10)).await;
        assert!(b.is_signaled());
    }
}
