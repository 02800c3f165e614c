//! ONNX Runtime's pool threads of a session carry its model's name (`model-{file stem}`), which
//! `bench` relies on to split the process's CPU time between the models and the worker's own
//! work, and which an operator sees in `top -H`.

use std::path::Path;

use retoucher::engine::{load_session, Device, EngineOptions};

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn session_pool_threads_are_named_after_the_model() {
    let options = EngineOptions {
        device: Device::Cpu,
        fallback_to_cpu: false,
        intra_threads: 3,
        ort_library: String::new(),
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/reference/classifier.onnx");
    let before = thread_names()
        .iter()
        .filter(|n| n.starts_with("model-"))
        .count();
    let session = load_session(&path, &options).expect("loading the reference classifier");
    let named = thread_names()
        .into_iter()
        .filter(|n| n == "model-classifie") // Linux keeps 15 bytes of a thread's name
        .count();
    // Three intra-op threads: the caller's and two in ONNX Runtime's pool.
    assert!(
        named >= 2,
        "model threads before {before}, now {:?}",
        thread_names()
    );
    drop(session);
}
