//! The engine seen from outside, on the reference bundle's real sessions:
//! - ONNX Runtime's pool threads of a session carry its model's name (`model-{file stem}`),
//!   which `bench` relies on to split the process's CPU time between the models and the
//!   worker's own work, and which an operator sees in `top -H`;
//! - the warm-up runs exactly the batch sizes it means to (on a GPU every size, largest first),
//!   each as one batch.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use common::{cpu_engine, thread_names, BatchSizes};
use retoucher::agents::{warm_up_sizes, Agents, ModelRole};
use retoucher::bundle::Bundle;
use retoucher::engine::load_session;

#[test]
fn session_pool_threads_are_named_after_the_model() {
    let options = cpu_engine(3);
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

#[test]
fn warm_up_sizes_are_every_size_largest_first_or_only_the_largest() {
    assert_eq!(warm_up_sizes(4, true), vec![4, 3, 2, 1]);
    assert_eq!(warm_up_sizes(4, false), vec![4]);
    assert_eq!(warm_up_sizes(0, true), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_runs_each_size_as_one_batch() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/reference");
    let bundle = Bundle::load(&root).expect("the reference bundle");
    let options = cpu_engine(1);
    let sizes = Arc::new(BatchSizes::default());
    let agents = Agents::load(bundle, &options, &BTreeMap::new(), sizes.clone()).unwrap();
    let max = agents.perception.served().max_batch_size;
    assert!(max >= 2, "the reference bundle batches perception");
    let classifier = agents.model(ModelRole::Classifier).unwrap().max_batch_size;

    // On the CPU: one full batch per model.
    agents.warm_up().await.unwrap();
    let seen = sizes.take_all();
    assert_eq!(seen["perception"], vec![max], "{seen:?}");
    assert_eq!(seen["classifier"], vec![classifier]);

    // Every size, as on a GPU: each wave is one batch of exactly that size.
    agents.perception.served().warm_up(true).await.unwrap();
    let seen = sizes.take_all();
    assert_eq!(seen["perception"], warm_up_sizes(max, true), "{seen:?}");
}
