//! Dynamic batching across jobs: one [`Batcher`] per model session, shared by every job in the
//! process whatever loop iteration it is in.
//!
//! Shape (after text-embeddings-inference's queue and Triton's dynamic batcher): callers push
//! requests into a bounded queue (its capacity is the backpressure that reaches intake); a batching
//! task closes a batch when it is full or its oldest request has waited `max_delay`, skipping
//! requests whose caller has gone, and prepares exactly one batch ahead of the model; the model runs
//! on its own OS thread (a session call blocks) and each caller gets its own result through a
//! oneshot channel. Every batch records why it closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

/// A model that runs a batch of same-shaped inputs in one call (on the batcher's thread).
pub trait BatchModel: Send + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;
    /// Runs one batch; must return exactly one output per input, in order.
    fn run(&mut self, inputs: Vec<Self::Input>) -> Result<Vec<Self::Output>, String>;
}

/// How a batcher forms batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    pub max_batch_size: usize,
    pub max_delay: Duration,
    /// Requests that may wait in the queue before `submit` holds callers back.
    pub max_queue: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_batch_size: 8,
            max_delay: Duration::from_millis(5),
            max_queue: 256,
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

/// Receives every [`BatchRecord`] and queue-depth change (metrics, tests), and the events of
/// continuously batched decoders.
pub trait BatchObserver: Send + Sync + 'static {
    fn batch(&self, model: &str, record: &BatchRecord);
    fn queue_depth(&self, model: &str, depth: usize);
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
    #[error("model {model} failed: {message}")]
    Model { model: String, message: String },
    #[error("model {model} is shut down")]
    Closed { model: String },
}

struct Request<I, O> {
    input: I,
    reply: oneshot::Sender<Result<O, BatchError>>,
    enqueued: Instant,
}

type Batch<I, O> = (Vec<Request<I, O>>, CloseReason, usize);

/// Handle to a model's batcher. Cheap to clone.
pub struct Batcher<M: BatchModel> {
    name: Arc<str>,
    tx: mpsc::Sender<Request<M::Input, M::Output>>,
    depth: Arc<AtomicUsize>,
    observer: Arc<dyn BatchObserver>,
}

impl<M: BatchModel> Clone for Batcher<M> {
    fn clone(&self) -> Self {
        Batcher {
            name: self.name.clone(),
            tx: self.tx.clone(),
            depth: self.depth.clone(),
            observer: self.observer.clone(),
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
        let thread_model = name.clone();
        let thread_observer = observer.clone();
        spawn_model_thread(&name, move || {
            execute(thread_model, model, batch_rx, thread_observer)
        });
        Batcher {
            name,
            tx,
            depth,
            observer,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
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

/// The model thread: runs each batch and fans the results out to the callers.
fn execute<M: BatchModel>(
    name: Arc<str>,
    mut model: M,
    mut batches: mpsc::Receiver<Batch<M::Input, M::Output>>,
    observer: Arc<dyn BatchObserver>,
) {
    while let Some((mut requests, reason, mut skipped)) = batches.blocking_recv() {
        // Callers may have gone while the batch waited for the model: skip them too.
        let before = requests.len();
        requests.retain(|r| !r.reply.is_closed());
        skipped += before - requests.len();
        if requests.is_empty() {
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
            continue;
        }
        let started = Instant::now();
        let queue_waits = requests
            .iter()
            .map(|r| started.saturating_duration_since(r.enqueued))
            .collect();
        let (inputs, replies): (Vec<_>, Vec<_>) =
            requests.into_iter().map(|r| (r.input, r.reply)).unzip();
        let size = inputs.len();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.run(inputs)))
            .unwrap_or_else(|_| Err("the model panicked".to_string()));
        let inference = started.elapsed();
        // Recorded before the callers hear back, so a caller that has its result also finds
        // its batch in the metrics (tests and `bench` read them right after).
        observer.batch(
            &name,
            &BatchRecord {
                size,
                reason,
                queue_waits,
                inference,
                skipped,
            },
        );
        match result {
            Ok(outputs) if outputs.len() == size => {
                for (reply, output) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(output));
                }
            }
            Ok(outputs) => {
                let message = format!("returned {} outputs for {size} inputs", outputs.len());
                fail_all(&name, replies, &message);
            }
            Err(message) => fail_all(&name, replies, &message),
        }
    }
}

fn fail_all<O>(name: &str, replies: Vec<oneshot::Sender<Result<O, BatchError>>>, message: &str) {
    for reply in replies {
        let _ = reply.send(Err(BatchError::Model {
            model: name.to_string(),
            message: message.to_string(),
        }));
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
        fn run(&mut self, inputs: Vec<i64>) -> Result<Vec<i64>, String> {
            if let Some((started, open)) = &self.gate {
                let _ = started.send(inputs.clone());
                let _ = open.recv();
            }
            if inputs.contains(&-1) {
                return Err("negative input".into());
            }
            Ok(inputs.into_iter().map(|x| x * 2).collect())
        }
    }

    #[derive(Default)]
    struct Recorder {
        batches: Mutex<Vec<(usize, CloseReason, usize)>>,
    }
    impl BatchObserver for Recorder {
        fn batch(&self, _: &str, r: &BatchRecord) {
            self.batches
                .lock()
                .unwrap()
                .push((r.size, r.reason, r.skipped));
        }
        fn queue_depth(&self, _: &str, _: usize) {}
    }

    fn settings(max_batch_size: usize, delay_ms: u64, max_queue: usize) -> BatchSettings {
        BatchSettings {
            max_batch_size,
            max_delay: Duration::from_millis(delay_ms),
            max_queue,
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

    #[tokio::test]
    async fn model_errors_reach_every_caller_of_the_batch() {
        let b = Batcher::spawn(
            "t",
            Doubler { gate: None },
            settings(2, 3_600_000, 8),
            Arc::new(NoObserver),
        );
        let (x, y) = tokio::join!(b.submit(-1), b.submit(3));
        let expected = Err(BatchError::Model {
            model: "t".into(),
            message: "negative input".into(),
        });
        assert_eq!(x, expected);
        assert_eq!(y, expected);
    }
}
