//! The inference engine: the ONNX Runtime environment, execution providers, sessions built from
//! bundle files, and the [`batcher`] that feeds them.
//!
//! A session is owned by exactly one model thread (its batcher's), so `Session::run`'s `&mut`
//! needs no lock; agents only ever see [`OnnxModel`] through a [`batcher::Batcher`].

pub mod batcher;
pub mod failure;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context};
use ort::session::Session;
use ort::value::{Tensor, ValueType};

/// Runs CPU-heavy pre- or post-processing (resizing, connected components, compositing) so that
/// it does not stall the async threads that move every other job along: on a multi-threaded
/// runtime the current thread hands its other tasks over while `f` runs.
pub fn cpu_bound<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Where models run (`models.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl Device {
    pub fn parse(text: &str) -> anyhow::Result<Device> {
        match text.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<i32>) {
                Some(Ok(n)) if n >= 0 => Ok(Device::Cuda(n)),
                _ => bail!("models.device must be cpu, cuda or cuda:N, got {other:?}"),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How sessions are created.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: Device,
    pub fallback_to_cpu: bool,
    pub intra_threads: usize,
    /// `models.ort_library`; empty = `ORT_DYLIB_PATH`, then `.tools/ort/`.
    pub ort_library: String,
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Finds libonnxruntime: the setting, `ORT_DYLIB_PATH`, then the project's `.tools/ort/`
/// (next to the working directory or above the executable).
fn ort_library(setting: &str) -> anyhow::Result<PathBuf> {
    if !setting.is_empty() {
        return Ok(PathBuf::from(setting));
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = vec![PathBuf::from(".tools/ort")];
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(
            exe.ancestors()
                .skip(1)
                .take(4)
                .map(|d| d.join(".tools/ort")),
        );
    }
    for dir in candidates {
        let lib = dir.join("libonnxruntime.so.1.31.1");
        if lib.is_file() {
            return Ok(lib);
        }
    }
    bail!(
        "the ONNX Runtime library was not found: run scripts/setup-ort.sh, or point \
         ORT_DYLIB_PATH (or models.ort_library) at libonnxruntime.so"
    )
}

/// Loads ONNX Runtime once per process.
pub fn environment(
    options: &EngineOptions,
) -> anyhow::Result<&'static ort::environment::Environment> {
    let env = ENVIRONMENT.get_or_init(|| {
        let path = ort_library(&options.ort_library).map_err(|e| e.to_string())?;
        if !path.is_file() {
            return Err(format!(
                "the ONNX Runtime library {} does not exist: run scripts/setup-ort.sh or fix \
                 ORT_DYLIB_PATH / models.ort_library",
                path.display()
            ));
        }
        ort::init_from(&path)
            .map_err(|e| format!("loading ONNX Runtime from {}: {e}", path.display()))?
            .with_name("retoucher")
            .build()
            .map_err(|e| format!("creating the ONNX Runtime environment: {e}"))
    });
    env.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Builds a session for one model file on the configured device.
///
/// The session is built on a thread named `model-{file stem}`, so ONNX Runtime's pool threads
/// carry that name (in `top -H`, and for `bench`'s CPU accounting, see [`crate::cputime`]).
pub fn load_session(path: &Path, options: &EngineOptions) -> anyhow::Result<Session> {
    // The environment (and any thread of its own) first, outside the model's name.
    let env = environment(options)?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("session");
    crate::cputime::on_named_thread(&format!("model-{stem}"), || {
        build_session(env, path, options)
    })
}

fn build_session(
    env: &ort::environment::Environment,
    path: &Path,
    options: &EngineOptions,
) -> anyhow::Result<Session> {
    let mut builder = Session::builder(env)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Level3)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // A spinning intra-op pool burns whole cores waiting for the next call; in a worker those
    // cores decode, resize and encode other jobs' images, so threads sleep when idle.
    builder = builder
        .with_intra_op_spinning(false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let threads = match (options.intra_threads, options.device) {
        (0, Device::Cpu) => 0,
        // On a GPU only shape and glue ops run on the CPU: a few threads are plenty.
        (0, Device::Cuda(_)) => 2,
        (n, _) => n,
    };
    if threads > 0 {
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let Device::Cuda(id) = options.device {
        builder = with_cuda(builder, id, options.fallback_to_cpu)?;
    }
    builder
        .commit_from_file(path)
        .with_context(|| format!("loading model {}", path.display()))
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    id: i32,
    fallback_to_cpu: bool,
) -> anyhow::Result<ort::session::builder::SessionBuilder> {
    // Dynamic batching feeds many batch sizes: an exhaustive cuDNN search per new input shape
    // would stall the first batches of every size for hundreds of milliseconds.
    let ep = ort::ep::CUDA::default()
        .with_device_id(id)
        .with_conv_algorithm_search(ort::ep::cuda::ConvAlgorithmSearch::Heuristic)
        .build();
    // Without error_on_failure a failed registration silently runs on the CPU.
    let ep = if fallback_to_cpu {
        ep
    } else {
        ep.error_on_failure()
    };
    builder.with_execution_providers([ep]).map_err(|e| {
        anyhow::anyhow!(
            "registering the CUDA execution provider on device {id} failed: {e} \
             (check the CUDA 13 / cuDNN 9 libraries and the onnxruntime-gpu build, or set \
             models.fallback_to_cpu = true)"
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    id: i32,
    fallback_to_cpu: bool,
) -> anyhow::Result<ort::session::builder::SessionBuilder> {
    if fallback_to_cpu {
        tracing::warn!(
            device = id,
            "built without the cuda feature: running on the CPU"
        );
        return Ok(builder);
    }
    bail!(
        "models.device is cuda:{id}, but this binary was built without the `cuda` feature \
         (rebuild with --features cuda, or set models.device = \"cpu\")"
    )
}

/// One tensor of one batch item.
#[derive(Debug, Clone)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// An input the model declares: name and per-item shape (without the batch dimension).
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: String,
    pub item_shape: Vec<i64>,
}

/// A model session behind a batcher: stacks per-item tensors into one batch, runs the
/// session, and splits the first named output back into per-item `Vec<f32>`s.
pub struct OnnxModel {
    session: Session,
    inputs: Vec<InputSpec>,
    output: String,
    /// Whether the first input's batch dimension is dynamic.
    pub dynamic_batch: bool,
}

impl OnnxModel {
    /// Wraps a session; checks that every expected input and the output exist.
    pub fn new(
        session: Session,
        inputs: Vec<InputSpec>,
        output: &str,
        model: &str,
    ) -> anyhow::Result<OnnxModel> {
        for spec in &inputs {
            if !session.inputs().iter().any(|i| i.name() == spec.name) {
                let have: Vec<_> = session.inputs().iter().map(|i| i.name()).collect();
                bail!(
                    "model {model} has no input {:?} (it has {have:?})",
                    spec.name
                );
            }
        }
        if !session.outputs().iter().any(|o| o.name() == output) {
            let have: Vec<_> = session.outputs().iter().map(|o| o.name()).collect();
            bail!("model {model} has no output {output:?} (it has {have:?})");
        }
        let dynamic_batch = session
            .inputs()
            .iter()
            .find(|i| i.name() == inputs[0].name)
            .map(|i| match i.dtype() {
                ValueType::Tensor { shape, .. } => shape.first().is_none_or(|d| *d < 0),
                _ => true,
            })
            .unwrap_or(true);
        Ok(OnnxModel {
            session,
            inputs,
            output: output.to_string(),
            dynamic_batch,
        })
    }

    /// Runs one batch: `items[i][j]` is input `j` of item `i`.
    pub fn run_batch(&mut self, items: &[Vec<TensorData>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let n = items.len();
        let mut values: Vec<(String, ort::value::DynValue)> = Vec::with_capacity(self.inputs.len());
        for (j, spec) in self.inputs.iter().enumerate() {
            let mut shape = vec![n as i64];
            shape.extend(&spec.item_shape);
            let per_item: usize = spec.item_shape.iter().product::<i64>() as usize;
            let value = match items.first().map(|item| &item[j]) {
                Some(TensorData::I64(_)) => {
                    let mut data = Vec::with_capacity(n * per_item);
                    for item in items {
                        match &item[j] {
                            TensorData::I64(v) if v.len() == per_item => data.extend_from_slice(v),
                            _ => bail!("batch item has the wrong type or size for {}", spec.name),
                        }
                    }
                    Tensor::from_array((shape, data))?.into_dyn()
                }
                _ => {
                    let mut data = Vec::with_capacity(n * per_item);
                    for item in items {
                        match &item[j] {
                            TensorData::F32(v) if v.len() == per_item => data.extend_from_slice(v),
                            _ => bail!("batch item has the wrong type or size for {}", spec.name),
                        }
                    }
                    Tensor::from_array((shape, data))?.into_dyn()
                }
            };
            values.push((spec.name.clone(), value));
        }
        let outputs = self.session.run(values)?;
        let (shape, data) = outputs[self.output.as_str()].try_extract_tensor::<f32>()?;
        let per_item = data.len().checked_div(n).unwrap_or(0);
        if shape.first() != Some(&(n as i64)) || per_item * n != data.len() {
            bail!(
                "output {} has shape {shape:?} for a batch of {n}",
                self.output
            );
        }
        Ok(data.chunks(per_item).map(<[f32]>::to_vec).collect())
    }

    /// The output's shape per item (without the batch dimension), as declared by the model.
    pub fn output_item_shape(&self) -> Vec<i64> {
        self.session
            .outputs()
            .iter()
            .find(|o| o.name() == self.output)
            .and_then(|o| match o.dtype() {
                ValueType::Tensor { shape, .. } => Some(shape.iter().skip(1).copied().collect()),
                _ => None,
            })
            .unwrap_or_default()
    }
}

impl batcher::BatchModel for OnnxModel {
    type Input = Vec<TensorData>;
    type Output = Vec<f32>;
    fn run(&mut self, inputs: &[Vec<TensorData>]) -> Result<Vec<Vec<f32>>, failure::ModelFailure> {
        if self.dynamic_batch || inputs.len() <= 1 {
            return self
                .run_batch(inputs)
                .map_err(|e| failure::ModelFailure::of(&e));
        }
        // A model with a fixed batch dimension of 1 is still served, one item per call.
        let mut out = Vec::with_capacity(inputs.len());
        for item in inputs {
            let mut one = self
                .run_batch(std::slice::from_ref(item))
                .map_err(|e| failure::ModelFailure::of(&e))?;
            out.push(one.pop().unwrap_or_default());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        assert!(Device::parse("cuda:-1").is_err());
        assert!(Device::parse("gpu").is_err());
    }
}
