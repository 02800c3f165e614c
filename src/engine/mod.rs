//! The inference engine: the ONNX Runtime environment, execution providers, sessions built from
//! bundle files, and the [`batcher`] that feeds them. [`OnnxModel`] stacks same-shaped f32/i64
//! items into one batch and returns one f32 output; [`tensor::Graph`] runs a session by name
//! with several outputs and f16 conversion at its boundary, and [`kv`] keeps a decoder's KV
//! cache batched across sequences.
//!
//! A session is owned by exactly one model thread (its batcher's), so `Session::run`'s `&mut`
//! needs no lock; agents only ever see [`OnnxModel`] through a [`batcher::Batcher`].

pub mod batcher;
pub mod kv;
pub mod tensor;

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

impl EngineOptions {
    /// The options the `models.*` settings ask for.
    pub fn from_settings(models: &crate::config::ModelSettings) -> anyhow::Result<EngineOptions> {
        Ok(EngineOptions {
            device: Device::parse(&models.device)?,
            fallback_to_cpu: models.fallback_to_cpu,
            intra_threads: models.intra_threads,
            ort_library: models.ort_library.clone(),
        })
    }
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
/// The session is built on a thread named `model-{file stem}` (for a `model.onnx`, the name of
/// its folder, as in the diffusers / optimum layout `unet/model.onnx`), so ONNX Runtime's pool
/// threads carry that name (in `top -H`, and for `bench`'s CPU accounting, see
/// [`crate::cputime`]).
pub fn load_session(path: &Path, options: &EngineOptions) -> anyhow::Result<Session> {
    // The environment (and any thread of its own) first, outside the model's name.
    let env = environment(options)?;
    let name = |p: &Path| p.file_stem().and_then(|s| s.to_str()).map(str::to_string);
    let stem = match name(path).as_deref() {
        Some("model") => path.parent().and_then(name),
        _ => name(path),
    }
    .unwrap_or_else(|| "session".to_string());
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
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn element(&self) -> &'static str {
        match self {
            TensorData::F32(_) => "f32",
            TensorData::I64(_) => "i64",
            TensorData::I32(_) => "i32",
        }
    }
}

/// An input the model declares: name and per-item shape (without the batch dimension).
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: String,
    pub item_shape: Vec<i64>,
}

/// The element type and declared shape of a session input or output (`-1` = dynamic).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub element: ort::value::TensorElementType,
    pub shape: Vec<i64>,
}

fn tensor_info(name: &str, dtype: &ValueType) -> Option<TensorInfo> {
    match dtype {
        ValueType::Tensor { ty, shape, .. } => Some(TensorInfo {
            name: name.to_string(),
            element: *ty,
            shape: shape.iter().copied().collect(),
        }),
        _ => None,
    }
}

/// The tensor inputs a session declares, in order (for checking an export's layout and
/// detecting its variant before serving it).
pub fn inputs_of(session: &Session) -> Vec<TensorInfo> {
    session
        .inputs()
        .iter()
        .filter_map(|i| tensor_info(i.name(), i.dtype()))
        .collect()
}

/// The tensor outputs a session declares, in order.
pub fn outputs_of(session: &Session) -> Vec<TensorInfo> {
    session
        .outputs()
        .iter()
        .filter_map(|o| tensor_info(o.name(), o.dtype()))
        .collect()
}

/// A model session behind a batcher: stacks per-item tensors into one batch, runs the
/// session, and splits the first named output back into per-item `Vec<f32>`s.
///
/// By default an item is one row of the batch. An item may instead be several rows
/// ([`OnnxModel::with_rows_per_item`], e.g. the two branches of classifier-free guidance, which
/// must stay together), and an input may be given once per call rather than per row
/// ([`OnnxModel::with_shared_input`], e.g. a scalar timestep): items whose shared inputs differ
/// then run in separate session calls of one batch.
pub struct OnnxModel {
    session: Session,
    inputs: Vec<InputSpec>,
    output: String,
    /// Whether the first input's batch dimension is dynamic.
    pub dynamic_batch: bool,
    rows_per_item: usize,
    /// By input: given once per call (not stacked along the batch).
    shared: Vec<bool>,
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
        let shared = vec![false; inputs.len()];
        Ok(OnnxModel {
            session,
            inputs,
            output: output.to_string(),
            dynamic_batch,
            rows_per_item: 1,
            shared,
        })
    }

    /// Each item carries `rows` consecutive rows of the batch in every stacked input (its data
    /// is `rows` × the input's item shape) and gets `rows` rows of the output back.
    pub fn with_rows_per_item(mut self, rows: usize) -> OnnxModel {
        self.rows_per_item = rows.max(1);
        self
    }

    /// Input `name` is given once per session call, with exactly its `item_shape` (e.g. `[]`
    /// for a scalar), instead of stacked along the batch. Every item still carries its value;
    /// items with different values are run in separate calls.
    pub fn with_shared_input(mut self, name: &str) -> anyhow::Result<OnnxModel> {
        let Some(j) = self.inputs.iter().position(|i| i.name == name) else {
            bail!("no input {name:?} to share");
        };
        self.shared[j] = true;
        Ok(self)
    }

    /// Runs one batch: `items[i][j]` is input `j` of item `i`.
    pub fn run_batch(&mut self, items: &[Vec<TensorData>]) -> anyhow::Result<Vec<Vec<f32>>> {
        for item in items {
            if item.len() != self.inputs.len() {
                bail!(
                    "a batch item has {} inputs, the model takes {}",
                    item.len(),
                    self.inputs.len()
                );
            }
        }
        if !self.shared.contains(&true) {
            return self.run_call(&items.iter().collect::<Vec<_>>());
        }
        // Groups of items with equal shared inputs, in order of first appearance.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let same = |g: &&mut Vec<usize>| {
                let first = &items[g[0]];
                (0..item.len()).all(|j| !self.shared[j] || first[j] == item[j])
            };
            match groups.iter_mut().find(same) {
                Some(group) => group.push(i),
                None => groups.push(vec![i]),
            }
        }
        let mut outputs = vec![Vec::new(); items.len()];
        for group in groups {
            let call: Vec<&Vec<TensorData>> = group.iter().map(|&i| &items[i]).collect();
            for (i, output) in group.into_iter().zip(self.run_call(&call)?) {
                outputs[i] = output;
            }
        }
        Ok(outputs)
    }

    /// One session call on `items`.
    fn run_call(&mut self, items: &[&Vec<TensorData>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let n = items.len();
        let rows = n * self.rows_per_item;
        let mut values: Vec<(String, ort::value::DynValue)> = Vec::with_capacity(self.inputs.len());
        for (j, spec) in self.inputs.iter().enumerate() {
            let per_row: usize = spec.item_shape.iter().product::<i64>().max(0) as usize;
            let (shape, per_item, count) = if self.shared[j] {
                (spec.item_shape.clone(), per_row, 1)
            } else {
                let mut shape = vec![rows as i64];
                shape.extend(&spec.item_shape);
                (shape, per_row * self.rows_per_item, n)
            };
            let Some(first) = items.first().map(|item| &item[j]) else {
                bail!("an empty batch");
            };
            let wrong = |item: &TensorData| {
                anyhow::anyhow!(
                    "batch item has {} {} values for {}, expected {per_item} {}",
                    item.len(),
                    item.element(),
                    spec.name,
                    first.element()
                )
            };
            macro_rules! stack {
                ($variant:ident) => {{
                    let mut data = Vec::with_capacity(count * per_item);
                    for item in &items[..count] {
                        match &item[j] {
                            TensorData::$variant(v) if v.len() == per_item => {
                                data.extend_from_slice(v)
                            }
                            other => return Err(wrong(other)),
                        }
                    }
                    Tensor::from_array((shape, data))?.into_dyn()
                }};
            }
            let value = match first {
                TensorData::F32(_) => stack!(F32),
                TensorData::I64(_) => stack!(I64),
                TensorData::I32(_) => stack!(I32),
            };
            values.push((spec.name.clone(), value));
        }
        let outputs = self.session.run(values)?;
        let (shape, data) = outputs[self.output.as_str()].try_extract_tensor::<f32>()?;
        let per_item = data.len().checked_div(n).unwrap_or(0);
        if shape.first() != Some(&(rows as i64)) || per_item * n != data.len() {
            bail!(
                "output {} has shape {shape:?} for a batch of {rows} rows",
                self.output
            );
        }
        Ok(data.chunks(per_item.max(1)).map(<[f32]>::to_vec).collect())
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
    fn run(&mut self, inputs: Vec<Vec<TensorData>>) -> Result<Vec<Vec<f32>>, String> {
        if self.dynamic_batch || inputs.len() <= 1 {
            return self.run_batch(&inputs).map_err(|e| format!("{e:#}"));
        }
        // A model with a fixed batch dimension of 1 is still served, one item per call.
        let mut out = Vec::with_capacity(inputs.len());
        for item in inputs {
            let mut one = self
                .run_batch(std::slice::from_ref(&item))
                .map_err(|e| format!("{e:#}"))?;
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
