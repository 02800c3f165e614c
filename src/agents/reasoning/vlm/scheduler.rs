//! Continuous batching of the VLM's decoder across jobs (the shape of text-generation-inference's
//! router and vLLM's scheduler): the decode loop owns the running batch; between two steps,
//! waiting sequences are admitted (each prefilled alone, then concatenated into the batch) and
//! finished ones leave (filtered out); every step runs one token for all active sequences of all
//! jobs in one decoder call. The cache is kept per sequence as rows of one left-padded batch
//! ([`KvBatch`]).
//!
//! Admission is first come, first served, capped by the active-sequence limit and the KV byte
//! budget ([`admission`], a pure function). [`Scheduler`] is the state machine, driven step by
//! step by tests; [`Decoder`] runs it on its own model thread for the agent.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::decoder::{DecoderModel, Prompt};
use crate::engine::batcher::{spawn_model_thread, BatchObserver, DecoderEvent};
use crate::engine::failure::{self, ModelFailure};
use crate::engine::kv::KvBatch;

/// Limits of the running batch (`batching.decoder.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerSettings {
    /// Sequences decoded together at most (`max_batch_size`).
    pub max_active: usize,
    /// Bytes the batched KV cache (padding included) may reach, counted for the worst case:
    /// every active sequence generating all its remaining tokens (`max_kv_bytes`).
    pub max_kv_bytes: u64,
    /// Sequences that may wait for admission before callers are held back (`max_queue`).
    pub max_queue: usize,
    /// Retries of a call that failed for a transient reason (out of memory, device busy),
    /// after `retry_backoff`, doubling (`retries`, `retry_backoff_ms`).
    pub retries: u32,
    pub retry_backoff: Duration,
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    /// Who asked (job and iteration), for logs and tests.
    pub label: String,
    pub prompt: Prompt,
    /// Tokens to generate at most, the stop token included.
    pub max_new_tokens: usize,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The last token is a stop token.
    StopToken,
    /// `max_new_tokens` were generated.
    MaxNewTokens,
}

/// Where a sequence's time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DecodeTimings {
    /// Waiting for admission.
    pub queue: f64,
    /// Its own prefill.
    pub prefill: f64,
    /// From submission to the first token.
    pub time_to_first_token: f64,
    /// The decode steps it was part of (the whole batch's time).
    pub decode: f64,
}

/// A finished sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids, the stop token included.
    pub ids: Vec<u32>,
    pub stop_reason: StopReason,
    pub timings: DecodeTimings,
    /// Decode steps it was part of (tokens after the first).
    pub decode_steps: usize,
    /// Mean number of sequences in those steps.
    pub mean_batch: f64,
}

/// A sequence's answer, or why the model could not give it (transient: it may later).
pub type Reply = oneshot::Sender<Result<Generation, ModelFailure>>;

struct Waiting {
    request: SequenceRequest,
    enqueued: Instant,
    reply: Reply,
    /// The job it belongs to (for fault injection; `None` without faults).
    job: Option<Arc<str>>,
}

/// A sequence in the running batch (its row of the cache has the same index).
struct Active {
    label: String,
    job: Option<Arc<str>>,
    generated: Vec<u32>,
    rope_delta: i64,
    max_new_tokens: usize,
    timings: DecodeTimings,
    batch_sum: usize,
    steps: usize,
    reply: Reply,
}

impl Active {
    /// Slots its cache row may still grow to.
    fn worst_length(&self, length: usize) -> usize {
        length + self.max_new_tokens.saturating_sub(self.generated.len())
    }
}

/// Why admission stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Nobody is waiting.
    NoneWaiting,
    /// `max_active` sequences are running.
    BatchFull,
    /// Admitting the next one could take the cache over `max_kv_bytes`.
    KvBudget,
}

/// Whether the next waiting sequence may join a batch whose rows could grow to `worst`
/// slots each (`worst.len()` active sequences), given its own worst length `next` (prompt +
/// new tokens): the padded cache `(active + 1) × max worst × bytes_per_token` must fit the
/// budget. A sequence that alone exceeds the budget runs alone rather than never.
pub fn admission(
    worst: &[usize],
    next: Option<usize>,
    bytes_per_token: u64,
    settings: &SchedulerSettings,
) -> Result<(), Hold> {
    let Some(next) = next else {
        return Err(Hold::NoneWaiting);
    };
    if worst.len() >= settings.max_active.max(1) {
        return Err(Hold::BatchFull);
    }
    if worst.is_empty() {
        return Ok(());
    }
    let width = worst.iter().copied().max().unwrap_or(0).max(next) as u64;
    let bytes = (worst.len() as u64 + 1) * width * bytes_per_token;
    if bytes > settings.max_kv_bytes {
        return Err(Hold::KvBudget);
    }
    Ok(())
}

/// The continuous-batching state machine around a [`DecoderModel`].
pub struct Scheduler {
    model: DecoderModel,
    settings: SchedulerSettings,
    stop_tokens: Vec<u32>,
    cache: KvBatch,
    active: Vec<Active>,
    waiting: VecDeque<Waiting>,
    name: String,
    observer: Arc<dyn BatchObserver>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Scheduler {
    pub fn new(
        name: &str,
        model: DecoderModel,
        settings: SchedulerSettings,
        stop_tokens: Vec<u32>,
        observer: Arc<dyn BatchObserver>,
    ) -> Scheduler {
        Scheduler {
            cache: KvBatch::empty(model.kv),
            model,
            settings,
            stop_tokens,
            active: Vec::new(),
            waiting: VecDeque::new(),
            name: name.to_string(),
            observer,
        }
    }

    /// Queues a sequence; its result goes to `reply`.
    pub fn enqueue(&mut self, request: SequenceRequest, enqueued: Instant, reply: Reply) {
        self.submit(Submitted {
            request,
            enqueued,
            reply,
            job: None,
        });
    }

    fn submit(&mut self, submitted: Submitted) {
        self.waiting.push_back(Waiting {
            request: submitted.request,
            enqueued: submitted.enqueued,
            reply: submitted.reply,
            job: submitted.job,
        });
    }

    /// Nothing running and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty()
    }

    /// Labels of the running sequences, in batch order.
    pub fn active_labels(&self) -> Vec<&str> {
        self.active.iter().map(|a| a.label.as_str()).collect()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Bytes of the running batch's cache.
    pub fn kv_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    /// Admits waiting sequences while the limits allow: each is prefilled alone and joins the
    /// batch (or finishes at once). Returns why admission stopped.
    pub fn admit(&mut self) -> Hold {
        let mut changed = false;
        let hold = loop {
            // Callers that have gone (a job past its deadline) are not prefilled.
            while self.waiting.front().is_some_and(|w| w.reply.is_closed()) {
                self.waiting.pop_front();
                self.observer
                    .decoder(&self.name, &DecoderEvent::Finished { generated: 0 });
            }
            let worst: Vec<usize> = self
                .active
                .iter()
                .zip(self.cache.lengths())
                .map(|(a, &len)| a.worst_length(len))
                .collect();
            let next = self
                .waiting
                .front()
                .map(|w| w.request.prompt.ids.len() + w.request.max_new_tokens);
            if let Err(hold) = admission(
                &worst,
                next,
                self.cache.layout().bytes_per_token(),
                &self.settings,
            ) {
                break hold;
            }
            let Some(waiting) = self.waiting.pop_front() else {
                break Hold::NoneWaiting;
            };
            changed |= self.prefill(waiting);
        };
        if changed {
            self.report_load();
        }
        hold
    }

    /// Prefills one sequence; returns whether the batch changed.
    fn prefill(&mut self, waiting: Waiting) -> bool {
        let Waiting {
            request,
            enqueued,
            reply,
            job,
        } = waiting;
        let started = Instant::now();
        let prompt_tokens = request.prompt.ids.len();
        let jobs = [job.clone()];
        let settings = self.settings;
        let first = self.prefill_call(&request.prompt, &jobs);
        let result = with_retries(&settings, first, || {
            self.prefill_call(&request.prompt, &jobs)
        });
        let (token, cache) = match result {
            Ok(done) => done,
            Err(failure) => {
                tracing::warn!(model = %self.name, sequence = %request.label,
                    transient = failure.transient, error = %failure.message, "prefill failed");
                let _ = reply.send(Err(failure));
                self.observer
                    .decoder(&self.name, &DecoderEvent::Finished { generated: 0 });
                return false;
            }
        };
        let now = Instant::now();
        let timings = DecodeTimings {
            queue: ms(started.saturating_duration_since(enqueued)),
            prefill: ms(now - started),
            time_to_first_token: ms(now.saturating_duration_since(enqueued)),
            decode: 0.0,
        };
        self.observer.decoder(
            &self.name,
            &DecoderEvent::Prefill {
                prompt_tokens,
                duration: now - started,
                time_to_first_token: now.saturating_duration_since(enqueued),
            },
        );
        let active = Active {
            label: request.label,
            job,
            generated: vec![token],
            rope_delta: request.prompt.positions.rope_delta,
            max_new_tokens: request.max_new_tokens.max(1),
            timings,
            batch_sum: 0,
            steps: 0,
            reply,
        };
        match self.finished(&active) {
            Some(stop) => {
                self.reply(active, stop);
                false
            }
            None => match self.cache.join(cache) {
                Ok(()) => {
                    tracing::debug!(sequence = %active.label, prompt_tokens, "sequence joined the decode batch");
                    self.active.push(active);
                    true
                }
                Err(e) => {
                    let _ = active
                        .reply
                        .send(Err(ModelFailure::permanent(format!("{e:#}"))));
                    false
                }
            },
        }
    }

    fn finished(&self, seq: &Active) -> Option<StopReason> {
        let last = seq.generated.last()?;
        if self.stop_tokens.contains(last) {
            Some(StopReason::StopToken)
        } else if seq.generated.len() >= seq.max_new_tokens {
            Some(StopReason::MaxNewTokens)
        } else {
            None
        }
    }

    fn reply(&self, seq: Active, stop_reason: StopReason) {
        self.observer.decoder(
            &self.name,
            &DecoderEvent::Finished {
                generated: seq.generated.len(),
            },
        );
        let generation = Generation {
            mean_batch: if seq.steps > 0 {
                seq.batch_sum as f64 / seq.steps as f64
            } else {
                0.0
            },
            decode_steps: seq.steps,
            ids: seq.generated,
            stop_reason,
            timings: seq.timings,
        };
        let _ = seq.reply.send(Ok(generation));
    }

    fn report_load(&self) {
        self.observer.decoder(
            &self.name,
            &DecoderEvent::Load {
                active: self.active.len(),
                kv_bytes: self.cache.bytes(),
            },
        );
    }

    /// One decode step for every active sequence; finished (and abandoned) ones leave.
    /// Returns the batch size (0 when nothing was active).
    pub fn step(&mut self) -> usize {
        let batch = self.active.len();
        if batch == 0 {
            return 0;
        }
        let tokens: Vec<i64> = self
            .active
            .iter()
            .map(|a| i64::from(a.generated.last().copied().unwrap_or(0)))
            .collect();
        let deltas: Vec<i64> = self.active.iter().map(|a| a.rope_delta).collect();
        let jobs: Vec<Option<Arc<str>>> = self.active.iter().map(|a| a.job.clone()).collect();
        let started = Instant::now();
        let result = Self::step_call(
            &mut self.model,
            &self.name,
            &mut self.cache,
            &tokens,
            &deltas,
            &jobs,
        );
        let took = started.elapsed();
        self.observer.decoder(
            &self.name,
            &DecoderEvent::Step {
                batch,
                duration: took,
            },
        );
        let next = match result {
            Ok(next) => next,
            Err(failure) => match self.recover(failure, &tokens, &deltas, &jobs) {
                Some(next) => next,
                None => return batch,
            },
        };
        let mut keep = Vec::with_capacity(batch);
        let mut done = Vec::new();
        for (seq, token) in self.active.iter_mut().zip(next) {
            seq.generated.push(token);
            seq.timings.decode += ms(took);
            seq.batch_sum += batch;
            seq.steps += 1;
        }
        for seq in std::mem::take(&mut self.active) {
            if seq.reply.is_closed() {
                keep.push(false);
                self.observer.decoder(
                    &self.name,
                    &DecoderEvent::Finished {
                        generated: seq.generated.len(),
                    },
                );
            } else if let Some(stop) = self.finished(&seq) {
                keep.push(false);
                done.push((seq, stop));
            } else {
                keep.push(true);
                self.active.push(seq);
            }
        }
        if keep.iter().any(|k| !k) {
            self.cache.retain(&keep);
        }
        for (seq, stop) in done {
            tracing::debug!(sequence = %seq.label, tokens = seq.generated.len(), "sequence finished");
            self.reply(seq, stop);
        }
        self.report_load();
        batch
    }
}

impl Scheduler {
    /// One prefill call (unless a fault is injected), panics and errors classified.
    fn prefill_call(
        &mut self,
        prompt: &Prompt,
        jobs: &[Option<Arc<str>>],
    ) -> Result<(u32, KvBatch), ModelFailure> {
        if let Some(fault) = crate::faults::model_call(PREFILL, jobs) {
            return Err(failure::injected(fault, PREFILL));
        }
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.model.prefill(prompt)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the decoder panicked")))
            .map_err(|e| ModelFailure::of(&e))
    }

    /// One decode step of `cache`'s rows (unless a fault is injected). A failed call leaves
    /// the cache as it was: the runtime's outputs are appended only after it succeeds.
    fn step_call(
        model: &mut DecoderModel,
        name: &str,
        cache: &mut KvBatch,
        tokens: &[i64],
        deltas: &[i64],
        jobs: &[Option<Arc<str>>],
    ) -> Result<Vec<u32>, ModelFailure> {
        if let Some(fault) = crate::faults::model_call(name, jobs) {
            return Err(failure::injected(fault, name));
        }
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.step(cache, tokens, deltas)
        }))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the decoder panicked")))
        .map_err(|e| ModelFailure::of(&e))
    }

    /// After a failed step of the whole batch: each sequence's row is stepped alone (a
    /// transient failure retried after a pause, doubling), so that only a sequence that fails
    /// alone fails, as on the batchers' path. Returns the next token of every active sequence,
    /// the cache advanced, with the failed ones removed and answered; `None` when none is left.
    fn recover(
        &mut self,
        failure: ModelFailure,
        tokens: &[i64],
        deltas: &[i64],
        jobs: &[Option<Arc<str>>],
    ) -> Option<Vec<u32>> {
        tracing::warn!(model = %self.name, sequences = tokens.len(), transient = failure.transient,
            error = %failure.message, "decode step failed: stepping each sequence alone");
        let mut rows: Vec<Result<(u32, KvBatch), ModelFailure>> = Vec::with_capacity(tokens.len());
        let settings = self.settings;
        for r in 0..tokens.len() {
            let (model, name, cache) = (&mut self.model, self.name.as_str(), &self.cache);
            let mut alone = || {
                let mut row = cache.row(r);
                let rows = r..r + 1;
                Self::step_call(
                    model,
                    name,
                    &mut row,
                    &tokens[rows.clone()],
                    &deltas[rows.clone()],
                    &jobs[rows],
                )
                .map(|next| (next[0], row))
            };
            // A batch of one has just failed alone.
            let first = if tokens.len() == 1 {
                Err(failure.clone())
            } else {
                alone()
            };
            rows.push(with_retries(&settings, first, alone));
        }
        let mut cache = KvBatch::empty(self.model.kv);
        let mut next = Vec::new();
        let mut kept = Vec::new();
        for (seq, row) in std::mem::take(&mut self.active).into_iter().zip(rows) {
            match row.and_then(|(token, row)| {
                cache
                    .join(row)
                    .map(|()| token)
                    .map_err(|e| ModelFailure::permanent(format!("{e:#}")))
            }) {
                Ok(token) => {
                    next.push(token);
                    kept.push(seq);
                }
                Err(failure) => {
                    tracing::warn!(model = %self.name, sequence = %seq.label,
                        transient = failure.transient, error = %failure.message,
                        "sequence failed alone");
                    self.observer.decoder(
                        &self.name,
                        &DecoderEvent::Finished {
                            generated: seq.generated.len(),
                        },
                    );
                    let _ = seq.reply.send(Err(failure));
                }
            }
        }
        self.active = kept;
        self.cache = cache;
        if self.active.is_empty() {
            self.report_load();
            return None;
        }
        Some(next)
    }
}

/// `first` (a call's first attempt), then the call again after a pause, doubling, while it
/// fails transiently and `settings.retries` are left.
fn with_retries<T>(
    settings: &SchedulerSettings,
    first: Result<T, ModelFailure>,
    mut call: impl FnMut() -> Result<T, ModelFailure>,
) -> Result<T, ModelFailure> {
    let mut result = first;
    let mut pause = settings.retry_backoff;
    for _ in 0..settings.retries {
        match &result {
            Err(failure) if failure.transient => {
                std::thread::sleep(pause);
                pause = pause.saturating_mul(2);
                result = call();
            }
            _ => break,
        }
    }
    result
}

/// The decoder's prefill calls as fault-injection rules name them (`fail@model.prefill`); its
/// batched decode steps are `model.decoder`.
pub const PREFILL: &str = "prefill";

/// A sequence sent to the decoder thread.
struct Submitted {
    request: SequenceRequest,
    enqueued: Instant,
    reply: Reply,
    job: Option<Arc<str>>,
}

/// Handle to the decoder thread that runs a [`Scheduler`] (cheap to clone).
#[derive(Clone)]
pub struct Decoder {
    name: Arc<str>,
    tx: mpsc::Sender<Submitted>,
}

impl Decoder {
    /// Starts the thread `model-{name}`; it ends when every handle is gone and its work is
    /// done.
    pub fn spawn(mut scheduler: Scheduler) -> Decoder {
        let name: Arc<str> = Arc::from(scheduler.name.as_str());
        let (tx, mut rx) = mpsc::channel::<Submitted>(scheduler.settings.max_queue.max(1));
        spawn_model_thread(&name, move || loop {
            if scheduler.is_idle() {
                match rx.blocking_recv() {
                    Some(s) => scheduler.submit(s),
                    None => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                scheduler.submit(s);
            }
            scheduler.admit();
            scheduler.step();
        });
        Decoder { name, tx }
    }

    /// Generates one sequence (waits for room when `max_queue` sequences are waiting). A
    /// failure says whether it is transient (the model could not run it now: out of memory,
    /// device busy, shutting down) or the sequence's own.
    pub async fn generate(&self, request: SequenceRequest) -> Result<Generation, ModelFailure> {
        let (reply, rx) = oneshot::channel();
        let closed = || ModelFailure::transient(format!("model {} is shut down", self.name));
        self.tx
            .send(Submitted {
                request,
                enqueued: Instant::now(),
                reply,
                job: crate::faults::current_job(),
            })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_active: usize, max_kv_bytes: u64) -> SchedulerSettings {
        SchedulerSettings {
            max_active,
            max_kv_bytes,
            max_queue: 16,
            retries: 0,
            retry_backoff: Duration::ZERO,
        }
    }

    #[test]
    fn admission_follows_the_limits() {
        let s = settings(2, 1000);
        assert_eq!(admission(&[], None, 1, &s), Err(Hold::NoneWaiting));
        assert_eq!(
            admission(&[], Some(5000), 1, &s),
            Ok(()),
            "alone even over budget"
        );
        assert_eq!(admission(&[400], Some(500), 1, &s), Ok(()));
        // 2 rows x 501 slots x 1 byte > 1000.
        assert_eq!(admission(&[400], Some(501), 1, &s), Err(Hold::KvBudget));
        assert_eq!(admission(&[501], Some(10), 1, &s), Err(Hold::KvBudget));
        assert_eq!(admission(&[1, 1], Some(1), 1, &s), Err(Hold::BatchFull));
        assert_eq!(
            admission(&[], Some(1), 1, &settings(0, 0)),
            Ok(()),
            "0 means 1"
        );
    }
}
