//! IO staging: the host memory a batch is packed into before a session call, reused from call
//! to call, and the way it reaches the session (a plain run or an [`IoBinding`]).
//!
//! Every input of an [`super::OnnxModel`] has one buffer that grows to the largest batch seen
//! (the warm-up's full batch) and is then reused: packing a batch is one copy of each item into
//! it, converted to f16 on the way where the model declares f16, and the session reads a view
//! of it. On CUDA the buffers are pinned (page-locked, from ONNX Runtime's `CudaPinned`
//! allocator), so the host→device copy is a DMA that the runtime starts when the input is
//! bound, and the call runs through an [`IoBinding`] whose output is bound to pinned memory:
//! one copy in, one copy out, no allocation of ours on the hot path. On the CPU the session
//! reads the buffer in place with a plain run, unless `models.io_binding = "bind"` asks for the
//! binding path (which then binds an owned copy of each input: a borrowed buffer on the
//! session's own device is one that ort would clone anyway), which the tests use to check that
//! both paths give bit-identical outputs.

use std::ffi::c_void;

use anyhow::{bail, Context};
use half::f16;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, SessionInputValue, SessionOutputs};
use ort::value::{DynTensor, Shape, Tensor, TensorElementType, TensorRefMut};

use super::{Device, TensorData};

/// How a model's batches reach its session (`models.io_binding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// An [`IoBinding`] with pinned buffers on CUDA, a plain run on the CPU.
    #[default]
    Auto,
    /// Always an [`IoBinding`] (on the CPU ort copies each borrowed input once more).
    Bind,
    /// Always a plain run over the staging buffers (pinned on CUDA all the same).
    Run,
}

impl IoMode {
    pub fn parse(text: &str) -> anyhow::Result<IoMode> {
        match text.trim() {
            "auto" => Ok(IoMode::Auto),
            "bind" => Ok(IoMode::Bind),
            "run" => Ok(IoMode::Run),
            other => bail!("models.io_binding must be auto, bind or run, got {other:?}"),
        }
    }
}

/// Where a model's staging buffers live and how its calls are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoPlan {
    pub mode: IoMode,
    pub device: Device,
}

impl IoPlan {
    fn binds(&self) -> bool {
        match self.mode {
            IoMode::Bind => true,
            IoMode::Run => false,
            IoMode::Auto => matches!(self.device, Device::Cuda(_)),
        }
    }
}

/// The element type a session input is fed in: what the model declares, which may differ
/// from what the agent hands over only by f32 → f16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feed {
    F32,
    F16,
    I64,
    I32,
}

impl Feed {
    /// How items of `fed`'s kind are fed to an input declared as `declared`.
    pub(crate) fn of(declared: TensorElementType, fed: &TensorData) -> Option<Feed> {
        match (declared, fed) {
            (TensorElementType::Float32, TensorData::F32(_)) => Some(Feed::F32),
            (TensorElementType::Float16, TensorData::F32(_)) => Some(Feed::F16),
            (TensorElementType::Int64, TensorData::I64(_)) => Some(Feed::I64),
            (TensorElementType::Int32, TensorData::I32(_)) => Some(Feed::I32),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            Feed::F32 | Feed::I32 => 4,
            Feed::F16 => 2,
            Feed::I64 => 8,
        }
    }
}

/// One input's buffer.
enum Memory {
    /// Ordinary host memory (8-byte aligned, enough for every element type fed).
    Host(Vec<u64>),
    /// Page-locked memory from ONNX Runtime's pinned allocator (freed by [`Staging`]'s drop).
    Pinned { ptr: *mut c_void, bytes: usize },
}

impl Memory {
    fn bytes(&self) -> usize {
        match self {
            Memory::Host(v) => v.len() * 8,
            Memory::Pinned { bytes, .. } => *bytes,
        }
    }

    fn ptr(&mut self) -> *mut c_void {
        match self {
            Memory::Host(v) => v.as_mut_ptr().cast(),
            Memory::Pinned { ptr, .. } => *ptr,
        }
    }
}

/// The reusable buffers, pinned allocator and binding of one model session.
pub(crate) struct Staging {
    plan: IoPlan,
    buffers: Vec<Memory>,
    /// `CudaPinned` allocator, created at the first call on CUDA (`None` on the CPU, or when
    /// the session could not give one: then host memory).
    pinned: Option<Allocator>,
    pinned_tried: bool,
    binding: Option<IoBinding>,
}

// SAFETY: the raw pointers are blocks this staging owns alone; it lives inside a model that one
// thread (its batcher's) uses at a time, and ort's Allocator and IoBinding are Send.
unsafe impl Send for Staging {}

impl Staging {
    pub(crate) fn new(plan: IoPlan, inputs: usize) -> Staging {
        Staging {
            plan,
            buffers: (0..inputs).map(|_| Memory::Host(Vec::new())).collect(),
            pinned: None,
            pinned_tried: false,
            binding: None,
        }
    }

    pub(crate) fn plan(&self) -> IoPlan {
        self.plan
    }

    /// Host bytes held by the staging buffers (for tests and diagnostics).
    pub(crate) fn held_bytes(&self) -> usize {
        self.buffers.iter().map(Memory::bytes).sum()
    }

    /// Whether the buffers are page-locked (CUDA).
    pub(crate) fn is_pinned(&self) -> bool {
        self.pinned.is_some()
    }

    fn memory_info(&self) -> anyhow::Result<MemoryInfo<'static>> {
        let info = match (&self.pinned, self.plan.device) {
            (Some(_), Device::Cuda(id)) => MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                id,
                AllocatorType::Device,
                MemoryType::CPUInput,
            ),
            _ => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            ),
        };
        Ok(info?)
    }

    /// Makes buffer `j` hold at least `bytes`; on CUDA the first call creates the pinned
    /// allocator (a session that cannot give one, e.g. one that fell back to the CPU, stages in
    /// host memory).
    fn reserve(&mut self, session: &Session, j: usize, bytes: usize) -> anyhow::Result<()> {
        if let (Device::Cuda(id), false) = (self.plan.device, self.pinned_tried) {
            self.pinned_tried = true;
            let info = MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                id,
                AllocatorType::Device,
                MemoryType::CPUInput,
            )?;
            match Allocator::new(session, info) {
                Ok(allocator) => self.pinned = Some(allocator),
                Err(e) => tracing::warn!(
                    error = %e,
                    "no pinned allocator for this session: staging batches in pageable memory"
                ),
            }
        }
        if self.buffers[j].bytes() >= bytes {
            return Ok(());
        }
        // Grow to the size asked, once: the warm-up's full batch comes first.
        let old = std::mem::replace(&mut self.buffers[j], Memory::Host(Vec::new()));
        self.free(old);
        self.buffers[j] = match &self.pinned {
            Some(allocator) => {
                let block = allocator
                    .alloc::<u8>(bytes)
                    .with_context(|| format!("allocating {bytes} bytes of pinned memory"))?;
                Memory::Pinned {
                    ptr: block.into_raw(),
                    bytes,
                }
            }
            None => Memory::Host(vec![0u64; bytes.div_ceil(8)]),
        };
        Ok(())
    }

    fn free(&self, memory: Memory) {
        if let (Memory::Pinned { ptr, .. }, Some(allocator)) = (memory, &self.pinned) {
            // SAFETY: every pinned block came from this allocator and is freed once, here.
            unsafe { allocator.free(ptr) };
        }
    }

    /// Packs input `j` of a call: `parts` (each `per_part` values of the agent's type) one
    /// after the other, converted to `feed`.
    pub(crate) fn fill<'a>(
        &mut self,
        session: &Session,
        j: usize,
        feed: Feed,
        parts: impl ExactSizeIterator<Item = &'a TensorData>,
        per_part: usize,
    ) -> anyhow::Result<()> {
        let n = parts.len() * per_part;
        self.reserve(session, j, n * feed.size())?;
        let ptr = self.buffers[j].ptr();
        macro_rules! copy {
            ($t:ty, $variant:ident, $convert:expr) => {{
                // SAFETY: the buffer holds at least n elements of this size and is aligned for
                // them (8-byte host vectors; ORT's pinned blocks are aligned further).
                let out = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<$t>(), n) };
                for (part, chunk) in parts.zip(out.chunks_mut(per_part.max(1))) {
                    match part {
                        TensorData::$variant(v) if v.len() == per_part => {
                            for (o, &x) in chunk.iter_mut().zip(v) {
                                *o = $convert(x);
                            }
                        }
                        other => bail!(
                            "a batch item has {} {} values, expected {per_part} {}",
                            other.len(),
                            other.element(),
                            stringify!($variant).to_lowercase()
                        ),
                    }
                }
            }};
        }
        match feed {
            Feed::F32 => copy!(f32, F32, |x: f32| x),
            Feed::F16 => copy!(f16, F32, f16::from_f32),
            Feed::I64 => copy!(i64, I64, |x: i64| x),
            Feed::I32 => copy!(i32, I32, |x: i32| x),
        }
        Ok(())
    }

    /// Runs the session on the packed inputs: `inputs[j]` names input `j`, its feed and the
    /// shape of this call. The output named `output` is bound to host-readable memory when the
    /// call goes through the binding.
    pub(crate) fn run<'s>(
        &'s mut self,
        session: &'s mut Session,
        inputs: &[(&str, Feed, Vec<i64>)],
        output: &str,
    ) -> anyhow::Result<SessionOutputs<'s>> {
        if !self.plan.binds() {
            let info = self.memory_info()?;
            let mut views: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
            for (j, (name, feed, shape)) in inputs.iter().enumerate() {
                views.push((name, self.view(j, *feed, shape, &info)?));
            }
            return Ok(session.run(views)?);
        }
        if self.binding.is_none() {
            self.binding = Some(session.create_binding()?);
        }
        let out = match (self.plan.device, &self.pinned) {
            (Device::Cuda(id), Some(_)) => MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                id,
                AllocatorType::Device,
                MemoryType::CPUOutput,
            )?,
            _ => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?,
        };
        // Bound anew each call: once run, a binding keeps its output value, whose shape is the
        // previous batch's. The runtime allocates it from its arena, which reuses the memory.
        let binding = self.binding.as_mut().expect("created above");
        binding.clear_outputs();
        binding.bind_output_to_device(output, &out)?;
        let info = self.memory_info()?;
        for (j, (name, feed, shape)) in inputs.iter().enumerate() {
            if self.pinned.is_some() {
                // Pinned host memory is another device than the session's: the runtime starts
                // the copy to the GPU here, from our buffer, with no copy of ours.
                let view = self.view(j, *feed, shape, &info)?;
                let binding = self.binding.as_mut().expect("created above");
                match &view {
                    SessionInputValue::ViewMut(v) => binding.bind_input(*name, &**v)?,
                    SessionInputValue::View(v) => binding.bind_input(*name, &**v)?,
                    SessionInputValue::Owned(v) => binding.bind_input(*name, v)?,
                }
            } else {
                // Pageable memory on the session's own device: ort would clone a borrowed view
                // to guard against aliasing (and rc.15 deadlocks doing so on the CPU), so the
                // binding gets an owned copy instead.
                let owned = self.owned(j, *feed, shape)?;
                let binding = self.binding.as_mut().expect("created above");
                binding.bind_input(*name, &owned)?;
            }
        }
        Ok(session.run_binding(self.binding.as_ref().expect("created above"))?)
    }

    /// A view of buffer `j` as a tensor of `shape`.
    fn view(
        &mut self,
        j: usize,
        feed: Feed,
        shape: &[i64],
        info: &MemoryInfo<'static>,
    ) -> anyhow::Result<SessionInputValue<'static>> {
        let ptr = self.buffers[j].ptr();
        let shape = Shape::new(shape.iter().copied());
        // SAFETY: `fill` packed exactly shape's element count of this type at `ptr`; the views
        // live until the call returns, and nothing writes or frees the buffer meanwhile.
        let value = unsafe {
            match feed {
                Feed::F32 => TensorRefMut::<f32>::from_raw(info.clone(), ptr, shape)?.into(),
                Feed::F16 => TensorRefMut::<f16>::from_raw(info.clone(), ptr, shape)?.into(),
                Feed::I64 => TensorRefMut::<i64>::from_raw(info.clone(), ptr, shape)?.into(),
                Feed::I32 => TensorRefMut::<i32>::from_raw(info.clone(), ptr, shape)?.into(),
            }
        };
        Ok(value)
    }

    /// An owned tensor of `shape` holding a copy of buffer `j`.
    fn owned(&mut self, j: usize, feed: Feed, shape: &[i64]) -> anyhow::Result<DynTensor> {
        let ptr = self.buffers[j].ptr();
        let n = shape.iter().product::<i64>().max(0) as usize;
        macro_rules! copy {
            ($t:ty) => {{
                // SAFETY: `fill` packed n elements of this type at `ptr`.
                let data = unsafe { std::slice::from_raw_parts(ptr.cast::<$t>(), n) };
                let mut tensor = Tensor::<$t>::new(&Allocator::default(), shape.to_vec())?;
                tensor.extract_tensor_mut().1.copy_from_slice(data);
                tensor.upcast()
            }};
        }
        Ok(match feed {
            Feed::F32 => copy!(f32),
            Feed::F16 => copy!(f16),
            Feed::I64 => copy!(i64),
            Feed::I32 => copy!(i32),
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The binding refers to the inputs; release it before their memory.
        self.binding = None;
        let buffers = std::mem::take(&mut self.buffers);
        for memory in buffers {
            self.free(memory);
        }
    }
}

/// An output tensor's shape and its values cut into `parts` equal runs of f32 (f16 outputs are
/// widened, exactly): the one copy out of the runtime's memory.
pub(crate) fn split_f32(
    value: &ort::value::DynValue,
    parts: usize,
) -> anyhow::Result<(Vec<i64>, Vec<Vec<f32>>)> {
    fn cut<T: Copy>(data: &[T], parts: usize, f: impl Fn(T) -> f32) -> Option<Vec<Vec<f32>>> {
        let per = data.len().checked_div(parts)?;
        if per * parts != data.len() {
            return None;
        }
        Some(
            data.chunks(per.max(1))
                .take(parts)
                .map(|c| c.iter().map(|&x| f(x)).collect())
                .collect(),
        )
    }
    let count = parts;
    let (shape, parts) = if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
        (shape.to_vec(), cut(data, parts, |x| x))
    } else {
        let (shape, data) = value
            .try_extract_tensor::<f16>()
            .context("the output is neither float32 nor float16")?;
        (shape.to_vec(), cut(data, parts, f16::to_f32))
    };
    match parts {
        Some(parts) => Ok((shape, parts)),
        None => bail!("output of shape {shape:?} does not split into {count} equal items"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_modes_parse() {
        assert_eq!(IoMode::parse("auto").unwrap(), IoMode::Auto);
        assert_eq!(IoMode::parse(" bind ").unwrap(), IoMode::Bind);
        assert_eq!(IoMode::parse("run").unwrap(), IoMode::Run);
        let err = IoMode::parse("pinned").unwrap_err().to_string();
        assert!(err.contains("auto, bind or run"), "{err}");
    }

    #[test]
    fn auto_binds_on_cuda_only() {
        let plan = |mode, device| IoPlan { mode, device };
        assert!(!plan(IoMode::Auto, Device::Cpu).binds());
        assert!(plan(IoMode::Auto, Device::Cuda(1)).binds());
        assert!(plan(IoMode::Bind, Device::Cpu).binds());
        assert!(!plan(IoMode::Run, Device::Cuda(0)).binds());
    }

    #[test]
    fn feeds_follow_the_declared_type() {
        let f = TensorData::F32(vec![1.0]);
        let i = TensorData::I64(vec![1]);
        assert_eq!(Feed::of(TensorElementType::Float32, &f), Some(Feed::F32));
        assert_eq!(Feed::of(TensorElementType::Float16, &f), Some(Feed::F16));
        assert_eq!(Feed::of(TensorElementType::Int64, &i), Some(Feed::I64));
        assert_eq!(Feed::of(TensorElementType::Int32, &i), None);
        assert_eq!(Feed::of(TensorElementType::Float16, &i), None);
    }
}
