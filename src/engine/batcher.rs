//! Dynamic batching across jobs: one [`Batcher`] per model session, shared by every job in the
//! process whatever loop iteration it is in.
//!
//! Shape (after text-embeddings-inference's queue and Triton's dynamic batcher): callers push
//! requests into a bounded queue (its capacity is the backpressure that reaches intake); a batching
//! task closes a batch when it is full or its oldest request has waited `max_delay`, skipping
//! requests whose caller has gone, and prepares exactly one batch ahead of the model; the model runs
//! on its own OS thread (a session call blocks) and each caller gets its own result through a
//! oneshot channel. Every batch records why it closed.
//!
//! Failures are confined to the requests that cause them: a failed batch is split in halves,
//! recursively, so a poison request fails alone and its batch-mates get their results; a
//! request that fails alone for a transient reason (out of memory, device busy, see
//! [`super::failure`]) is retried after a growing pause, and fails as
//! [`BatchError::Unavailable`] if it still cannot run. A model whose calls keep failing
//! transiently is marked unhealthy ([`ModelHealth`], the worker's readiness); while it is, a
//! batch that fails transiently is neither split nor retried (each call is a probe) until a call
//! succeeds again.
//! The pause before a retry holds the model thread: when the device is out of memory or busy,
//! the next batch would most likely fail too, and the queue holds its callers back meanwhile.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

pub use super::failure::ModelFailure;

/// A model that runs a batch of same-shaped inputs in one call (on the batcher's thread).
pub trait BatchModel: Send + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;
    /// Runs one batch; must return exactly one output per input, in order. The inputs are
    /// borrowed: after a failure the batcher runs parts of the same batch again.
    fn run(&mut self, inputs: &[Self::Input]) -> Result<Vec<Self::Output>, ModelFailure>;
}

/// How a batcher forms batches and deals with failed calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    pub max_batch_size: usize,
    pub max_delay: Duration,
    /// Requests that may wait in the queue before `submit` holds callers back.
    pub max_queue: usize,
    /// Retries of a request that failed alone for a transient reason.
    pub retries: u32,
    /// Pause before the first such retry; it doubles for each further one.
    pub retry_backoff: Duration,
    /// Transient failures in a row (calls, without a success between) after which the model
    /// is unhealthy.
    pub unhealthy_after: u32,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_batch_size: 8,
            max_delay: Duration::from_millis(5),
            max_queue: 256,
            retries: 2,
            retry_backoff: Duration::from_millis(100),
            unhealthy_after: 3,
        }
    }
}

/// Why a batch was closed (reported in metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// `max_batch_size` requests were waiting.
    Full,
    /// The oldest request waited `max_delay`.
    Timeout,
    /// The queue was closed (shutdown) and what was left went out.
    Drained,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Full => "full",
            CloseReason::Timeout => "timeout",
            CloseReason::Drained => "drained",
        }
    }
}

/// What the batcher reports about each batch it runs.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub size: usize,
    pub reason: CloseReason,
    /// Time each request spent queued before its batch started running.
    pub queue_waits: Vec<Duration>,
    pub inference: Duration,
    /// Requests skipped because their caller had gone.
    pub skipped: usize,
}

/// What a decoder that batches sequences step by step (continuous batching) reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DecoderEvent {
    /// A sequence was prefilled alone and produced its first token.
    Prefill {
        prompt_tokens: usize,
        /// The prefill's own duration.
        duration: Duration,
        /// From the sequence's submission to its first token (queue + prefill).
        time_to_first_token: Duration,
    },
    /// One decode step: one token for each of `batch` sequences.
    Step { batch: usize, duration: Duration },
    /// The running batch after sequences joined or left.
    Load {
        active: usize,
        /// Bytes of the batched KV cache, padding included.
        kv_bytes: u64,
    },
    /// A sequence left: finished (`generated` tokens), failed, or abandoned by its caller.
    Finished { generated: usize },
}

/// What the batcher did about a failed call (reported in metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// A failed batch is run again as two halves.
    Split,
    /// A request that failed alone, transiently, is run again after a pause.
    Retry,
    /// A request got an error: `transient` (the model could not run it now) or not (it fails
    /// alone, whatever the batch).
    Failed { transient: bool },
    /// The model became unhealthy (`false`) or healthy again (`true`).
    Health { healthy: bool },
}

/// Receives every [`BatchRecord`], queue-depth change and recovery step (metrics, tests), and
/// the events of continuously batched decoders.
pub trait BatchObserver: Send + Sync + 'static {
    fn batch(&self, model: &str, record: &BatchRecord);
    fn queue_depth(&self, model: &str, depth: usize);
    fn recovery(&self, _model: &str, _event: Recovery) {}
    fn decoder(&self, _model: &str, _event: &DecoderEvent) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl BatchObserver for NoObserver {
    fn batch(&self, _: &str, _: &BatchRecord) {}
    fn queue_depth(&self, _: &str, _: usize) {}
}

/// Why a request got no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The request fails alone: retrying it cannot help.
    #[error("model {model} failed: {message}")]
    Model { model: String, message: String },
    /// The model could not run the request for a transient reason, retries included.
    #[error("model {model} is unavailable: {message}")]
    Unavailable { model: String, message: String },
    #[error("model {model} is shut down")]
    Closed { model: String },
}

/// Whether a model's calls are succeeding; shared by its batcher and whoever reports
/// readiness. Starts healthy.
#[derive(Debug)]
pub struct ModelHealth {
    name: Arc<str>,
    failures_in_a_row: std::sync::atomic::AtomicU32,
    unhealthy: std::sync::atomic::AtomicBool,
    unhealthy_after: u32,
}

impl ModelHealth {
    fn new(name: Arc<str>, unhealthy_after: u32) -> ModelHealth {
        ModelHealth {
            name,
            failures_in_a_row: Default::default(),
            unhealthy: Default::default(),
            unhealthy_after: unhealthy_after.max(1),
        }
    }

    /// The model's name (its role).
    pub fn model(&self) -> &str {
        &self.name
    }

    pub fn is_healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }

    /// A call succeeded; returns whether that made the model healthy again.
    fn succeeded(&self) -> bool {
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        self.unhealthy.swap(false, Ordering::Relaxed)
    }

    /// A call failed transiently; returns whether that made the model unhealthy.
    fn failed(&self) -> bool {
        let n = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        n >= self.unhealthy_after && !self.unhealthy.swap(true, Ordering::Relaxed)
    }
}

struct Request<I, O> {
    input: I,
    reply: oneshot::Sender<Result<O, BatchError>>,
    enqueued: Instant,
    /// The job that made the request, for model fault injection (see [`crate::faults`]).
    job: Option<Arc<str>>,
}

type Batch<I, O> = (Vec<Request<I, O>>, CloseReason, usize);

/// Handle to a model's batcher. Cheap to clone.
pub struct Batcher<M: BatchModel> {
    name: Arc<str>,
    tx: mpsc::Sender<Request<M::Input, M::Output>>,
    depth: Arc<AtomicUsize>,
    observer: Arc<dyn BatchObserver>,
    health: Arc<ModelHealth>,
}

impl<M: BatchModel> Clone for Batcher<M> {
    fn clone(&self) -> Self {
        Batcher {
            name: self.name.clone(),
            tx: self.tx.clone(),
            depth: self.depth.clone(),
            observer: self.observer.clone(),
            health: self.health.clone(),
        }
    }
}

impl<M: BatchModel> Batcher<M> {
    /// Starts the batching task (on the current tokio runtime) and the model thread.
    pub fn spawn(
        name: &str,
        model: M,
        settings: BatchSettings,
        observer: Arc<dyn BatchObserver>,
    ) -> Batcher<M> {
        let settings = BatchSettings {
            max_batch_size: settings.max_batch_size.max(1),
            max_queue: settings.max_queue.max(1),
            ..settings
        };
        let name: Arc<str> = Arc::from(name);
        let (tx, rx) = mpsc::channel(settings.max_queue);
        // Capacity 1: exactly one batch is prepared while the model runs the previous one.
        let (batch_tx, batch_rx) = mpsc::channel::<Batch<M::Input, M::Output>>(1);
        let depth = Arc::new(AtomicUsize::new(0));
        tokio::spawn(assemble(
            name.clone(),
            rx,
            batch_tx,
            settings,
            depth.clone(),
            observer.clone(),
        ));
        let health = Arc::new(ModelHealth::new(name.clone(), settings.unhealthy_after));
        let runner = Runner {
            name: name.clone(),
            model,
            settings,
            observer: observer.clone(),
            health: health.clone(),
        };
        spawn_model_thread(&name, move || execute(runner, batch_rx));
        Batcher {
            name,
            tx,
            depth,
            observer,
            health,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the model's calls are succeeding (for readiness).
    pub fn health(&self) -> Arc<ModelHealth> {
        self.health.clone()
    }

    /// Requests waiting to be batched.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Submits one input and waits for its output. Waits for room when the queue is full
    /// (backpressure); dropping the future abandons the request, which is then skipped.
    pub async fn submit(&self, input: M::Input) -> Result<M::Output, BatchError> {
        let (reply, rx) = oneshot::channel();
        let request = Request {
            input,
            reply,
            enqueued: Instant::now(),
            job: crate::faults::current_job(),
        };
        let closed = || BatchError::Closed {
            model: self.name.to_string(),
        };
        // Counted before sending, so the batching task never subtracts a request not yet added.
        let depth = self.depth.fetch_add(1, Ordering::Relaxed) + 1;
        self.observer.queue_depth(&self.name, depth);
        if self.tx.send(request).await.is_err() {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            return Err(closed());
        }
        rx.await.map_err(|_| closed())?
    }
}

/// Starts the OS thread `model-{name}` that owns a model's sessions; [`join_model_threads`]
/// waits for it before the process exits.
pub fn spawn_model_thread(name: &str, run: impl FnOnce() + Send + 'static) {
    let thread = std::thread::Builder::new()
        .name(format!("model-{name}"))
        .spawn(run)
        .expect("spawning a model thread");
    MODEL_THREADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(thread);
}

/// Model threads started in this process, for [`join_model_threads`].
static MODEL_THREADS: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Waits up to `timeout` for every model thread to end; returns whether they all did.
///
/// A model thread ends once its batching task has (every handle to its batcher dropped, or the
/// runtime that ran the task shut down), after the batch it is running, and drops its session
/// as it ends. Called before the process exits, so sessions are released while ONNX Runtime is
/// still whole rather than while it tears itself down (a CUDA session freed during exit can
/// crash the process after its work is done).
pub fn join_model_threads(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut threads = std::mem::take(&mut *MODEL_THREADS.lock().unwrap_or_else(|e| e.into_inner()));
    loop {
        let (finished, running): (Vec<_>, Vec<_>) =
            threads.into_iter().partition(|t| t.is_finished());
        for thread in finished {
            let _ = thread.join();
        }
        threads = running;
        if threads.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            // Left running; put back for a later call.
            MODEL_THREADS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(threads);
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The batching task: forms batches and hands them to the model thread.
async fn assemble<I: Send, O: Send>(
    name: Arc<str>,
    mut rx: mpsc::Receiver<Request<I, O>>,
    batch_tx: mpsc::Sender<Batch<I, O>>,
    settings: BatchSettings,
    depth: Arc<AtomicUsize>,
    observer: Arc<dyn BatchObserver>,
) {
    loop {
        // Wait for room at the model first, so the batch we build is the one that runs next
        // and requests keep accumulating (growing the batch) while the model is busy.
        let Ok(permit) = batch_tx.reserve().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let deadline = tokio::time::Instant::from_std(first.enqueued) + settings.max_delay;
        let mut batch = Vec::with_capacity(settings.max_batch_size);
        let mut skipped = 0;
        let mut taken = 1;
        push_live(&mut batch, first, &mut skipped);
        let reason = loop {
            if batch.len() >= settings.max_batch_size {
                break CloseReason::Full;
            }
            // Take what is already queued without waiting.
            match rx.try_recv() {
                Ok(request) => {
                    taken += 1;
                    push_live(&mut batch, request, &mut skipped);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break CloseReason::Drained,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            tokio::select! {
                biased;
                request = rx.recv() => match request {
                    Some(request) => {
                        taken += 1;
                        push_live(&mut batch, request, &mut skipped);
                    }
                    None => break CloseReason::Drained,
                },
                _ = tokio::time::sleep_until(deadline) => break CloseReason::Timeout,
            }
        };
        let left = depth
            .fetch_sub(taken, Ordering::Relaxed)
            .saturating_sub(taken);
        observer.queue_depth(&name, left);
        if batch.is_empty() {
            // Every request had been abandoned: nothing to run.
            if skipped > 0 {
                observer.batch(
                    &name,
                    &BatchRecord {
                        size: 0,
                        reason,
                        queue_waits: Vec::new(),
                        inference: Duration::ZERO,
                        skipped,
                    },
                );
            }
            continue;
        }
        permit.send((batch, reason, skipped));
    }
}

fn push_live<I, O>(batch: &mut Vec<Request<I, O>>, request: Request<I, O>, skipped: &mut usize) {
    if request.reply.is_closed() {
        *skipped += 1;
    } else {
        batch.push(request);
    }
}

/// The model thread's side of a batcher: the model and what it needs to recover from failures.
struct Runner<M: BatchModel> {
    name: Arc<str>,
    model: M,
    settings: BatchSettings,
    observer: Arc<dyn BatchObserver>,
    health: Arc<ModelHealth>,
}

type Reply<O> = oneshot::Sender<Result<O, BatchError>>;

/// The model thread: runs each batch and fans the results out to the callers.
fn execute<M: BatchModel>(
    mut runner: Runner<M>,
    mut batches: mpsc::Receiver<Batch<M::Input, M::Output>>,
) {
    while let Some((mut requests, reason, mut skipped)) = batches.blocking_recv() {
        // Callers may have gone while the batch waited for the model: skip them too.
        let before = requests.len();
        requests.retain(|r| !r.reply.is_closed());
        skipped += before - requests.len();
        if requests.is_empty() {
            runner.observer.batch(
                &runner.name,
                &BatchRecord {
                    size: 0,
                    reason,
                    queue_waits: Vec::new(),
                    inference: Duration::ZERO,
                    skipped,
                },
            );
            continue;
        }
        let started = Instant::now();
        let queue_waits = requests
            .iter()
            .map(|r| started.saturating_duration_since(r.enqueued))
            .collect();
        let size = requests.len();
        let mut inputs = Vec::with_capacity(size);
        let mut jobs = Vec::with_capacity(size);
        let mut replies = Vec::with_capacity(size);
        for r in requests {
            inputs.push(r.input);
            jobs.push(r.job);
            replies.push(r.reply);
        }
        let result = runner.call(&inputs, &jobs);
        let inference = started.elapsed();
        // Recorded before the callers hear back, so a caller that has its result also finds
        // its batch in the metrics (tests and `bench` read them right after).
        runner.observer.batch(
            &runner.name,
            &BatchRecord {
                size,
                reason,
                queue_waits,
                inference,
                skipped,
            },
        );
        runner.settle(&inputs, &jobs, replies, result);
    }
}

impl<M: BatchModel> Runner<M> {
    /// One session call (unless a fault is injected), with panics and a wrong number of
    /// outputs turned into failures, and the model's health updated.
    fn call(
        &mut self,
        inputs: &[M::Input],
        jobs: &[Option<Arc<str>>],
    ) -> Result<Vec<M::Output>, ModelFailure> {
        let result = match crate::faults::model_call(&self.name, jobs) {
            Some(fault) => Err(super::failure::injected(fault, &self.name)),
            None => {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.model.run(inputs)))
                    .unwrap_or_else(|_| Err(ModelFailure::permanent("the model panicked")))
            }
        };
        let result = result.and_then(|outputs| {
            if outputs.len() == inputs.len() {
                Ok(outputs)
            } else {
                Err(ModelFailure::permanent(format!(
                    "returned {} outputs for {} inputs",
                    outputs.len(),
                    inputs.len()
                )))
            }
        });
        match &result {
            Ok(_) => {
                if self.health.succeeded() {
                    tracing::info!(model = %self.name, "model calls succeed again: healthy");
                    self.report(Recovery::Health { healthy: true });
                }
            }
            Err(failure) if failure.transient => {
                if self.health.failed() {
                    tracing::error!(model = %self.name, error = %failure.message,
                        "model calls keep failing: unhealthy until one succeeds");
                    self.report(Recovery::Health { healthy: false });
                }
            }
            Err(_) => {}
        }
        result
    }

    /// Answers the callers of `inputs` given the `result` of running them together: a failed
    /// group of several is run again as two halves; a request that failed alone is retried
    /// while its failure is transient and retries are left.
    fn settle(
        &mut self,
        inputs: &[M::Input],
        jobs: &[Option<Arc<str>>],
        mut replies: Vec<Reply<M::Output>>,
        result: Result<Vec<M::Output>, ModelFailure>,
    ) {
        let mut failure = match result {
            Ok(outputs) => {
                for (reply, output) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(output));
                }
                return;
            }
            Err(failure) => failure,
        };
        // While the model is unhealthy a transient failure is not split or retried (every call
        // is a probe); a permanent one still is, or a poison request would fail its batch-mates.
        let healthy = self.health.is_healthy();
        if inputs.len() > 1 && (healthy || !failure.transient) {
            self.report(Recovery::Split);
            let mid = inputs.len() / 2;
            let second = replies.split_off(mid);
            for (range, replies) in [(0..mid, replies), (mid..inputs.len(), second)] {
                let (inputs, jobs) = (&inputs[range.clone()], &jobs[range]);
                let result = self.call(inputs, jobs);
                self.settle(inputs, jobs, replies, result);
            }
            return;
        }
        if inputs.len() == 1 && healthy {
            let mut pause = self.settings.retry_backoff;
            for _ in 0..self.settings.retries {
                if !failure.transient || !self.health.is_healthy() {
                    break;
                }
                std::thread::sleep(pause);
                pause = pause.saturating_mul(2);
                self.report(Recovery::Retry);
                match self.call(inputs, jobs) {
                    Ok(outputs) => {
                        for (reply, output) in replies.into_iter().zip(outputs) {
                            let _ = reply.send(Ok(output));
                        }
                        return;
                    }
                    Err(again) => failure = again,
                }
            }
        }
        tracing::warn!(model = %self.name, requests = inputs.len(), transient = failure.transient,
            error = %failure.message, "model requests failed");
        for reply in replies {
            self.report(Recovery::Failed {
                transient: failure.transient,
            });
            let model = self.name.to_string();
            let message = failure.message.clone();
            let error = if failure.transient {
                BatchError::Unavailable { model, message }
            } else {
                BatchError::Model { model, message }
            };
            let _ = reply.send(Err(error));
        }
    }

    fn report(&self, event: Recovery) {
        self.observer.recovery(&self.name, event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Doubles its inputs. With a gate, it reports each batch it starts and waits to be
    /// released, so a test knows exactly what is running and what is queued.
    struct Doubler {
        gate: Option<(
            std::sync::mpsc::Sender<Vec<i64>>,
            std::sync::mpsc::Receiver<()>,
        )>,
    }
    impl BatchModel for Doubler {
        type Input = i64;
        type Output = i64;
        fn run(&mut self, inputs: &[i64]) -> Result<Vec<i64>, ModelFailure> {
            if let Some((started, open)) = &self.gate {
                let _ = started.send(inputs.to_vec());
                let _ = open.recv();
            }
            Ok(inputs.iter().map(|x| x * 2).collect())
        }
    }

    #[derive(Default)]
    struct Recorder {
        batches: Mutex<Vec<(usize, CloseReason, usize)>>,
        recoveries: Mutex<Vec<Recovery>>,
    }
    impl BatchObserver for Recorder {
        fn batch(&self, _: &str, r: &BatchRecord) {
            self.batches
                .lock()
                .unwrap()
                .push((r.size, r.reason, r.skipped));
        }
        fn queue_depth(&self, _: &str, _: usize) {}
        fn recovery(&self, _: &str, event: Recovery) {
            self.recoveries.lock().unwrap().push(event);
        }
    }

    fn settings(max_batch_size: usize, delay_ms: u64, max_queue: usize) -> BatchSettings {
        BatchSettings {
            max_batch_size,
            max_delay: Duration::from_millis(delay_ms),
            max_queue,
            // No pauses: the tests count calls, they do not wait.
            retry_backoff: Duration::ZERO,
            ..BatchSettings::default()
        }
    }

    struct Gated {
        batcher: Batcher<Doubler>,
        started: std::sync::mpsc::Receiver<Vec<i64>>,
        open: std::sync::mpsc::Sender<()>,
        recorder: Arc<Recorder>,
    }

    fn gated(s: BatchSettings) -> Gated {
        let (open, gate) = std::sync::mpsc::channel();
        let (started_tx, started) = std::sync::mpsc::channel();
        let recorder = Arc::new(Recorder::default());
        let batcher = Batcher::spawn(
            "t",
            Doubler {
                gate: Some((started_tx, gate)),
            },
            s,
            recorder.clone(),
        );
        Gated {
            batcher,
            started,
            open,
            recorder,
        }
    }

    impl Gated {
        fn submit(&self, x: i64) -> tokio::task::JoinHandle<Result<i64, BatchError>> {
            let b = self.batcher.clone();
            tokio::spawn(async move { b.submit(x).await })
        }
        /// Blocks until the model starts its next batch; returns the batch's inputs, sorted.
        async fn next_started(&self) -> Vec<i64> {
            // Bounded, so a broken batcher fails the test instead of hanging CI.
            let mut v = tokio::task::block_in_place(|| {
                self.started
                    .recv_timeout(Duration::from_secs(30))
                    .expect("the model started no batch within 30 s")
            });
            v.sort();
            v
        }
        fn release(&self) {
            self.open.send(()).unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closes_on_full_and_returns_each_caller_its_own_result() {
        // A delay of an hour: only "full" can close these batches.
        let g = gated(settings(4, 3_600_000, 64));
        let handles: Vec<_> = (0..8).map(|i| g.submit(i)).collect();
        let first = g.next_started().await;
        assert_eq!(first.len(), 4);
        g.release();
        let second = g.next_started().await;
        assert_eq!(second.len(), 4);
        g.release();
        let mut all = [first, second].concat();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.await.unwrap(), Ok(i as i64 * 2));
        }
        let batches = g.recorder.batches.lock().unwrap().clone();
        assert_eq!(batches, vec![(4, CloseReason::Full, 0); 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn closes_on_timeout_with_a_partial_batch() {
        let rec = Arc::new(Recorder::default());
        let b = Batcher::spawn(
            "t",
            Doubler { gate: None },
            settings(8, 50, 64),
            rec.clone(),
        );
        let started = tokio::time::Instant::now();
        let (a, c) = tokio::join!(b.submit(1), b.submit(2));
        assert_eq!((a, c), (Ok(2), Ok(4)));
        // Paused clock: the batch closed once the oldest request had waited max_delay.
        assert!(started.elapsed() >= Duration::from_millis(50));
        // The record is written before the replies: a caller with its result finds it.
        assert_eq!(
            rec.batches.lock().unwrap().clone(),
            vec![(2, CloseReason::Timeout, 0)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn skips_requests_whose_caller_has_gone() {
        let g = gated(settings(4, 3_600_000, 64));
        let blockers: Vec<_> = (100..104).map(|i| g.submit(i)).collect();
        assert_eq!(g.next_started().await, vec![100, 101, 102, 103]);
        // The model is held: the next four requests form the next batch; two callers leave.
        let abandoned: Vec<_> = (10..12).map(|i| g.submit(i)).collect();
        // Both must be queued before their callers leave (an aborted task that never ran
        // would not have submitted at all).
        while g.batcher.queue_depth() < 2 {
            tokio::task::yield_now().await;
        }
        let kept: Vec<_> = (0..2).map(|i| g.submit(i)).collect();
        for h in &abandoned {
            h.abort();
        }
        for h in abandoned {
            assert!(h.await.unwrap_err().is_cancelled());
        }
        g.release();
        assert_eq!(g.next_started().await, vec![0, 1]);
        g.release();
        for (i, h) in blockers.into_iter().enumerate() {
            assert_eq!(h.await.unwrap(), Ok((100 + i as i64) * 2));
        }
        for (i, h) in kept.into_iter().enumerate() {
            assert_eq!(h.await.unwrap(), Ok(i as i64 * 2));
        }
        let batches = g.recorder.batches.lock().unwrap().clone();
        assert_eq!(batches[1], (2, CloseReason::Full, 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_holds_callers_back() {
        // Batches of 1, a queue of 2. With the model held on request 0, request 1 is the batch
        // prepared ahead, 2 and 3 fill the queue, and request 4 cannot get in.
        let g = gated(settings(1, 3_600_000, 2));
        let mut accepted = vec![g.submit(0)];
        assert_eq!(g.next_started().await, vec![0]);
        for i in 1..4 {
            accepted.push(g.submit(i));
        }
        while g.batcher.tx.capacity() != 0 || g.batcher.queue_depth() != 2 {
            tokio::task::yield_now().await;
        }
        let blocked = g.submit(4);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            !blocked.is_finished(),
            "the fifth caller must wait for room"
        );
        assert_eq!(g.batcher.tx.capacity(), 0, "the queue is still full");
        // Callers 1 to 3 were separate tasks, so they may have queued in any order; the fifth
        // got in only once room was made, behind all of them.
        let mut started = Vec::new();
        for _ in 1..5 {
            g.release();
            started.extend(g.next_started().await);
        }
        assert_eq!(started[3], 4, "{started:?}");
        started[..3].sort();
        assert_eq!(started, vec![1, 2, 3, 4]);
        g.release();
        assert_eq!(blocked.await.unwrap(), Ok(8));
        for (i, h) in accepted.into_iter().enumerate() {
            assert_eq!(h.await.unwrap(), Ok(i as i64 * 2));
        }
    }

    /// Doubles its inputs, fails any call holding -1 (a poison input), and fails its first
    /// `transient_failures` calls with ONNX Runtime's out-of-memory message. Logs every call.
    struct Flaky {
        transient_failures: usize,
        calls: Arc<Mutex<Vec<Vec<i64>>>>,
    }
    impl BatchModel for Flaky {
        type Input = i64;
        type Output = i64;
        fn run(&mut self, inputs: &[i64]) -> Result<Vec<i64>, ModelFailure> {
            self.calls.lock().unwrap().push(inputs.to_vec());
            if self.transient_failures > 0 {
                self.transient_failures -= 1;
                return Err(ModelFailure::transient(
                    "Failed to allocate memory for requested buffer of size 1024",
                ));
            }
            if inputs.contains(&-1) {
                return Err("negative input".into());
            }
            Ok(inputs.iter().map(|x| x * 2).collect())
        }
    }

    struct FlakyBatcher {
        batcher: Batcher<Flaky>,
        calls: Arc<Mutex<Vec<Vec<i64>>>>,
        recorder: Arc<Recorder>,
    }

    impl FlakyBatcher {
        /// Batches close only when full (a delay of an hour), so a test that submits
        /// `max_batch_size` requests together knows they form one batch.
        fn new(max_batch_size: usize, transient_failures: usize) -> FlakyBatcher {
            let calls = Arc::new(Mutex::new(Vec::new()));
            let recorder = Arc::new(Recorder::default());
            let batcher = Batcher::spawn(
                "flaky",
                Flaky {
                    transient_failures,
                    calls: calls.clone(),
                },
                settings(max_batch_size, 3_600_000, 64),
                recorder.clone(),
            );
            FlakyBatcher {
                batcher,
                calls,
                recorder,
            }
        }
        fn calls(&self) -> Vec<Vec<i64>> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
        fn recoveries(&self) -> Vec<Recovery> {
            std::mem::take(&mut *self.recorder.recoveries.lock().unwrap())
        }
    }

    fn sorted(mut calls: Vec<Vec<i64>>) -> Vec<Vec<i64>> {
        for call in &mut calls {
            call.sort();
        }
        calls.sort();
        calls
    }

    #[tokio::test]
    async fn a_poison_request_fails_alone_and_its_batch_mates_get_their_results() {
        let f = FlakyBatcher::new(4, 0);
        let b = &f.batcher;
        let (a, poison, c, d) = tokio::join!(b.submit(1), b.submit(-1), b.submit(3), b.submit(4));
        assert_eq!((a, c, d), (Ok(2), Ok(6), Ok(8)));
        assert_eq!(
            poison,
            Err(BatchError::Model {
                model: "flaky".into(),
                message: "negative input".into(),
            })
        );
        // The batch of four, its halves, and the failed half's halves: the poison request
        // ran alone once, and nothing was retried (its failure is permanent).
        let calls = f.calls();
        assert_eq!(calls.len(), 5, "{calls:?}");
        assert_eq!(calls[0].len(), 4);
        assert!(calls.contains(&vec![-1]), "{calls:?}");
        assert_eq!(
            f.recoveries(),
            vec![
                Recovery::Split,
                Recovery::Split,
                Recovery::Failed { transient: false }
            ]
        );
        // One batch as the metrics see it; a poison input says nothing about the model.
        assert_eq!(
            f.recorder.batches.lock().unwrap().clone(),
            vec![(4, CloseReason::Full, 0)]
        );
        assert!(b.health().is_healthy());
    }

    #[tokio::test]
    async fn a_transient_failure_of_a_batch_is_split_and_succeeds() {
        let f = FlakyBatcher::new(2, 1);
        let b = &f.batcher;
        let (x, y) = tokio::join!(b.submit(5), b.submit(6));
        assert_eq!((x, y), (Ok(10), Ok(12)));
        assert_eq!(sorted(f.calls()), vec![vec![5], vec![5, 6], vec![6]]);
        assert_eq!(f.recoveries(), vec![Recovery::Split]);
    }

    #[tokio::test]
    async fn a_transient_failure_of_a_request_alone_is_retried_and_succeeds() {
        let f = FlakyBatcher::new(1, 2);
        assert_eq!(f.batcher.submit(7).await, Ok(14));
        assert_eq!(f.calls(), vec![vec![7]; 3]);
        assert_eq!(f.recoveries(), vec![Recovery::Retry, Recovery::Retry]);
        assert!(
            f.batcher.health().is_healthy(),
            "two failures in a row are not three"
        );
    }

    #[tokio::test]
    async fn a_persistent_failure_makes_the_model_unhealthy_until_a_call_succeeds() {
        // Five calls fail with out of memory, then the model works again.
        let f = FlakyBatcher::new(2, 5);
        let b = &f.batcher;
        let health = b.health();
        let unavailable = || {
            Err(BatchError::Unavailable {
                model: "flaky".into(),
                message: "Failed to allocate memory for requested buffer of size 1024".into(),
            })
        };
        // The batch fails and is split; the first half fails alone and is retried; that is the
        // third failure in a row: the model is unhealthy, and the second half, failing too, is
        // not retried.
        let (x, y) = tokio::join!(b.submit(1), b.submit(2));
        assert_eq!((x, y), (unavailable(), unavailable()));
        assert!(!health.is_healthy());
        assert_eq!(
            f.calls(),
            vec![vec![1, 2], vec![1], vec![1], vec![2]],
            "calls in order"
        );
        // While it is unhealthy a failed batch is not split: each call is a probe.
        let (x, y) = tokio::join!(b.submit(3), b.submit(4));
        assert_eq!((x, y), (unavailable(), unavailable()));
        assert_eq!(f.calls(), vec![vec![3, 4]]);
        assert!(!health.is_healthy());
        // A poison request in a batch fails alone even now: its failure is not the model's.
        // (The calls that run succeed, so the model is healthy again.)
        let (x, y) = tokio::join!(b.submit(-1), b.submit(6));
        assert!(matches!(x, Err(BatchError::Model { .. })), "{x:?}");
        assert_eq!(y, Ok(12));
        assert!(health.is_healthy());
        assert_eq!(f.calls(), vec![vec![-1, 6], vec![-1], vec![6]]);
        // And stays healthy.
        let (x, y) = tokio::join!(b.submit(5), b.submit(6));
        assert_eq!((x, y), (Ok(10), Ok(12)));
        assert!(health.is_healthy());
        let failed = Recovery::Failed { transient: true };
        assert_eq!(
            f.recoveries(),
            vec![
                Recovery::Split,
                Recovery::Retry,
                Recovery::Health { healthy: false },
                failed,
                failed,
                failed,
                failed,
                Recovery::Split,
                Recovery::Failed { transient: false },
                Recovery::Health { healthy: true },
            ]
        );
    }
}
