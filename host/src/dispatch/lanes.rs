//! Lanes: the long-lived tasks a trigger's invocations run in.
//!
//! A trigger owns a few lanes, one per thread its tenant's guests run on,
//! and hands each admitted message to the least busy lane, instead of
//! spawning a task per message. A lane runs its invocations concurrently in
//! one task (`FuturesUnordered`), so a guest waiting in a host call does not
//! hold the others up, and a busy lane takes new work from its queue without
//! anyone being woken. Parallelism across cores comes from having one lane
//! per thread.
//!
//! Where workers park between messages (many concurrent requesters, JetStream
//! pulls) this saved 12-15 % of the CPU per message against a task per
//! message; with both cores saturated by core-sub it made no measurable
//! difference (BENCHMARKS.md).
//!
//! What a lane gives up against a task per message: an invocation cannot
//! move to another thread once its lane has it. A CPU-bound guest therefore
//! delays the other invocations in its lane until it yields at the next
//! epoch tick; new messages go to the other lanes meanwhile.
//!
//! An invocation of a tenant on the host's threads skips its lane when the
//! lanes are idle ([`Lanes::idle_on_host_threads`]): it is polled first on
//! the trigger's task, and reaches a lane only if it waits (a fresh-mode
//! one always does, after its call: its instance's drop and the next
//! standby instantiation run in a lane; [`super::Dispatcher::start`] says
//! why). What that gives up: during the poll the trigger reads nothing, for
//! up to one epoch tick of guest code, plus, in reuse mode, an
//! instantiation when the pool is empty, or the drop of an instance that
//! trapped.
//!
//! Admission (the concurrency permits) happens before a message reaches a
//! lane, so queues never hold more than the permits allow. Each job carries
//! a token of the dispatcher's task tracker, so shutdown still waits for, and
//! counts, invocations rather than lanes.
//!
//! A lane hands the box of a job that finished back to its trigger, which
//! puts a later job in it: a job's state is kilobytes, past glibc's
//! per-thread cache, and allocating it for every message that goes to a
//! lane (every one in fresh mode) and freeing it on another thread took a
//! trip through malloc's locked bins each time.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;

use super::LoadedHandler;
use crate::tenant::Tenant;

/// One invocation, ready to run (already admitted): its trigger's job
/// future, boxed.
pub(crate) type Job<F> = Pin<Box<F>>;

/// How many boxes of finished jobs the lanes keep for their trigger. More
/// would only hold memory: the trigger takes one per job it starts.
const RETURNED_MAX: usize = 8;

/// The lanes of one trigger, whose jobs are `F`s. Dropping them lets each
/// lane finish what it holds and end.
pub(crate) struct Lanes<F> {
    lanes: Vec<Lane<F>>,
    /// Boxes of jobs that finished in a lane, for the trigger's next jobs.
    returned: Arc<Mutex<Vec<Job<F>>>>,
    /// Where the lanes run: the tenant's guest threads, or the host's.
    runtime: tokio::runtime::Handle,
    /// Whether that is the host's threads, where triggers run too.
    on_host_threads: bool,
}

struct Lane<F> {
    queue: mpsc::UnboundedSender<Job<F>>,
    /// Jobs queued or running in the lane.
    load: Arc<AtomicUsize>,
}

impl<F: Future<Output = ()> + Send + 'static> Lanes<F> {
    /// Starts the lanes for `handler`'s trigger. A handler keeps its tenant
    /// across reloads (a different tenant is a different handler), so these
    /// lanes stay on the right threads for every version.
    pub(crate) fn for_handler(handler: &LoadedHandler) -> Lanes<F> {
        Lanes::start(&handler.tenant, handler.manifest.limits.max_concurrency)
    }

    /// Starts lanes on `tenant`'s guest threads (the host's when it has
    /// none): one per thread, but no more than `max_concurrency`, since more
    /// lanes than invocations in flight would only sit idle.
    fn start(tenant: &Tenant, max_concurrency: u32) -> Lanes<F> {
        let own = tenant.runtime();
        let on_host_threads = own.is_none();
        let runtime = own.unwrap_or_else(tokio::runtime::Handle::current);
        let threads = runtime.metrics().num_workers();
        let count = threads.min(max_concurrency as usize).max(1);
        let returned = Arc::new(Mutex::new(Vec::with_capacity(RETURNED_MAX)));
        let lanes = (0..count)
            .map(|_| {
                let (queue, jobs) = mpsc::unbounded_channel();
                let load = Arc::new(AtomicUsize::new(0));
                runtime.spawn(run(jobs, load.clone(), returned.clone()));
                Lane { queue, load }
            })
            .collect();
        Lanes { lanes, returned, runtime, on_host_threads }
    }

    /// The box of a job that finished in a lane, if one is waiting.
    pub(crate) fn returned_box(&self) -> Option<Job<F>> {
        self.returned.lock().unwrap_or_else(PoisonError::into_inner).pop()
    }

    /// Whether an invocation may run on the trigger's own task instead of a
    /// lane: the lanes run on the host's threads, where the trigger does
    /// (a tenant with threads of its own must have its guests run there),
    /// and no lane holds a job (nothing is queued or running in them).
    pub(crate) fn idle_on_host_threads(&self) -> bool {
        self.on_host_threads && self.lanes.iter().all(|l| l.load.load(Ordering::Relaxed) == 0)
    }

    /// Runs `job` in the lane with the least work. Lanes end only with their
    /// runtime; should that be under way, the admitted job still runs, in a
    /// task of its own there, tracked by `tracker` so shutdown waits for it.
    pub(crate) fn run(&self, job: Job<F>, tracker: &tokio_util::task::TaskTracker) {
        if let Err(job) = self.submit(job) {
            drop(tracker.spawn_on(job, &self.runtime));
        }
    }

    /// Hands `job` to the lane with the least work. Returns the job when
    /// every lane has ended (only when its runtime is shutting down).
    fn submit(&self, job: Job<F>) -> Result<(), Job<F>> {
        let Some(lane) = self.lanes.iter().min_by_key(|l| l.load.load(Ordering::Relaxed)) else {
            return Err(job);
        };
        lane.load.fetch_add(1, Ordering::Relaxed);
        lane.queue.send(job).map_err(|e| {
            lane.load.fetch_sub(1, Ordering::Relaxed);
            e.0
        })
    }
}

/// Polls a job to its end, then gives back its box.
struct Returning<F>(Option<Job<F>>);

impl<F: Future<Output = ()>> Future for Returning<F> {
    type Output = Option<Job<F>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(job) = self.0.as_mut() else {
            return Poll::Ready(None);
        };
        match job.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(self.0.take()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A lane's task: runs what arrives on `jobs` until the queue is closed and
/// everything taken from it has finished, and puts the boxes of finished
/// jobs in `returned`.
async fn run<F: Future<Output = ()>>(
    mut jobs: mpsc::UnboundedReceiver<Job<F>>,
    load: Arc<AtomicUsize>,
    returned: Arc<Mutex<Vec<Job<F>>>>,
) {
    let mut running = FuturesUnordered::new();
    let mut open = true;
    std::future::poll_fn(|cx| loop {
        // Take everything queued first, so a message that arrived while the
        // lane was busy starts in this same turn.
        while open {
            match jobs.poll_recv(cx) {
                // A panic in one invocation (a host bug: guest traps are
                // errors, not panics) must not take the lane's other
                // invocations down with it, as it would not have with a
                // task per message.
                Poll::Ready(Some(job)) => running.push(AssertUnwindSafe(Returning(Some(job))).catch_unwind()),
                Poll::Ready(None) => open = false,
                Poll::Pending => break,
            }
        }
        // FuturesUnordered yields back to the runtime on its own after a
        // run of ready futures, so this loop cannot starve other tasks.
        match running.poll_next_unpin(cx) {
            Poll::Ready(Some(result)) => {
                match result {
                    Ok(Some(done)) => {
                        let mut returned = returned.lock().unwrap_or_else(PoisonError::into_inner);
                        if returned.len() < RETURNED_MAX {
                            returned.push(done);
                        }
                    }
                    Ok(None) => {}
                    Err(_) => tracing::error!("an invocation panicked; the others in its lane go on"),
                }
                // Counted out once its box is back, so whoever sees the lane
                // idle also finds the box.
                load.fetch_sub(1, Ordering::Release);
            }
            Poll::Ready(None) if !open => return Poll::Ready(()),
            // Empty: the queue's waker is registered by the poll above.
            Poll::Ready(None) | Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::manifest::TenantId;
    use crate::tenant::config::TenantLimits;

    /// A tenant for lanes to run on. Lanes never touch its connection, so
    /// the client is one that keeps trying a port nothing listens on.
    async fn tenant() -> Tenant {
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .expect("a client that connects in the background");
        Tenant::on_connection(TenantId::default(), nats, TenantLimits::default())
    }

    /// A job that records that it started, then waits for `release`. If
    /// the sender is dropped instead, the job panics, as one that hit a
    /// host bug would.
    fn waiting(
        started: &Arc<AtomicUsize>,
        finished: &Arc<AtomicUsize>,
        release: oneshot::Receiver<()>,
    ) -> Job<impl Future<Output = ()> + Send + 'static> {
        let (started, finished) = (started.clone(), finished.clone());
        Box::pin(async move {
            started.fetch_add(1, Ordering::SeqCst);
            if release.await.is_err() {
                panic!("a host bug");
            }
            finished.fetch_add(1, Ordering::SeqCst);
        })
    }

    async fn until(what: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !what() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition reached within 5 s");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_spread_over_lanes_and_wait_together_in_one() {
        let lanes = Lanes::start(&tenant().await, 64);
        assert_eq!(lanes.lanes.len(), 2, "one lane per worker thread");

        let (started, finished) = (Arc::default(), Arc::default());
        let mut releases = Vec::new();
        for _ in 0..5 {
            let (release, wait) = oneshot::channel();
            releases.push(release);
            assert!(lanes.submit(waiting(&started, &finished, wait)).is_ok());
        }
        // Five jobs all waiting at once on two lanes: a waiting job does
        // not hold its lane, and the least busy lane takes the next job.
        until(|| started.load(Ordering::SeqCst) == 5).await;
        let loads: Vec<usize> = lanes.lanes.iter().map(|l| l.load.load(Ordering::SeqCst)).collect();
        assert_eq!(loads.iter().sum::<usize>(), 5);
        assert!(loads.iter().all(|&l| l >= 2), "jobs spread over the lanes: {loads:?}");

        for release in releases {
            let _ = release.send(());
        }
        until(|| finished.load(Ordering::SeqCst) == 5).await;
        until(|| lanes.lanes.iter().all(|l| l.load.load(Ordering::SeqCst) == 0)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_lanes_finish_what_they_hold() {
        let lanes = Lanes::start(&tenant().await, 1);
        assert_eq!(lanes.lanes.len(), 1, "no more lanes than max_concurrency");
        let (started, finished) = (Arc::default(), Arc::default());
        let (release, wait) = oneshot::channel();
        assert!(lanes.submit(waiting(&started, &finished, wait)).is_ok());
        until(|| started.load(Ordering::SeqCst) == 1).await;
        drop(lanes);
        let _ = release.send(());
        until(|| finished.load(Ordering::SeqCst) == 1).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_leaves_its_lane_and_neighbours_running() {
        let lanes = Lanes::start(&tenant().await, 1);
        let (started, finished) = (Arc::default(), Arc::default());
        let (release, wait) = oneshot::channel();
        assert!(lanes.submit(waiting(&started, &finished, wait)).is_ok());
        until(|| started.load(Ordering::SeqCst) == 1).await;
        let (bug, panics) = oneshot::channel();
        drop(bug);
        assert!(lanes.submit(waiting(&started, &finished, panics)).is_ok());
        // The waiting neighbour survives the panic, and the lane takes more.
        let (release2, wait2) = oneshot::channel();
        assert!(lanes.submit(waiting(&started, &finished, wait2)).is_ok());
        until(|| started.load(Ordering::SeqCst) == 3).await;
        let _ = release.send(());
        let _ = release2.send(());
        until(|| finished.load(Ordering::SeqCst) == 2).await;
        until(|| lanes.lanes[0].load.load(Ordering::SeqCst) == 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finished_jobs_box_comes_back_for_the_next_job() {
        let lanes = Lanes::start(&tenant().await, 1);
        let (started, finished) = (Arc::default(), Arc::default());
        let (release, wait) = oneshot::channel();
        let job = waiting(&started, &finished, wait);
        let allocation = std::ptr::from_ref(&*job).addr();
        assert!(lanes.submit(job).is_ok());
        until(|| started.load(Ordering::SeqCst) == 1).await;
        assert!(lanes.returned_box().is_none(), "a running job keeps its box");
        let _ = release.send(());
        until(|| lanes.lanes[0].load.load(Ordering::SeqCst) == 0).await;
        let returned = lanes.returned_box().expect("the finished job's box, handed back");
        assert_eq!(std::ptr::from_ref(&*returned).addr(), allocation, "the same allocation");
        assert!(lanes.returned_box().is_none(), "each box is handed back once");
    }
}
