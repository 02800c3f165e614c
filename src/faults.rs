//! Fault injection: a **test hook** that makes a worker crash, panic or stall at named points of
//! a job's life, so that the delivery guarantees (design §7) can be proven against real servers
//! rather than argued (in the spirit of meilisearch's `FailureLocation` / `maybe_fail`).
//!
//! Faults are switched on only by the environment variable [`ENV_VAR`] (`RETOUCHER_FAULTS`), read
//! once per process. Unset or empty, every [`hit`] is a single atomic load and returns at once;
//! no configuration file or job message can switch a fault on. A worker started with faults logs
//! a warning, because such a process is not fit for production.
//!
//! Syntax: a comma-separated list of `ACTION@POINT[:JOB_ID_PREFIX]`, where
//! - `ACTION` is `crash` ([`std::process::abort`]: the process dies at once, as if SIGKILLed,
//!   with no drain, no nack and no cleanup), `panic` (a panic inside the job's task), or
//!   `sleep=MS` (the job waits MS milliseconds, so a test can kill or stop the worker while the
//!   job is surely in flight);
//! - `POINT` is a [`FaultPoint`] name (`after_fetch`, `after_decode`, `after_retouch`,
//!   `after_retouched_write`, `before_diagnostics`, `after_diagnostics`); the sleep duration may
//!   also follow the point (`sleep@after_fetch=2000`);
//! - `JOB_ID_PREFIX` limits the fault to jobs whose id starts with it (job ids never contain
//!   `,`, `@` or `:`); without it the fault hits every job.
//!
//! Example: `crash@after_fetch:poison-,panic@before_diagnostics:boom-,sleep=2000@after_fetch:slow-`.
//! Every matching rule fires, in the order written.
//!
//! **Model faults** fail session calls on the batch path instead (see
//! [`crate::engine::batcher`]): `ACTION[=N]@model.ROLE[:JOB_ID_PREFIX]`, where `ACTION` is `fail`
//! (a permanent runtime error, as ONNX Runtime reports an input it cannot run) or `oom` (a
//! transient one: ONNX Runtime's out-of-memory error), `ROLE` a model role (`perception`,
//! `classifier`, `inpaint`, …), and `N` limits the rule to the first N calls it fails (without
//! it, every matching call fails). A call matches when its batch holds a request of a job whose
//! id starts with the prefix (any job's request without one); calls made outside jobs (warm-up,
//! `bench`'s model-only phase) never match. So `fail@model.perception:poison-` is a poison input
//! that fails every batch it is in, and `oom=2@model.inpaint` two transient failures in a row.
//! The VLM decoder's batched decode steps are `model.decoder`, its per-sequence prefills
//! `model.prefill`.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tracing::warn;

/// The environment variable that switches faults on.
pub const ENV_VAR: &str = "RETOUCHER_FAULTS";

/// Where in a job a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// The input image has been read from storage; nothing is decoded or written yet.
    AfterFetch,
    /// The input has been decoded.
    AfterDecode,
    /// The agents' loop has finished; nothing of the result set is written yet.
    AfterRetouch,
    /// `retouched.png` is stored (other images may be too), `diagnostics.json` is not: the
    /// partial result set a redelivery must not trust.
    AfterRetouchedWrite,
    /// Every image of the set is stored, `diagnostics.json` (the commit marker) is not.
    BeforeDiagnostics,
    /// The commit marker is stored; the event is not published and the message not acked, so
    /// a redelivery must find the set complete and not recompute it.
    AfterDiagnostics,
}

impl FaultPoint {
    /// Every point, for parsing and documentation.
    pub const ALL: [FaultPoint; 6] = [
        FaultPoint::AfterFetch,
        FaultPoint::AfterDecode,
        FaultPoint::AfterRetouch,
        FaultPoint::AfterRetouchedWrite,
        FaultPoint::BeforeDiagnostics,
        FaultPoint::AfterDiagnostics,
    ];

    /// The name used in [`ENV_VAR`].
    pub fn as_str(self) -> &'static str {
        match self {
            FaultPoint::AfterFetch => "after_fetch",
            FaultPoint::AfterDecode => "after_decode",
            FaultPoint::AfterRetouch => "after_retouch",
            FaultPoint::AfterRetouchedWrite => "after_retouched_write",
            FaultPoint::BeforeDiagnostics => "before_diagnostics",
            FaultPoint::AfterDiagnostics => "after_diagnostics",
        }
    }

    fn parse(name: &str) -> Option<FaultPoint> {
        FaultPoint::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Abort the process (no unwinding, no destructors: a killed worker).
    Crash,
    /// Panic inside the job.
    Panic,
    /// Hold the job for this long.
    Sleep(Duration),
}

/// One rule of the specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub action: FaultAction,
    pub point: FaultPoint,
    /// Only jobs whose id starts with this; empty matches every job.
    pub job_prefix: String,
}

/// What a model fault makes a session call do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFaultKind {
    /// A permanent runtime error: the request cannot be run.
    Fail,
    /// ONNX Runtime's out-of-memory error, which is transient.
    OutOfMemory,
}

/// One model rule of the specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFault {
    pub kind: ModelFaultKind,
    /// The model role (`perception`, `inpaint`, …).
    pub model: String,
    /// Only calls holding a request of a job whose id starts with this; empty: any job's.
    pub job_prefix: String,
    /// Fail at most this many calls; `None`: every matching call.
    pub times: Option<u32>,
}

/// A parsed [`ENV_VAR`] value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub rules: Vec<Fault>,
    pub models: Vec<ModelFault>,
}

impl Faults {
    /// Parses a specification (see the module documentation). Errors name the bad rule.
    pub fn parse(spec: &str) -> Result<Faults, String> {
        let mut faults = Faults::default();
        for rule in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let context = |why: String| format!("fault rule {rule:?}: {why}");
            let model_rule = rule
                .split_once('@')
                .is_some_and(|(_, point)| point.starts_with(MODEL_POINT));
            if model_rule {
                faults.models.push(parse_model_rule(rule).map_err(context)?);
            } else {
                faults.rules.push(parse_rule(rule).map_err(context)?);
            }
        }
        Ok(faults)
    }

    /// The rules that apply to this job at this point, in order.
    pub fn matching<'a>(
        &'a self,
        point: FaultPoint,
        job_id: &'a str,
    ) -> impl Iterator<Item = &'a Fault> + 'a {
        self.rules
            .iter()
            .filter(move |f| f.point == point && job_id.starts_with(&f.job_prefix))
    }
}

fn parse_rule(rule: &str) -> Result<Fault, String> {
    let (action, rest) = rule
        .split_once('@')
        .ok_or("expected ACTION@POINT[:JOB_ID_PREFIX]")?;
    let (point, prefix) = rest.split_once(':').unwrap_or((rest, ""));
    // The sleep duration may be written on the action (`sleep=MS@point`) or on the point
    // (`sleep@point=MS`); both read naturally.
    let (action, action_arg) = split_arg(action);
    let (point, point_arg) = split_arg(point);
    let arg = match (action_arg, point_arg) {
        (Some(_), Some(_)) => return Err("the sleep duration is given twice".into()),
        (a, p) => a.or(p),
    };
    let point = FaultPoint::parse(point).ok_or_else(|| {
        let names: Vec<&str> = FaultPoint::ALL.iter().map(|p| p.as_str()).collect();
        format!("unknown point {point:?}; known: {}", names.join(", "))
    })?;
    let action = match (action, arg) {
        ("crash", None) => FaultAction::Crash,
        ("panic", None) => FaultAction::Panic,
        ("sleep", Some(ms)) => FaultAction::Sleep(Duration::from_millis(
            ms.parse()
                .map_err(|_| format!("sleep needs milliseconds, got {ms:?}"))?,
        )),
        ("sleep", None) => return Err("sleep needs a duration: sleep=MS".into()),
        ("crash" | "panic", Some(_)) => return Err(format!("{action} takes no argument")),
        (other, _) => {
            return Err(format!(
                "unknown action {other:?}; known: crash, panic, sleep=MS"
            ))
        }
    };
    Ok(Fault {
        action,
        point,
        job_prefix: prefix.to_string(),
    })
}

/// Model rules name their point `model.ROLE`.
const MODEL_POINT: &str = "model.";

fn parse_model_rule(rule: &str) -> Result<ModelFault, String> {
    let (action, rest) = rule
        .split_once('@')
        .ok_or("expected ACTION[=N]@model.ROLE[:JOB_ID_PREFIX]")?;
    let (point, prefix) = rest.split_once(':').unwrap_or((rest, ""));
    let (action, action_arg) = split_arg(action);
    let (point, point_arg) = split_arg(point);
    let times = match (action_arg, point_arg) {
        (Some(_), Some(_)) => return Err("the count is given twice".into()),
        (None, None) => None,
        (Some(n), None) | (None, Some(n)) => Some(
            n.parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("the count must be a positive number, got {n:?}"))?,
        ),
    };
    let kind = match action {
        "fail" => ModelFaultKind::Fail,
        "oom" => ModelFaultKind::OutOfMemory,
        other => {
            return Err(format!(
                "unknown model action {other:?}; known: fail[=N], oom[=N]"
            ))
        }
    };
    let model = point.strip_prefix(MODEL_POINT).unwrap_or(point);
    if model.is_empty() {
        return Err("model.ROLE needs a model role, e.g. model.perception".into());
    }
    Ok(ModelFault {
        kind,
        model: model.to_string(),
        job_prefix: prefix.to_string(),
        times,
    })
}

fn split_arg(text: &str) -> (&str, Option<&str>) {
    match text.split_once('=') {
        Some((name, arg)) => (name, Some(arg)),
        None => (text, None),
    }
}

/// The faults of the process, with how often each model rule has fired.
struct Active {
    faults: Faults,
    fired: Vec<AtomicU32>,
}

/// The process's faults, read from [`ENV_VAR`] once; `None` when unset, empty or invalid.
static ACTIVE: OnceLock<Option<Active>> = OnceLock::new();

fn load() -> Option<Active> {
    let spec = std::env::var(ENV_VAR).ok()?;
    if spec.trim().is_empty() {
        return None;
    }
    match Faults::parse(&spec) {
        Ok(faults) => {
            warn!(
                spec = %spec,
                "{ENV_VAR} is set: fault injection is active (a test hook; never set it in production)"
            );
            let fired = faults.models.iter().map(|_| AtomicU32::new(0)).collect();
            Some(Active { faults, fired })
        }
        Err(e) => {
            // Reached only when `init` was not called first; a job is no place to fail.
            warn!(error = %e, "{ENV_VAR} is invalid: fault injection stays off");
            None
        }
    }
}

/// Reads [`ENV_VAR`] now (logging the warning at start rather than at the first job) and refuses
/// an invalid specification, so a mistyped test hook fails loudly instead of silently not firing.
pub fn init() -> Result<(), String> {
    if let Ok(spec) = std::env::var(ENV_VAR) {
        Faults::parse(&spec)?;
    }
    ACTIVE.get_or_init(load);
    Ok(())
}

/// Whether any fault is configured in this process.
pub fn active() -> bool {
    ACTIVE.get_or_init(load).is_some()
}

/// The fault-injection point `point` in job `job_id`: does nothing unless [`ENV_VAR`] names a
/// rule for it.
pub async fn hit(point: FaultPoint, job_id: &str) {
    let Some(active) = ACTIVE.get_or_init(load) else {
        return;
    };
    for fault in active.faults.matching(point, job_id) {
        match fault.action {
            FaultAction::Crash => {
                // Straight to stderr: the logger may buffer, and the test reads the log.
                eprintln!("fault injection: crash at {point} in job {job_id}: aborting");
                std::process::abort();
            }
            FaultAction::Panic => {
                panic!("injected fault: panic at {point} in job {job_id}");
            }
            FaultAction::Sleep(duration) => {
                warn!(%point, job_id, ms = duration.as_millis() as u64, "fault injection: sleeping");
                tokio::time::sleep(duration).await;
            }
        }
    }
}

tokio::task_local! {
    /// The job whose work the current task is doing (set only while faults are active).
    static JOB: Arc<str>;
}

/// Runs `work` as job `job_id`'s, so that model faults with a job prefix match the model requests
/// it makes. Without faults it is `work` itself.
pub async fn in_job<F: Future>(job_id: &str, work: F) -> F::Output {
    if active() {
        JOB.scope(Arc::from(job_id), work).await
    } else {
        work.await
    }
}

/// The job whose work the current task is doing (see [`in_job`]); `None` without faults.
pub fn current_job() -> Option<Arc<str>> {
    if !active() {
        return None;
    }
    JOB.try_with(Arc::clone).ok()
}

/// The fault, if any, for one session call of `model` whose batch holds requests of `jobs`
/// (`None` for a request made outside a job). The first matching rule with calls left fires.
pub fn model_call(model: &str, jobs: &[Option<Arc<str>>]) -> Option<ModelFaultKind> {
    let active = ACTIVE.get_or_init(load).as_ref()?;
    let fault = active.faults.model_fault(model, jobs, &active.fired)?;
    warn!(model, fault = ?fault, "fault injection: failing a model call");
    Some(fault)
}

impl Faults {
    /// See [`model_call`]; `fired` counts the calls each model rule has failed so far.
    fn model_fault(
        &self,
        model: &str,
        jobs: &[Option<Arc<str>>],
        fired: &[AtomicU32],
    ) -> Option<ModelFaultKind> {
        for (rule, fired) in self.models.iter().zip(fired) {
            let matches = rule.model == model
                && jobs
                    .iter()
                    .flatten()
                    .any(|job| job.starts_with(&rule.job_prefix));
            if !matches {
                continue;
            }
            let limit = rule.times.unwrap_or(u32::MAX);
            let counted = fired
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok();
            if counted {
                return Some(rule.kind);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let f = Faults::parse(
            "crash@after_fetch:poison-, panic@before_diagnostics:boom-,\
             sleep@after_fetch=2000:slow-,sleep=5@after_retouched_write",
        )
        .unwrap();
        assert_eq!(
            f.rules,
            vec![
                Fault {
                    action: FaultAction::Crash,
                    point: FaultPoint::AfterFetch,
                    job_prefix: "poison-".into()
                },
                Fault {
                    action: FaultAction::Panic,
                    point: FaultPoint::BeforeDiagnostics,
                    job_prefix: "boom-".into()
                },
                Fault {
                    action: FaultAction::Sleep(Duration::from_millis(2000)),
                    point: FaultPoint::AfterFetch,
                    job_prefix: "slow-".into()
                },
                Fault {
                    action: FaultAction::Sleep(Duration::from_millis(5)),
                    point: FaultPoint::AfterRetouchedWrite,
                    job_prefix: String::new()
                },
            ]
        );
        assert!(Faults::parse("").unwrap().rules.is_empty());
    }

    #[test]
    fn matches_by_point_and_prefix() {
        let f = Faults::parse("crash@after_fetch:poison-,sleep=1@after_fetch").unwrap();
        assert_eq!(f.matching(FaultPoint::AfterFetch, "poison-1").count(), 2);
        assert_eq!(f.matching(FaultPoint::AfterFetch, "good-1").count(), 1);
        assert_eq!(f.matching(FaultPoint::AfterDecode, "poison-1").count(), 0);
    }

    #[test]
    fn rejects_what_it_does_not_understand() {
        for (spec, why) in [
            ("crash", "ACTION@POINT"),
            ("crash@nowhere", "unknown point"),
            ("explode@after_fetch", "unknown action"),
            ("sleep@after_fetch", "needs a duration"),
            ("sleep@after_fetch=soon", "milliseconds"),
            ("sleep=1@after_fetch=2", "twice"),
            ("panic=3@after_fetch", "no argument"),
        ] {
            let err = Faults::parse(spec).unwrap_err();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn model_rules_parse_and_fire_for_their_jobs_and_counts() {
        let f = Faults::parse(
            "fail@model.perception:poison-, oom=2@model.inpaint, sleep=1@after_fetch, \
             oom@model.classifier=1:slow-",
        )
        .unwrap();
        assert_eq!(f.rules.len(), 1);
        assert_eq!(
            f.models,
            vec![
                ModelFault {
                    kind: ModelFaultKind::Fail,
                    model: "perception".into(),
                    job_prefix: "poison-".into(),
                    times: None
                },
                ModelFault {
                    kind: ModelFaultKind::OutOfMemory,
                    model: "inpaint".into(),
                    job_prefix: String::new(),
                    times: Some(2)
                },
                ModelFault {
                    kind: ModelFaultKind::OutOfMemory,
                    model: "classifier".into(),
                    job_prefix: "slow-".into(),
                    times: Some(1)
                },
            ]
        );
        let fired: Vec<AtomicU32> = f.models.iter().map(|_| AtomicU32::new(0)).collect();
        let job = |id: &str| Some(Arc::<str>::from(id));
        // A poison request fails every call it is in, and only those.
        for _ in 0..3 {
            assert_eq!(
                f.model_fault("perception", &[job("good-1"), job("poison-7")], &fired),
                Some(ModelFaultKind::Fail)
            );
        }
        assert_eq!(f.model_fault("perception", &[job("good-1")], &fired), None);
        // Calls outside jobs (warm-up) never match, not even an unprefixed rule.
        assert_eq!(f.model_fault("inpaint", &[None, None], &fired), None);
        // A count: the first two calls with a job fail, then the model runs again.
        assert_eq!(
            f.model_fault("inpaint", &[job("a"), None], &fired),
            Some(ModelFaultKind::OutOfMemory)
        );
        assert_eq!(
            f.model_fault("inpaint", &[job("b")], &fired),
            Some(ModelFaultKind::OutOfMemory)
        );
        assert_eq!(f.model_fault("inpaint", &[job("c")], &fired), None);
        assert_eq!(f.model_fault("classifier", &[job("fast-1")], &fired), None);
    }

    #[test]
    fn model_rules_refuse_what_they_do_not_understand() {
        for (spec, why) in [
            ("explode@model.perception", "unknown model action"),
            ("fail=0@model.perception", "positive"),
            ("oom=x@model.perception", "positive"),
            ("oom=1@model.perception=2", "twice"),
            ("fail@model.", "needs a model role"),
        ] {
            let err = Faults::parse(spec).unwrap_err();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn names_round_trip() {
        for p in FaultPoint::ALL {
            assert_eq!(FaultPoint::parse(p.as_str()), Some(p));
        }
    }
}
