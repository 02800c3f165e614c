//! The inference engine: the ONNX Runtime environment, execution providers, sessions built from
//! bundle files, and the [`batcher`] that feeds them. [`OnnxModel`] stacks same-shaped f32/i64
//! items into one batch and returns one f32 output; [`tensor::Graph`] runs a session by name
//! with several outputs and f16 conversion at its boundary, and [`kv`] keeps a decoder's KV
//! cache batched across sequences.
//!
//! A session is owned by exactly one model thread (its batcher's), so `Session::run`'s `&mut`
//! needs no lock; agents only ever see [`OnnxModel`] through a [`batcher::Batcher`].

pub mod batcher;
pub(crate) mod failure;
pub mod kv;
pub mod staging;
pub mod tensor;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context};
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use staging::{Feed, IoPlan, Staging};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
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
                _ if other.starts_with("cuda:") || other.contains(',') => bail!(
                    "models.device must be cpu, cuda or cuda:N, got {other:?}: a worker drives one \
                     GPU; run one worker per GPU (deploy/README.md, \"Several GPUs in one machine\")"
                ),
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
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub device: Device,
    pub fallback_to_cpu: bool,
    pub intra_threads: usize,
    /// `models.ort_library`; empty = `ORT_DYLIB_PATH`, then `.tools/ort/`.
    pub ort_library: String,
    /// `models.io_binding`: how batches reach the sessions (see [`staging`]).
    pub io: staging::IoMode,
    /// `models.cudnn_conv_search` and `models.cudnn_max_workspace` (CUDA only).
    pub cudnn: Cudnn,
}

/// cuDNN's convolution settings for the CUDA provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cudnn {
    /// How a convolution algorithm is chosen for each new input shape.
    pub conv_search: ConvSearch,
    /// Let cuDNN use as much workspace as the fastest algorithm wants (ONNX Runtime's default).
    pub max_workspace: bool,
}

impl Default for Cudnn {
    fn default() -> Cudnn {
        Cudnn {
            conv_search: ConvSearch::Heuristic,
            max_workspace: true,
        }
    }
}

/// `models.cudnn_conv_search`. Dynamic batching feeds many batch sizes, and `exhaustive`
/// benchmarks every algorithm at each new input shape: hundreds of milliseconds on the first
/// batch of every size (paid in the warm-up on a GPU, which runs every size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvSearch {
    Heuristic,
    Exhaustive,
    /// cuDNN's default algorithm, no search at all.
    Default,
}

impl ConvSearch {
    pub fn parse(text: &str) -> anyhow::Result<ConvSearch> {
        match text.trim() {
            "heuristic" => Ok(ConvSearch::Heuristic),
            "exhaustive" => Ok(ConvSearch::Exhaustive),
            "default" => Ok(ConvSearch::Default),
            other => bail!(
                "models.cudnn_conv_search must be heuristic, exhaustive or default, got {other:?}"
            ),
        }
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
        builder = with_cuda(builder, id, options)?;
    }
    builder
        .commit_from_file(path)
        .with_context(|| format!("loading model {}", path.display()))
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    id: i32,
    options: &EngineOptions,
) -> anyhow::Result<ort::session::builder::SessionBuilder> {
    use ort::ep::cuda::ConvAlgorithmSearch;
    let search = match options.cudnn.conv_search {
        ConvSearch::Heuristic => ConvAlgorithmSearch::Heuristic,
        ConvSearch::Exhaustive => ConvAlgorithmSearch::Exhaustive,
        ConvSearch::Default => ConvAlgorithmSearch::Default,
    };
    // ONNX Runtime's own CUDA graphs (`enable_cuda_graph`) are not used: they replay one
    // captured shape at fixed bound addresses, and dynamic batching runs every batch size.
    let ep = ort::ep::CUDA::default()
        .with_device_id(id)
        .with_conv_algorithm_search(search)
        .with_conv_max_workspace(options.cudnn.max_workspace)
        .build();
    // Without error_on_failure a failed registration silently runs on the CPU.
    let ep = if options.fallback_to_cpu {
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
    options: &EngineOptions,
) -> anyhow::Result<ort::session::builder::SessionBuilder> {
    if options.fallback_to_cpu {
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

    /// The element type, named as ONNX Runtime names it (`f32`, `i64`, `i32`).
    pub fn element(&self) -> &'static str {
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

/// A tensor as a model file declares it: name, element type (`f32`, `i64`, …) and shape, `-1`
/// for a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub name: String,
    pub element: String,
    pub shape: Vec<i64>,
}

impl Declared {
    fn of(name: &str, dtype: &ValueType) -> Declared {
        let (element, shape) = match dtype {
            ValueType::Tensor { ty, shape, .. } => {
                (ty.to_string(), shape.iter().copied().collect())
            }
            other => (other.to_string(), Vec::new()),
        };
        Declared {
            name: name.to_string(),
            element,
            shape,
        }
    }
}

/// What a model file declares next to what its agent feeds it and reads back, so the two can be
/// compared before the first call ([`Signature::problems`]).
#[derive(Debug, Clone)]
pub struct Signature {
    /// The model file, for messages.
    pub model: String,
    pub declared_inputs: Vec<Declared>,
    pub fed: Vec<InputSpec>,
    /// By fed input: given once per call with exactly its item shape, not stacked along the
    /// batch (so declared without a batch dimension).
    pub shared: Vec<bool>,
    /// Batch rows each item carries (its output is this many rows too).
    pub rows_per_item: usize,
    pub output: Declared,
}

impl Signature {
    /// Every way the model's declared inputs and output disagree with what the agent feeds and
    /// reads: `probe` is a request of the agent's (the element types it feeds), `output_len` the
    /// values per item it reads. Empty when they agree.
    pub fn problems(&self, probe: &[TensorData], output_len: usize) -> Vec<String> {
        let mut problems = Vec::new();
        let show = |shape: &[i64]| {
            let dims: Vec<String> = shape
                .iter()
                .map(|&d| {
                    if d < 0 {
                        "?".to_string()
                    } else {
                        d.to_string()
                    }
                })
                .collect();
            format!("[{}]", dims.join(", "))
        };
        for (j, spec) in self.fed.iter().enumerate() {
            let Some(declared) = self.declared_inputs.iter().find(|d| d.name == spec.name) else {
                problems.push(format!("has no input {:?}", spec.name));
                continue;
            };
            let shared = self.shared.get(j).copied().unwrap_or(false);
            let (fed_shape, per_item) = if shared {
                (show(&spec.item_shape), &declared.shape[..])
            } else {
                let mut batched = vec![-1];
                batched.extend(&spec.item_shape);
                (
                    show(&batched).replacen('?', "N", 1),
                    declared.shape.get(1..).unwrap_or_default(),
                )
            };
            let rank = spec.item_shape.len() + usize::from(!shared);
            if declared.shape.len() != rank {
                problems.push(format!(
                    "input {:?} has rank {} {}, the agent feeds rank {rank} {fed_shape}",
                    spec.name,
                    declared.shape.len(),
                    show(&declared.shape),
                ));
            } else if per_item
                .iter()
                .zip(&spec.item_shape)
                .any(|(&have, &want)| have >= 0 && have != want)
            {
                problems.push(format!(
                    "input {:?} has shape {}, the agent feeds {fed_shape}",
                    spec.name,
                    show(&declared.shape)
                ));
            }
            if let Some(item) = probe.get(j) {
                // f32 items feed f16 inputs too (converted as they are staged).
                let widened = item.element() == "f32" && declared.element == "f16";
                if item.element() != declared.element && !widened {
                    problems.push(format!(
                        "input {:?} is {}, the agent feeds {}",
                        spec.name,
                        declared.element,
                        item.element()
                    ));
                }
            }
        }
        for declared in &self.declared_inputs {
            if !self.fed.iter().any(|s| s.name == declared.name) {
                let fed: Vec<&str> = self.fed.iter().map(|s| s.name.as_str()).collect();
                problems.push(format!(
                    "needs input {:?}, which the agent does not feed (it feeds {fed:?})",
                    declared.name
                ));
            }
        }
        let output = &self.output;
        if output.element != "f32" && output.element != "f16" {
            problems.push(format!(
                "output {:?} is {}, the agent reads f32 (or f16, widened)",
                output.name, output.element
            ));
        }
        match output.shape.split_first() {
            None => problems.push(format!(
                "output {:?} has no batch dimension ({})",
                output.name,
                show(&output.shape)
            )),
            Some((_, row)) if row.iter().all(|&d| d >= 0) => {
                let values = row.iter().product::<i64>() * self.rows_per_item as i64;
                if values != output_len as i64 {
                    problems.push(format!(
                        "output {:?} has shape {}: {values} values per item, the agent expects \
                         {output_len}",
                        output.name,
                        show(&output.shape)
                    ));
                }
            }
            Some(_) => {}
        }
        problems
            .into_iter()
            .map(|p| format!("model {} {p}", self.model))
            .collect()
    }
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
    /// The model file, for messages.
    model: String,
    /// Whether the first input's batch dimension is dynamic.
    pub dynamic_batch: bool,
    rows_per_item: usize,
    /// By input: given once per call (not stacked along the batch).
    shared: Vec<bool>,
    /// By input: the element type the session declares (f32 items feed f16 inputs too).
    declared: Vec<TensorElementType>,
    /// The reusable buffers batches are packed into, and how they reach the session.
    staging: Staging,
}

impl OnnxModel {
    /// Wraps a session; checks that every expected input and the output exist (naming every
    /// one that does not).
    pub fn new(
        session: Session,
        inputs: Vec<InputSpec>,
        output: &str,
        model: &str,
    ) -> anyhow::Result<OnnxModel> {
        let mut missing = Vec::new();
        let have_inputs: Vec<_> = session.inputs().iter().map(|i| i.name()).collect();
        for spec in &inputs {
            if !have_inputs.contains(&spec.name.as_str()) {
                missing.push(format!("no input {:?} (it has {have_inputs:?})", spec.name));
            }
        }
        if !session.outputs().iter().any(|o| o.name() == output) {
            let have: Vec<_> = session.outputs().iter().map(|o| o.name()).collect();
            missing.push(format!("no output {output:?} (it has {have:?})"));
        }
        if !missing.is_empty() {
            bail!("model {model} has {}", missing.join("; "));
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
        let declared = inputs
            .iter()
            .map(|spec| {
                let input = session.inputs().iter().find(|i| i.name() == spec.name);
                match input.map(|i| i.dtype()) {
                    Some(ValueType::Tensor { ty, .. }) => Ok(*ty),
                    _ => Err(anyhow::anyhow!(
                        "model {model} input {:?} is not a tensor",
                        spec.name
                    )),
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let staging = Staging::new(IoPlan::default(), inputs.len());
        Ok(OnnxModel {
            session,
            inputs,
            output: output.to_string(),
            model: model.to_string(),
            dynamic_batch,
            rows_per_item: 1,
            shared,
            declared,
            staging,
        })
    }

    /// Stages batches as `plan` says (pinned buffers and IO binding on CUDA; see
    /// [`staging`]). The default is host buffers and plain runs.
    pub fn with_io(mut self, plan: IoPlan) -> OnnxModel {
        self.staging = Staging::new(plan, self.inputs.len());
        self
    }

    /// How this model's batches reach its session.
    pub fn io_plan(&self) -> IoPlan {
        self.staging.plan()
    }

    /// Host bytes held by its staging buffers, and whether they are pinned: after the first
    /// call at the largest batch they stop growing (no allocation per call).
    pub fn staging_bytes(&self) -> (usize, bool) {
        (self.staging.held_bytes(), self.staging.is_pinned())
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

    /// What the model declares and what it is fed (see [`Signature::problems`]).
    pub fn signature(&self) -> Signature {
        let output = self
            .session
            .outputs()
            .iter()
            .find(|o| o.name() == self.output)
            .map(|o| Declared::of(o.name(), o.dtype()))
            .unwrap_or_else(|| Declared {
                name: self.output.clone(),
                element: String::new(),
                shape: Vec::new(),
            });
        Signature {
            model: self.model.clone(),
            declared_inputs: self
                .session
                .inputs()
                .iter()
                .map(|i| Declared::of(i.name(), i.dtype()))
                .collect(),
            fed: self.inputs.clone(),
            shared: self.shared.clone(),
            rows_per_item: self.rows_per_item,
            output,
        }
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

    /// One session call on `items`: each input packed into its staging buffer (one copy,
    /// converted to the declared element type), the session run on views of them, the output
    /// split per item.
    fn run_call(&mut self, items: &[&Vec<TensorData>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let n = items.len();
        let rows = n * self.rows_per_item;
        let Some(first) = items.first() else {
            bail!("an empty batch");
        };
        let mut calls: Vec<(&str, Feed, Vec<i64>)> = Vec::with_capacity(self.inputs.len());
        for (j, spec) in self.inputs.iter().enumerate() {
            let per_row: usize = spec.item_shape.iter().product::<i64>().max(0) as usize;
            let (shape, per_item, count) = if self.shared[j] {
                (spec.item_shape.clone(), per_row, 1)
            } else {
                let mut shape = vec![rows as i64];
                shape.extend(&spec.item_shape);
                (shape, per_row * self.rows_per_item, n)
            };
            let fed = &first[j];
            let Some(feed) = Feed::of(self.declared[j], fed) else {
                bail!(
                    "input {} is {}, the agent feeds {}",
                    spec.name,
                    self.declared[j],
                    fed.element()
                );
            };
            self.staging
                .fill(
                    &self.session,
                    j,
                    feed,
                    items[..count].iter().map(|item| &item[j]),
                    per_item,
                )
                .with_context(|| format!("input {}", spec.name))?;
            calls.push((spec.name.as_str(), feed, shape));
        }
        let outputs = self.staging.run(&mut self.session, &calls, &self.output)?;
        let (shape, per_item) = staging::split_f32(&outputs[self.output.as_str()], n)
            .with_context(|| format!("output {}", self.output))?;
        if shape.first() != Some(&(rows as i64)) {
            bail!(
                "output {} has shape {shape:?} for a batch of {rows} rows",
                self.output
            );
        }
        Ok(per_item)
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

    fn declared(name: &str, element: &str, shape: &[i64]) -> Declared {
        Declared {
            name: name.into(),
            element: element.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn a_signature_names_every_way_a_model_breaks_its_contract() {
        let fed = |name: &str, item_shape: &[i64]| InputSpec {
            name: name.into(),
            item_shape: item_shape.to_vec(),
        };
        let signature = Signature {
            model: "m.onnx".into(),
            declared_inputs: vec![
                declared("pixel_values", "f32", &[-1, 3, 224, 224]),
                declared("input_ids", "i32", &[-1, -1]),
                declared("attention_mask", "i64", &[-1]),
                declared("position_ids", "i64", &[-1, -1]),
            ],
            fed: vec![
                fed("pixel_values", &[3, 256, 256]),
                fed("input_ids", &[32]),
                fed("attention_mask", &[32]),
            ],
            shared: vec![false; 3],
            rows_per_item: 1,
            output: declared("saliency", "i64", &[-1, 1, 256, 256]),
        };
        let probe = [
            TensorData::F32(vec![0.0; 3 * 256 * 256]),
            TensorData::I64(vec![0; 32]),
            TensorData::I64(vec![0; 32]),
        ];
        let problems = signature.problems(&probe, 256 * 256 + 1);
        let want = [
            "model m.onnx input \"pixel_values\" has shape [?, 3, 224, 224], the agent feeds [N, 3, 256, 256]",
            "model m.onnx input \"input_ids\" is i32, the agent feeds i64",
            "model m.onnx input \"attention_mask\" has rank 1 [?], the agent feeds rank 2 [N, 32]",
            "model m.onnx needs input \"position_ids\", which the agent does not feed (it feeds [\"pixel_values\", \"input_ids\", \"attention_mask\"])",
            "model m.onnx output \"saliency\" is i64, the agent reads f32 (or f16, widened)",
            "model m.onnx output \"saliency\" has shape [?, 1, 256, 256]: 65536 values per item, the agent expects 65537",
        ];
        assert_eq!(problems, want);

        // What the agents feed and read, declared so: no problem (dynamic dimensions match any).
        let good = Signature {
            declared_inputs: vec![
                declared("pixel_values", "f32", &[-1, 3, 256, 256]),
                declared("input_ids", "i64", &[-1, -1]),
                declared("attention_mask", "i64", &[-1, -1]),
            ],
            output: declared("saliency", "f32", &[-1, 1, -1, -1]),
            ..signature
        };
        assert_eq!(good.problems(&probe, 7), Vec::<String>::new());
        // An fp16 export keeping f16 at its edges: f32 items are converted as they are staged,
        // the f16 output widened.
        let half = Signature {
            declared_inputs: vec![
                declared("pixel_values", "f16", &[-1, 3, 256, 256]),
                declared("input_ids", "i64", &[-1, -1]),
                declared("attention_mask", "i64", &[-1, -1]),
            ],
            output: declared("saliency", "f16", &[-1, 1, -1, -1]),
            ..good.clone()
        };
        assert_eq!(half.problems(&probe, 7), Vec::<String>::new());

        // An input given once per call is declared without a batch dimension; items of two rows
        // read two rows of output each.
        let paired = Signature {
            model: "unet.onnx".into(),
            declared_inputs: vec![
                declared("sample", "f32", &[-1, 9, 8, 8]),
                declared("timestep", "i64", &[]),
            ],
            fed: vec![fed("sample", &[9, 8, 8]), fed("timestep", &[])],
            shared: vec![false, true],
            rows_per_item: 2,
            output: declared("out_sample", "f32", &[-1, 4, 8, 8]),
        };
        let probe = [
            TensorData::F32(vec![0.0; 2 * 9 * 64]),
            TensorData::I64(vec![0]),
        ];
        assert_eq!(paired.problems(&probe, 2 * 4 * 64), Vec::<String>::new());
        assert_eq!(
            paired.problems(&probe, 4 * 64),
            ["model unet.onnx output \"out_sample\" has shape [?, 4, 8, 8]: 512 values per item, \
              the agent expects 256"]
        );
        let batched_timestep = Signature {
            declared_inputs: vec![
                declared("sample", "f32", &[-1, 9, 8, 8]),
                declared("timestep", "i64", &[-1]),
            ],
            ..paired
        };
        assert_eq!(
            batched_timestep.problems(&probe, 2 * 4 * 64),
            ["model unet.onnx input \"timestep\" has rank 1 [?], the agent feeds rank 0 []"]
        );
    }

    #[test]
    fn devices_parse() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        assert!(Device::parse("cuda:-1").is_err());
        assert!(Device::parse("gpu").is_err());
        let all = Device::parse("cuda:all").unwrap_err().to_string();
        assert!(all.contains("one worker per GPU"), "{all}");
        assert!(Device::parse("cuda:0,1").is_err());
    }
}
