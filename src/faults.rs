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

use std::fmt;
use std::sync::OnceLock;
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

/// A parsed [`ENV_VAR`] value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub rules: Vec<Fault>,
}

impl Faults {
    /// Parses a specification (see the module documentation). Errors name the bad rule.
    pub fn parse(spec: &str) -> Result<Faults, String> {
        let mut rules = Vec::new();
        for rule in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            rules.push(parse_rule(rule).map_err(|why| format!("fault rule {rule:?}: {why}"))?);
        }
        Ok(Faults { rules })
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

fn split_arg(text: &str) -> (&str, Option<&str>) {
    match text.split_once('=') {
        Some((name, arg)) => (name, Some(arg)),
        None => (text, None),
    }
}

/// The process's faults, read from [`ENV_VAR`] once; `None` when unset, empty or invalid.
static ACTIVE: OnceLock<Option<Faults>> = OnceLock::new();

fn load() -> Option<Faults> {
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
            Some(faults)
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
    let Some(faults) = ACTIVE.get_or_init(load) else {
        return;
    };
    for fault in faults.matching(point, job_id) {
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
    fn names_round_trip() {
        for p in FaultPoint::ALL {
            assert_eq!(FaultPoint::parse(p.as_str()), Some(p));
        }
    }
}
