//! Tensors on the host in the element types models exchange (f32, f16, i64), and [`Graph`]: a
//! session whose inputs and outputs are read from the model, run by name with several outputs.
//!
//! Callers build inputs in f32 (or i64) and read outputs in whatever type the model declares;
//! [`Graph::run`] converts every input to the element type its session declares, so an f16
//! export (or one whose inputs stay f32 while its cache is f16) needs no code of its own. The
//! conversion f32 → f16 rounds to nearest-even (as numpy's `astype`); f16 → f32 is exact.

use anyhow::{bail, Context};
use half::f16;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, ValueType};

/// The element types the engine moves between the host and a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    F32,
    F16,
    I64,
}

impl ElementType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElementType::F32 => 4,
            ElementType::F16 => 2,
            ElementType::I64 => 8,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ElementType::F32 => "float32",
            ElementType::F16 => "float16",
            ElementType::I64 => "int64",
        }
    }

    fn of(ty: TensorElementType) -> Option<ElementType> {
        match ty {
            TensorElementType::Float32 => Some(ElementType::F32),
            TensorElementType::Float16 => Some(ElementType::F16),
            TensorElementType::Int64 => Some(ElementType::I64),
            _ => None,
        }
    }
}

impl std::fmt::Display for ElementType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The values of a tensor, in one element type.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorValues {
    F32(Vec<f32>),
    F16(Vec<f16>),
    I64(Vec<i64>),
}

/// A borrowed view of a tensor's values.
#[derive(Debug, Clone, Copy)]
pub enum TensorSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    I64(&'a [i64]),
}

impl TensorSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            TensorSlice::F32(v) => v.len(),
            TensorSlice::F16(v) => v.len(),
            TensorSlice::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as f32 (i64 converted with `as`).
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            TensorSlice::F32(v) => v[i],
            TensorSlice::F16(v) => v[i].to_f32(),
            TensorSlice::I64(v) => v[i] as f32,
        }
    }

    /// The values in `range` as f32 (exact for f16).
    pub fn to_f32(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        match self {
            TensorSlice::F32(v) => v[range].to_vec(),
            TensorSlice::F16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
            TensorSlice::I64(v) => v[range].iter().map(|&x| x as f32).collect(),
        }
    }
}

/// A tensor on the host: shape and values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<i64>,
    pub data: TensorValues,
}

impl HostTensor {
    pub fn f32(shape: Vec<i64>, data: Vec<f32>) -> HostTensor {
        HostTensor {
            shape,
            data: TensorValues::F32(data),
        }
    }

    pub fn i64(shape: Vec<i64>, data: Vec<i64>) -> HostTensor {
        HostTensor {
            shape,
            data: TensorValues::I64(data),
        }
    }

    /// A tensor of zeros.
    pub fn zeros(ty: ElementType, shape: Vec<i64>) -> HostTensor {
        let n = element_count(&shape);
        let data = match ty {
            ElementType::F32 => TensorValues::F32(vec![0.0; n]),
            ElementType::F16 => TensorValues::F16(vec![f16::ZERO; n]),
            ElementType::I64 => TensorValues::I64(vec![0; n]),
        };
        HostTensor { shape, data }
    }

    pub fn element_type(&self) -> ElementType {
        match self.data {
            TensorValues::F32(_) => ElementType::F32,
            TensorValues::F16(_) => ElementType::F16,
            TensorValues::I64(_) => ElementType::I64,
        }
    }

    pub fn len(&self) -> usize {
        self.slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the values take.
    pub fn bytes(&self) -> usize {
        self.len() * self.element_type().size()
    }

    pub fn slice(&self) -> TensorSlice<'_> {
        match &self.data {
            TensorValues::F32(v) => TensorSlice::F32(v),
            TensorValues::F16(v) => TensorSlice::F16(v),
            TensorValues::I64(v) => TensorSlice::I64(v),
        }
    }

    /// The tensor in another floating type (f32 ↔ f16); integers convert only to themselves.
    pub fn cast(self, ty: ElementType) -> anyhow::Result<HostTensor> {
        let data = match (self.data, ty) {
            (data @ TensorValues::F32(_), ElementType::F32)
            | (data @ TensorValues::F16(_), ElementType::F16)
            | (data @ TensorValues::I64(_), ElementType::I64) => data,
            (TensorValues::F32(v), ElementType::F16) => {
                TensorValues::F16(v.into_iter().map(f16::from_f32).collect())
            }
            (TensorValues::F16(v), ElementType::F32) => {
                TensorValues::F32(v.into_iter().map(f16::to_f32).collect())
            }
            (data, ty) => bail!(
                "cannot convert a {} tensor to {ty}",
                match data {
                    TensorValues::F32(_) => ElementType::F32,
                    TensorValues::F16(_) => ElementType::F16,
                    TensorValues::I64(_) => ElementType::I64,
                }
            ),
        };
        Ok(HostTensor {
            shape: self.shape,
            data,
        })
    }

    /// The values as f32 (exact for f16; an error for integers).
    pub fn into_f32(self) -> anyhow::Result<Vec<f32>> {
        match self.cast(ElementType::F32)?.data {
            TensorValues::F32(v) => Ok(v),
            _ => unreachable!("cast to f32 gives f32"),
        }
    }

    /// An ONNX Runtime value that borrows these values (no copy).
    fn view(&self) -> anyhow::Result<SessionInputValue<'_>> {
        let shape = self.shape.clone();
        Ok(match &self.data {
            TensorValues::F32(v) => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
            TensorValues::F16(v) => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
            TensorValues::I64(v) => TensorRef::from_array_view((shape, v.as_slice()))?.into(),
        })
    }

    /// An ONNX Runtime value that owns its values.
    fn into_value(self) -> anyhow::Result<SessionInputValue<'static>> {
        let shape = self.shape;
        Ok(match self.data {
            TensorValues::F32(v) => Tensor::from_array((shape, v))?.into(),
            TensorValues::F16(v) => Tensor::from_array((shape, v))?.into(),
            TensorValues::I64(v) => Tensor::from_array((shape, v))?.into(),
        })
    }
}

/// Elements of a shape (negative dimensions count as 0).
pub fn element_count(shape: &[i64]) -> usize {
    shape.iter().map(|&d| d.max(0) as usize).product()
}

/// One input or output a model declares: name, element type, shape (`-1` = dynamic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub ty: ElementType,
    pub shape: Vec<i64>,
}

impl Port {
    /// Dimension `i`, when the model fixes it.
    pub fn dim(&self, i: usize) -> Option<i64> {
        self.shape.get(i).copied().filter(|d| *d >= 0)
    }
}

/// A view of one output of a [`Graph::run`].
#[derive(Debug, Clone, Copy)]
pub struct OutputView<'a> {
    pub shape: &'a [i64],
    pub values: TensorSlice<'a>,
}

/// The outputs of one [`Graph::run`], borrowed from the session until dropped.
pub struct Outputs<'s> {
    model: &'s str,
    values: ort::session::SessionOutputs<'s>,
}

impl Outputs<'_> {
    /// A view of an output's values (no copy).
    pub fn view(&self, name: &str) -> anyhow::Result<OutputView<'_>> {
        let value = self
            .values
            .get(name)
            .with_context(|| format!("model {} returned no output {name:?}", self.model))?;
        view_of(value).with_context(|| format!("output {name:?} of model {}", self.model))
    }

    /// A copy of an output.
    pub fn tensor(&self, name: &str) -> anyhow::Result<HostTensor> {
        let view = self.view(name)?;
        let data = match view.values {
            TensorSlice::F32(v) => TensorValues::F32(v.to_vec()),
            TensorSlice::F16(v) => TensorValues::F16(v.to_vec()),
            TensorSlice::I64(v) => TensorValues::I64(v.to_vec()),
        };
        Ok(HostTensor {
            shape: view.shape.to_vec(),
            data,
        })
    }
}

fn view_of(value: &DynValue) -> anyhow::Result<OutputView<'_>> {
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => bail!("is not a tensor ({other:?})"),
    };
    Ok(match ElementType::of(ty) {
        Some(ElementType::F32) => {
            let (shape, v) = value.try_extract_tensor::<f32>()?;
            OutputView {
                shape,
                values: TensorSlice::F32(v),
            }
        }
        Some(ElementType::F16) => {
            let (shape, v) = value.try_extract_tensor::<f16>()?;
            OutputView {
                shape,
                values: TensorSlice::F16(v),
            }
        }
        Some(ElementType::I64) => {
            let (shape, v) = value.try_extract_tensor::<i64>()?;
            OutputView {
                shape,
                values: TensorSlice::I64(v),
            }
        }
        None => bail!("has element type {ty:?}, not float32, float16 or int64"),
    })
}

/// A session with its declared inputs and outputs, run by name.
pub struct Graph {
    session: Session,
    /// The model's name in messages (its bundle file).
    pub name: String,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
}

impl Graph {
    /// Reads the ports of a session. Ports of other element types are listed with the closest
    /// supported type only when they are never used; using one is refused by [`Graph::input`].
    pub fn new(session: Session, name: &str) -> anyhow::Result<Graph> {
        let port = |name: &str, dtype: &ValueType| -> Option<Port> {
            match dtype {
                ValueType::Tensor { ty, shape, .. } => Some(Port {
                    name: name.to_string(),
                    ty: ElementType::of(*ty)?,
                    shape: shape.to_vec(),
                }),
                _ => None,
            }
        };
        let mut unsupported = Vec::new();
        let mut inputs = Vec::new();
        for i in session.inputs() {
            match port(i.name(), i.dtype()) {
                Some(p) => inputs.push(p),
                None => unsupported.push(i.name().to_string()),
            }
        }
        if !unsupported.is_empty() {
            bail!(
                "model {name} has inputs of types the engine does not feed (float32, float16 \
                 and int64 only): {unsupported:?}"
            );
        }
        let outputs = session
            .outputs()
            .iter()
            .filter_map(|o| port(o.name(), o.dtype()))
            .collect();
        Ok(Graph {
            session,
            name: name.to_string(),
            inputs,
            outputs,
        })
    }

    /// The input named `name`; the error names the model and the inputs it has.
    pub fn input(&self, name: &str) -> anyhow::Result<&Port> {
        self.inputs
            .iter()
            .find(|p| p.name == name)
            .with_context(|| {
                let have: Vec<_> = self.inputs.iter().map(|p| p.name.as_str()).collect();
                format!(
                    "model {} has no input {name:?} (it has {have:?})",
                    self.name
                )
            })
    }

    /// The output named `name`; the error names the model and the outputs it has.
    pub fn output(&self, name: &str) -> anyhow::Result<&Port> {
        self.outputs
            .iter()
            .find(|p| p.name == name)
            .with_context(|| {
                let have: Vec<_> = self.outputs.iter().map(|p| p.name.as_str()).collect();
                format!(
                    "model {} has no output {name:?} (it has {have:?})",
                    self.name
                )
            })
    }

    /// Runs the model. Each input is converted to the element type the model declares for it
    /// (borrowed as it is when it already has that type); every output is returned.
    pub fn run<'s>(&'s mut self, inputs: &[(&str, &HostTensor)]) -> anyhow::Result<Outputs<'s>> {
        let mut values: Vec<(String, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            let want = self.input(name)?.ty;
            let value = if tensor.element_type() == want {
                tensor.view()?
            } else {
                (*tensor)
                    .clone()
                    .cast(want)
                    .with_context(|| format!("input {name:?} of model {}", self.name))?
                    .into_value()?
            };
            values.push((name.to_string(), value));
        }
        let outputs = self
            .session
            .run(values)
            .with_context(|| format!("running model {}", self.name))?;
        Ok(Outputs {
            model: &self.name,
            values: outputs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trips_and_rounds_to_nearest_even() {
        let t = HostTensor::f32(vec![4], vec![1.0, 0.1, 65504.0, 1.0 + 1.0 / 4096.0]);
        let h = t.clone().cast(ElementType::F16).unwrap();
        assert_eq!(h.element_type(), ElementType::F16);
        let back = h.into_f32().unwrap();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], f16::from_f32(0.1).to_f32());
        assert_eq!(back[2], 65504.0);
        // Halfway between 1 and the next f16 (1 + 2^-10): ties go to the even one, 1.
        assert_eq!(back[3], 1.0);
        assert!(HostTensor::i64(vec![1], vec![3])
            .cast(ElementType::F32)
            .is_err());
    }

    #[test]
    fn zeros_and_sizes() {
        let z = HostTensor::zeros(ElementType::F16, vec![2, 0, 3]);
        assert!(z.is_empty());
        let z = HostTensor::zeros(ElementType::F16, vec![2, 3]);
        assert_eq!((z.len(), z.bytes()), (6, 12));
        assert_eq!(element_count(&[4, -1]), 0);
    }
}
