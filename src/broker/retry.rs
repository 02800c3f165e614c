//! Retrying transient failures (design §4.5): how attempts are counted, when the worker gives
//! up, and which delay queue and per-message TTL a retry gets.
//!
//! # The delay ladder
//! Topology v2 (`migrations/0002_retry_delays.toml`) declares one delay queue per step,
//! `{queue}.retry.1` … `{queue}.retry.5`, with queue TTLs of 1 s, 5 s, 30 s, 2 min and 10 min;
//! nothing consumes them, and an expired message is dead-lettered by the broker straight back
//! into the jobs queue. After failed attempt `n` the job waits in step `min(n, steps)`: the
//! delays grow roughly fivefold per attempt and the last step repeats. `retry.delays_ms` may
//! shorten the steps (tests, impatient deployments) but never lengthen them past their queue's
//! TTL: the broker applies the smaller of queue TTL and message TTL, so a longer setting would
//! silently not happen, and it is refused at start instead.
//!
//! # Jitter, and why per-message TTL is safe here
//! Jobs that failed together (an S3 outage fails every job in flight) must not come back
//! together, so each retry gets a per-message `expiration` drawn uniformly from
//! `[(1 − retry.jitter) · d, d]`, `d` being the step's delay ("equal jitter" for the default
//! 0.5, as the broker reconnect uses). RabbitMQ only expires the message at the head of a
//! queue, so per-message TTLs that differ wildly in one queue block each other (a 10-minute
//! message at the head holds back a 1-second one behind it). Not here: a queue holds one step
//! and every message in it has a TTL of at most `d`. A message published at `t` only ever
//! waits behind messages published before it, which are all gone by `t + d`, so waiting behind
//! the head can push its delay up towards `d`, never past it. (Workers of one fleet configured
//! with different `retry.delays_ms` still cannot exceed the queue TTL.) The alternative, one
//! queue per distinct delay, would need the topology to know every jittered value.
//!
//! # Counting attempts
//! The attempt of a delivery is `x-retoucher-attempt` (set by the worker on each retry; 1 when
//! absent, i.e. as enqueued) plus the jobs queue's `x-delivery-count`, the number of times
//! *this copy* went back to the queue without an ack: a worker that crashed or lost its
//! connection mid-job, a graceful shutdown that ran out of drain time, or a retry that could
//! not be scheduled. Each of those started an attempt that did not finish, so it counts;
//! otherwise a job that kills its worker after a transient failure could be retried without
//! end. The delivery count restarts at 0 for every copy (a retry is a new message), so the two
//! never count the same try twice. The quorum queue's own `x-delivery-limit` stays the backstop
//! for a copy that crashes workers over and over.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use rand::Rng;

use crate::config::RetrySettings;

/// Header carrying the attempt number of a retried job (2 on the first retry).
pub const ATTEMPT_HEADER: &str = "x-retoucher-attempt";
/// Header with which quorum queues count a message's returns to the queue.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// One rung of the ladder: the delay queue and the longest wait in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub queue: String,
    pub delay: Duration,
}

/// What to do with a job whose attempt failed transiently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryDecision<'a> {
    /// Publish to the delay queue `queue` with a per-message TTL of `expiration`; it comes back
    /// as attempt `next_attempt`.
    Retry {
        queue: &'a str,
        expiration: Duration,
        next_attempt: u32,
    },
    /// `retry.max_attempts` attempts are spent: dead-letter it.
    GiveUp,
}

/// The retry settings checked against the topology's delay queues.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    jitter: f64,
    steps: Vec<Step>,
}

impl RetryPolicy {
    /// The policy for jobs queue `queue`: the ladder of the embedded migrations, shortened by
    /// `retry.delays_ms` when set. Fails on settings the topology cannot honour.
    pub fn new(queue: &str, settings: &RetrySettings) -> anyhow::Result<RetryPolicy> {
        RetryPolicy::of(&super::Migrations::embedded(), queue, settings)
    }

    /// [`RetryPolicy::new`] with the ladder of `migrations` (`broker.migrations`).
    pub fn of(
        migrations: &super::Migrations,
        queue: &str,
        settings: &RetrySettings,
    ) -> anyhow::Result<RetryPolicy> {
        let queues = migrations.delay_queues(queue)?;
        RetryPolicy::with_queues(queues, settings)
    }

    fn with_queues(
        queues: Vec<(String, Duration)>,
        settings: &RetrySettings,
    ) -> anyhow::Result<RetryPolicy> {
        anyhow::ensure!(
            settings.max_attempts >= 1,
            "retry.max_attempts must be at least 1 (1 = never retry)"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&settings.jitter),
            "retry.jitter must be between 0 and 1, got {}",
            settings.jitter
        );
        anyhow::ensure!(
            settings.delays_ms.len() <= queues.len(),
            "retry.delays_ms has {} steps but the broker topology has {} delay queues",
            settings.delays_ms.len(),
            queues.len()
        );
        let steps: Vec<Step> = if settings.delays_ms.is_empty() {
            queues
                .into_iter()
                .map(|(queue, delay)| Step { queue, delay })
                .collect()
        } else {
            settings
                .delays_ms
                .iter()
                .zip(queues)
                .enumerate()
                .map(|(i, (&ms, (queue, ttl)))| {
                    let delay = Duration::from_millis(ms);
                    anyhow::ensure!(
                        delay <= ttl,
                        "retry.delays_ms[{i}] = {ms} is longer than the TTL of `{queue}` ({} ms), \
                         which caps it: shorten it, or add a migration with longer delay queues",
                        ttl.as_millis()
                    );
                    Ok(Step { queue, delay })
                })
                .collect::<anyhow::Result<_>>()?
        };
        anyhow::ensure!(
            settings.max_attempts == 1 || !steps.is_empty(),
            "retry.max_attempts is {} but the broker topology has no delay queues",
            settings.max_attempts
        );
        Ok(RetryPolicy {
            max_attempts: settings.max_attempts,
            jitter: settings.jitter,
            steps,
        })
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The ladder in use, first step first.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// What to do after attempt `attempt` (1-based) failed transiently.
    pub fn decide(&self, attempt: u32) -> RetryDecision<'_> {
        self.decide_with(attempt, rand::rng().random::<f64>())
    }

    /// [`RetryPolicy::decide`] with the random draw `unit` in `[0, 1)` given.
    fn decide_with(&self, attempt: u32, unit: f64) -> RetryDecision<'_> {
        if attempt >= self.max_attempts || self.steps.is_empty() {
            return RetryDecision::GiveUp;
        }
        let index = (attempt.max(1) as usize).min(self.steps.len()) - 1;
        let step = &self.steps[index];
        let expiration = step.delay.mul_f64(1.0 - self.jitter * unit.clamp(0.0, 1.0));
        RetryDecision::Retry {
            queue: &step.queue,
            expiration,
            next_attempt: attempt + 1,
        }
    }
}

/// The attempt number of a delivery: `x-retoucher-attempt` (1 when absent) plus the quorum
/// queue's `x-delivery-count` (see the module documentation). At least 1.
pub fn attempt_of(properties: &BasicProperties) -> u32 {
    let headers = properties.headers().as_ref();
    let header = |name: &str| headers.and_then(|h| h.inner().get(name)).and_then(as_u32);
    let retried = header(ATTEMPT_HEADER).filter(|&n| n >= 1).unwrap_or(1);
    let returned = header(DELIVERY_COUNT_HEADER).unwrap_or(0);
    retried.saturating_add(returned)
}

/// The headers of a job's next attempt: the original ones (the broker's delivery count
/// removed, since it belongs to the copy being acked), the attempt number, and the failure
/// that caused the retry.
pub(crate) fn retry_headers(original: &BasicProperties, next_attempt: u32) -> FieldTable {
    let mut headers = original.headers().clone().unwrap_or_default();
    let mut kept = FieldTable::default();
    for (key, value) in headers.inner() {
        if key.as_str() != DELIVERY_COUNT_HEADER {
            kept.insert(key.clone(), value.clone());
        }
    }
    headers = kept;
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(next_attempt)),
    );
    headers
}

/// Any AMQP integer (or a decimal string: the management UI publishes headers as strings).
fn as_u32(value: &AMQPValue) -> Option<u32> {
    let n: i64 = match value {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()?
            .trim()
            .parse()
            .ok()?,
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok()?,
        _ => return None,
    };
    u32::try_from(n.max(0)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    fn settings(max_attempts: u32, delays_ms: &[u64], jitter: f64) -> RetrySettings {
        RetrySettings {
            max_attempts,
            delays_ms: delays_ms.to_vec(),
            jitter,
        }
    }

    fn ladder() -> Vec<(String, Duration)> {
        [1, 5, 30]
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("q.retry.{}", i + 1), Duration::from_secs(*s)))
            .collect()
    }

    #[test]
    fn the_embedded_topology_has_the_documented_ladder() {
        let policy = RetryPolicy::new("retoucher.jobs", &settings(5, &[], 0.5)).unwrap();
        let steps: Vec<(&str, u64)> = policy
            .steps()
            .iter()
            .map(|s| (s.queue.as_str(), s.delay.as_millis() as u64))
            .collect();
        assert_eq!(
            steps,
            [
                ("retoucher.jobs.retry.1", 1_000),
                ("retoucher.jobs.retry.2", 5_000),
                ("retoucher.jobs.retry.3", 30_000),
                ("retoucher.jobs.retry.4", 120_000),
                ("retoucher.jobs.retry.5", 600_000),
            ]
        );
    }

    #[test]
    fn steps_follow_the_attempt_and_the_last_repeats() {
        let policy = RetryPolicy::with_queues(ladder(), &settings(10, &[], 0.0)).unwrap();
        let at = |attempt| match policy.decide_with(attempt, 0.7) {
            RetryDecision::Retry {
                queue,
                expiration,
                next_attempt,
            } => (queue.to_owned(), expiration.as_secs(), next_attempt),
            RetryDecision::GiveUp => panic!("gave up at {attempt}"),
        };
        assert_eq!(at(1), ("q.retry.1".into(), 1, 2));
        assert_eq!(at(2), ("q.retry.2".into(), 5, 3));
        assert_eq!(at(3), ("q.retry.3".into(), 30, 4));
        assert_eq!(at(7), ("q.retry.3".into(), 30, 8));
        assert_eq!(policy.decide_with(10, 0.0), RetryDecision::GiveUp);
        assert_eq!(policy.decide_with(11, 0.0), RetryDecision::GiveUp);
    }

    #[test]
    fn jitter_stays_between_the_floor_and_the_step_delay() {
        let policy = RetryPolicy::with_queues(ladder(), &settings(5, &[], 0.5)).unwrap();
        let expiration = |unit| match policy.decide_with(2, unit) {
            RetryDecision::Retry { expiration, .. } => expiration,
            RetryDecision::GiveUp => unreachable!(),
        };
        assert_eq!(expiration(0.0), Duration::from_secs(5));
        assert_eq!(expiration(0.999_999_9).as_millis(), 2_500);
        for _ in 0..1000 {
            let RetryDecision::Retry { expiration, .. } = policy.decide(2) else {
                unreachable!()
            };
            assert!(expiration <= Duration::from_secs(5));
            assert!(expiration >= Duration::from_millis(2_500));
        }
    }

    #[test]
    fn configured_delays_shorten_the_ladder_but_cannot_exceed_the_ttl() {
        let policy = RetryPolicy::with_queues(ladder(), &settings(5, &[100, 200], 0.0)).unwrap();
        assert_eq!(policy.steps().len(), 2);
        assert_eq!(
            policy.decide_with(4, 0.0),
            RetryDecision::Retry {
                queue: "q.retry.2",
                expiration: Duration::from_millis(200),
                next_attempt: 5
            }
        );
        let err = RetryPolicy::with_queues(ladder(), &settings(5, &[100, 6000], 0.0)).unwrap_err();
        assert!(
            err.to_string().contains("retry.delays_ms[1] = 6000"),
            "{err}"
        );
        let err = RetryPolicy::with_queues(ladder(), &settings(5, &[1, 2, 3, 4], 0.0)).unwrap_err();
        assert!(err.to_string().contains("3 delay queues"), "{err}");
        assert!(RetryPolicy::with_queues(ladder(), &settings(0, &[], 0.0)).is_err());
        assert!(RetryPolicy::with_queues(ladder(), &settings(5, &[], 1.5)).is_err());
        assert!(RetryPolicy::with_queues(vec![], &settings(3, &[], 0.5)).is_err());
        let never = RetryPolicy::with_queues(vec![], &settings(1, &[], 0.5)).unwrap();
        assert_eq!(never.decide(1), RetryDecision::GiveUp);
    }

    fn with_headers(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (k, v) in pairs {
            headers.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn attempts_add_the_header_and_the_delivery_count() {
        assert_eq!(attempt_of(&BasicProperties::default()), 1);
        assert_eq!(
            attempt_of(&with_headers(&[(
                DELIVERY_COUNT_HEADER,
                AMQPValue::LongLongInt(2)
            )])),
            3
        );
        assert_eq!(
            attempt_of(&with_headers(&[(
                ATTEMPT_HEADER,
                AMQPValue::LongLongInt(4)
            )])),
            4
        );
        assert_eq!(
            attempt_of(&with_headers(&[
                (ATTEMPT_HEADER, AMQPValue::LongInt(3)),
                (DELIVERY_COUNT_HEADER, AMQPValue::LongLongInt(1)),
            ])),
            4
        );
        assert_eq!(
            attempt_of(&with_headers(&[(
                ATTEMPT_HEADER,
                AMQPValue::LongString(LongString::from("2"))
            )])),
            2
        );
        // Nonsense counts as the first attempt rather than failing the job.
        assert_eq!(
            attempt_of(&with_headers(&[(
                ATTEMPT_HEADER,
                AMQPValue::LongLongInt(-3)
            )])),
            1
        );
    }

    #[test]
    fn retry_headers_drop_the_delivery_count_and_keep_the_rest() {
        let original = with_headers(&[
            (DELIVERY_COUNT_HEADER, AMQPValue::LongLongInt(1)),
            ("tenant", AMQPValue::LongString(LongString::from("acme"))),
            (ATTEMPT_HEADER, AMQPValue::LongLongInt(2)),
        ]);
        let headers = retry_headers(&original, 3);
        let inner = headers.inner();
        assert!(!inner.contains_key(DELIVERY_COUNT_HEADER));
        assert_eq!(
            inner.get("tenant"),
            Some(&AMQPValue::LongString(LongString::from("acme")))
        );
        assert_eq!(inner.get(ATTEMPT_HEADER), Some(&AMQPValue::LongLongInt(3)));
        let next = BasicProperties::default().with_headers(headers);
        assert_eq!(attempt_of(&next), 3);
    }
}
