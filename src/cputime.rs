//! Where the process's CPU time goes (Linux `/proc`): the whole process, the model threads
//! (each batcher's thread and the ONNX Runtime pools of its session, all named `model-*`), the
//! async runtime's threads and the rest.
//!
//! `bench` uses it to say whether a run was bound by the models or by the worker's own work
//! around them (decode, resizing, regions, encoding, storage): the CPU time outside the model
//! threads per job, divided into the cores, is the throughput the host side can sustain.

use std::collections::BTreeMap;

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on every Linux target).
const TICKS_PER_S: f64 = 100.0;

/// CPU seconds used so far.
#[derive(Debug, Clone, Default)]
pub struct CpuSample {
    /// The process, threads that have exited included.
    pub process_s: f64,
    /// Each live thread by thread id: its group (see [`group`]) and CPU seconds.
    pub threads: BTreeMap<u32, (String, f64)>,
}

/// CPU seconds between two samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuDelta {
    /// The whole process.
    pub process_s: f64,
    /// The model threads (`model-*`).
    pub model_s: f64,
    /// By thread group, live threads only (threads that exited in between are in
    /// `process_s` but not here).
    pub groups: BTreeMap<String, f64>,
}

/// The group a thread's CPU time is reported under: a model thread keeps its own name
/// (`model-perceptio`, Linux keeps 15 bytes), tokio's workers and blocking pool are `runtime`,
/// anything else `other`.
fn group(name: &str) -> String {
    if name.starts_with("model-") {
        name.to_string()
    } else if name.starts_with("tokio-") {
        "runtime".to_string()
    } else {
        "other".to_string()
    }
}

impl CpuSample {
    /// Reads the counters now; `None` where `/proc` is not there (not Linux).
    pub fn now() -> Option<CpuSample> {
        let process_s = stat_cpu_s(&std::fs::read_to_string("/proc/self/stat").ok()?)?.1;
        let mut threads = BTreeMap::new();
        for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue; // the thread has just exited
            };
            if let Some((name, s)) = stat_cpu_s(&text) {
                threads.insert(tid, (group(name), s));
            }
        }
        Some(CpuSample { process_s, threads })
    }

    /// CPU time used between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuSample) -> CpuDelta {
        let mut groups: BTreeMap<String, f64> = BTreeMap::new();
        for (tid, (group, s)) in &self.threads {
            let before = earlier.threads.get(tid).map_or(0.0, |t| t.1);
            *groups.entry(group.clone()).or_default() += (s - before).max(0.0);
        }
        let model_s = groups
            .iter()
            .filter(|(g, _)| g.starts_with("model-"))
            .map(|(_, s)| s)
            .sum();
        CpuDelta {
            process_s: (self.process_s - earlier.process_s).max(0.0),
            model_s,
            groups,
        }
    }
}

/// `(comm, utime + stime in seconds)` from one `/proc/.../stat` line.
fn stat_cpu_s(text: &str) -> Option<(&str, f64)> {
    // The name is in parentheses and may itself hold spaces or parentheses: split at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?;
    // After the name: state (field 3) ... utime (14), stime (15).
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((name, (utime + stime) / TICKS_PER_S))
}

/// Runs `f` on a thread named `name`, so that threads it starts (ONNX Runtime's pools, created
/// with a session) carry the name too: Linux threads inherit their creator's name.
pub fn on_named_thread<R: Send>(name: &str, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| {
        match std::thread::Builder::new()
            .name(name.to_string())
            .spawn_scoped(scope, f)
        {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(e) => panic!("spawning thread {name}: {e}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_with_odd_names() {
        let line = "4242 (model-a) b) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100";
        let (name, s) = stat_cpu_s(line).unwrap();
        assert_eq!(name, "model-a) b");
        assert!((s - 3.0).abs() < 1e-9);
        assert!(stat_cpu_s("garbage").is_none());
    }

    /// Burns `cpu_s` seconds of this thread's CPU time (measured, not slept).
    fn burn(cpu_s: f64) {
        let own = || {
            let text = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            stat_cpu_s(&text).unwrap().1
        };
        let until = own() + cpu_s;
        let mut x = 0u64;
        while own() < until {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
        }
    }

    #[test]
    fn model_threads_are_counted_and_others_are_not() {
        let before = CpuSample::now().expect("/proc is readable on Linux");
        on_named_thread("model-test", || burn(0.2));
        // The model thread has exited: its time stays in the process total only.
        let delta = CpuSample::now().unwrap().since(&before);
        assert!(delta.process_s >= 0.2, "{delta:?}");
        assert_eq!(delta.model_s, 0.0);

        // A live model thread is counted; another thread is not.
        let before = CpuSample::now().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("model-live".into())
            .spawn(move || {
                burn(0.2);
                done_tx.send(()).unwrap();
                let _ = release_rx.recv();
            })
            .unwrap();
        std::thread::Builder::new()
            .name("other".into())
            .spawn(|| burn(0.2))
            .unwrap()
            .join()
            .unwrap();
        done_rx.recv().unwrap();
        let delta = CpuSample::now().unwrap().since(&before);
        release_tx.send(()).unwrap();
        handle.join().unwrap();
        assert!((0.2..0.3).contains(&delta.model_s), "{delta:?}");
        assert_eq!(delta.groups.get("model-live"), Some(&delta.model_s));
        assert!(delta.process_s >= 0.4, "{delta:?}");
    }
}
