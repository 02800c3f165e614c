//! At exit the model threads end and free their sessions before the process does (a CUDA
//! session freed while ONNX Runtime tears itself down can crash the process). Its own test
//! binary: it counts every model thread of the process.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{cpu_engine, thread_names};
use retoucher::agents::Agents;
use retoucher::bundle::Bundle;
use retoucher::engine::batcher::{join_model_threads, NoObserver};

fn model_threads() -> Vec<String> {
    thread_names()
        .into_iter()
        .filter(|n| n.starts_with("model-"))
        .collect()
}

#[test]
fn model_threads_and_sessions_end_once_the_runtime_shuts_down() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let options = cpu_engine(2);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/reference");
    let agents = runtime.block_on(async {
        let bundle = Bundle::load(&root).expect("the reference bundle");
        let agents = Agents::load(bundle, &options, &BTreeMap::new(), Arc::new(NoObserver))
            .expect("loading the agents");
        agents.warm_up().await.expect("warm-up");
        agents
    });
    // Batcher threads and the sessions' pool threads, all named model-*.
    assert!(model_threads().len() >= 6, "{:?}", model_threads());
    assert!(
        !join_model_threads(Duration::from_millis(50)),
        "still serving"
    );

    drop(agents);
    runtime.shutdown_timeout(Duration::from_secs(5));
    assert!(join_model_threads(Duration::from_secs(20)));
    // The sessions are gone too: their pools' threads have been joined.
    assert_eq!(model_threads(), Vec::<String>::new());
}
