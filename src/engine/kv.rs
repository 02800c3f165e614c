//! The key/value cache of an autoregressive decoder (inputs `past_key_values.{i}.key|value`,
//! outputs `present.{i}.key|value`, each `[batch, kv_heads, length, head_dim]`), kept as one
//! batch across sequences for continuous batching.
//!
//! Rows are left-padded to the longest sequence, so one decode step appends one column to every
//! row and its `present` is the next step's `past` as it is; only when sequences join
//! ([`KvBatch::join`], text-generation-inference's *concatenate*) or leave
//! ([`KvBatch::retain`], its *filter*) are the tensors regathered. The attention mask marks the
//! real slots of each row ([`KvBatch::step_mask`]): padding is a layout choice, the mask is the
//! contract with the model.

use anyhow::{bail, Context};
use half::f16;

use super::tensor::{ElementType, Graph, HostTensor, Outputs, TensorSlice, TensorValues};

/// How a decoder lays out its cache, read from its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Element type of the cache as the decoder takes it.
    pub ty: ElementType,
}

/// Keys or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvKind {
    Key,
    Value,
}

impl KvKind {
    const BOTH: [KvKind; 2] = [KvKind::Key, KvKind::Value];

    fn as_str(self) -> &'static str {
        match self {
            KvKind::Key => "key",
            KvKind::Value => "value",
        }
    }
}

impl KvLayout {
    /// Reads the layout from a decoder: the layer count is the number of
    /// `past_key_values.{i}.key` inputs (numbered from 0), KV heads and head size are dims 1 and
    /// 3 of `past_key_values.0.key`; every layer must have its key and value input and
    /// `present` outputs.
    pub fn of(graph: &Graph) -> anyhow::Result<KvLayout> {
        let layers = (0..)
            .take_while(|i| {
                graph
                    .inputs
                    .iter()
                    .any(|p| p.name == Self::past(*i, KvKind::Key))
            })
            .count();
        if layers == 0 {
            bail!(
                "model {} has no past_key_values.0.key input: not a decoder with a KV cache",
                graph.name
            );
        }
        let first = graph.input(&Self::past(0, KvKind::Key))?;
        if first.shape.len() != 4 {
            bail!(
                "model {}: past_key_values.0.key has shape {:?}, expected [batch, kv_heads, past, head_dim]",
                graph.name,
                first.shape
            );
        }
        let (Some(kv_heads), Some(head_dim)) = (first.dim(1), first.dim(3)) else {
            bail!(
                "model {}: past_key_values.0.key must fix kv_heads and head_dim (dims 1 and 3), has {:?}",
                graph.name,
                first.shape
            );
        };
        let ty = first.ty;
        if ty == ElementType::I64 {
            bail!("model {}: the KV cache is not floating point", graph.name);
        }
        for layer in 0..layers {
            for kind in KvKind::BOTH {
                let past = graph.input(&Self::past(layer, kind))?;
                if past.ty != ty || past.shape.len() != 4 {
                    bail!(
                        "model {}: {} is {} {:?}, unlike past_key_values.0.key ({ty} {:?})",
                        graph.name,
                        past.name,
                        past.ty,
                        past.shape,
                        first.shape
                    );
                }
                let present = graph.output(&Self::present(layer, kind))?;
                if present.ty == ElementType::I64 {
                    bail!(
                        "model {}: {} is not floating point",
                        graph.name,
                        present.name
                    );
                }
            }
        }
        Ok(KvLayout {
            layers,
            kv_heads: kv_heads as usize,
            head_dim: head_dim as usize,
            ty,
        })
    }

    pub fn past(layer: usize, kind: KvKind) -> String {
        format!("past_key_values.{layer}.{}", kind.as_str())
    }

    pub fn present(layer: usize, kind: KvKind) -> String {
        format!("present.{layer}.{}", kind.as_str())
    }

    /// Cache bytes per token of one sequence (keys and values of every layer).
    pub fn bytes_per_token(&self) -> u64 {
        (2 * self.layers * self.kv_heads * self.head_dim * self.ty.size()) as u64
    }

    /// Every (layer, kind) in the order the batch keeps its tensors.
    fn slots(&self) -> impl Iterator<Item = (usize, KvKind)> {
        (0..self.layers).flat_map(|l| KvKind::BOTH.into_iter().map(move |k| (l, k)))
    }
}

/// The cache of a batch of sequences: per layer and kind one tensor
/// `[rows, kv_heads, width, head_dim]`, row `b` holding its `lengths[b]` real slots at the end.
#[derive(Debug, Clone)]
pub struct KvBatch {
    layout: KvLayout,
    /// Index `2 * layer + kind`.
    tensors: Vec<HostTensor>,
    lengths: Vec<usize>,
    width: usize,
}

impl KvBatch {
    /// A batch of no sequences.
    pub fn empty(layout: KvLayout) -> KvBatch {
        KvBatch::blank(layout, 0)
    }

    /// `rows` rows of zero-length caches (the `past` of a prefill).
    pub fn blank(layout: KvLayout, rows: usize) -> KvBatch {
        let shape = vec![
            rows as i64,
            layout.kv_heads as i64,
            0,
            layout.head_dim as i64,
        ];
        KvBatch {
            layout,
            tensors: layout
                .slots()
                .map(|_| HostTensor::zeros(layout.ty, shape.clone()))
                .collect(),
            lengths: vec![0; rows],
            width: 0,
        }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn rows(&self) -> usize {
        self.lengths.len()
    }

    /// Slots per row (the longest sequence's length).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Real slots of each row.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Bytes the batch holds, padding included.
    pub fn bytes(&self) -> u64 {
        (self.rows() * self.width) as u64 * self.layout.bytes_per_token()
    }

    /// The `past_key_values.*` inputs of the next decoder call.
    pub fn past_inputs(&self) -> Vec<(String, &HostTensor)> {
        self.layout
            .slots()
            .map(|(l, k)| KvLayout::past(l, k))
            .zip(&self.tensors)
            .collect()
    }

    /// The `attention_mask` of a step that adds `new` tokens to every row: `[rows, width + new]`,
    /// row `b` = `width - lengths[b]` zeros, then ones.
    pub fn step_mask(&self, new: usize) -> HostTensor {
        let cols = self.width + new;
        let mut mask = Vec::with_capacity(self.rows() * cols);
        for &len in &self.lengths {
            let pad = self.width - len;
            mask.extend(std::iter::repeat_n(0i64, pad));
            mask.extend(std::iter::repeat_n(1i64, cols - pad));
        }
        HostTensor::i64(vec![self.rows() as i64, cols as i64], mask)
    }

    /// Takes the decoder's `present.*` outputs after a call that added `new` tokens to every
    /// row: they become the cache (each row `new` slots longer).
    pub fn advance(&mut self, outputs: &Outputs, new: usize) -> anyhow::Result<()> {
        let width = self.width + new;
        let want = [
            self.rows() as i64,
            self.layout.kv_heads as i64,
            width as i64,
            self.layout.head_dim as i64,
        ];
        let mut tensors = Vec::with_capacity(self.tensors.len());
        for (layer, kind) in self.layout.slots() {
            let name = KvLayout::present(layer, kind);
            let tensor = outputs.tensor(&name)?;
            if tensor.shape != want {
                bail!("{name} has shape {:?}, expected {want:?}", tensor.shape);
            }
            tensors.push(
                tensor
                    .cast(self.layout.ty)
                    .with_context(|| format!("output {name}"))?,
            );
        }
        self.tensors = tensors;
        self.width = width;
        for len in &mut self.lengths {
            *len += new;
        }
        Ok(())
    }

    /// Appends the rows of `other` (sequences joining the batch); the wider of the two sets
    /// the width and the other's rows are padded on the left.
    pub fn join(&mut self, other: KvBatch) -> anyhow::Result<()> {
        if other.layout != self.layout {
            bail!("joining KV caches of different layouts");
        }
        if other.rows() == 0 {
            return Ok(());
        }
        if self.rows() == 0 {
            *self = other;
            return Ok(());
        }
        let width = self.width.max(other.width);
        let rows: Vec<(&KvBatch, usize)> = (0..self.rows())
            .map(|r| (&*self, r))
            .chain((0..other.rows()).map(|r| (&other, r)))
            .collect();
        let joined = KvBatch::gather(self.layout, &rows, width);
        *self = joined;
        Ok(())
    }

    /// Row `r` alone, as a batch of one, as wide as its own length.
    pub fn row(&self, r: usize) -> KvBatch {
        KvBatch::gather(self.layout, &[(self, r)], self.lengths[r])
    }

    /// Keeps the rows where `keep` is true (sequences that go on), in order, and drops the
    /// leading columns no kept row uses any more.
    pub fn retain(&mut self, keep: &[bool]) {
        let rows: Vec<(&KvBatch, usize)> = (0..self.rows())
            .filter(|&r| keep.get(r).copied().unwrap_or(false))
            .map(|r| (&*self, r))
            .collect();
        let width = rows.iter().map(|(b, r)| b.lengths[*r]).max().unwrap_or(0);
        let kept = KvBatch::gather(self.layout, &rows, width);
        *self = kept;
    }

    /// A new batch of the given rows of existing batches, `width` slots wide; each row keeps
    /// its last `min(width, its width)` slots, right-aligned.
    fn gather(layout: KvLayout, rows: &[(&KvBatch, usize)], width: usize) -> KvBatch {
        if rows.is_empty() {
            return KvBatch::empty(layout);
        }
        let (heads, dim) = (layout.kv_heads, layout.head_dim);
        let shape = vec![rows.len() as i64, heads as i64, width as i64, dim as i64];
        let tensors = (0..2 * layout.layers)
            .map(|slot| {
                let sources: Vec<(TensorSlice<'_>, usize, usize)> = rows
                    .iter()
                    .map(|(batch, row)| (batch.tensors[slot].slice(), *row, batch.width))
                    .collect();
                let values = match layout.ty {
                    ElementType::F16 => TensorValues::F16(copy_rows(
                        &sources,
                        heads,
                        dim,
                        width,
                        |s| match s {
                            TensorSlice::F16(v) => v,
                            _ => &[],
                        },
                        f16::ZERO,
                    )),
                    _ => TensorValues::F32(copy_rows(
                        &sources,
                        heads,
                        dim,
                        width,
                        |s| match s {
                            TensorSlice::F32(v) => v,
                            _ => &[],
                        },
                        0.0f32,
                    )),
                };
                HostTensor {
                    shape: shape.clone(),
                    data: values,
                }
            })
            .collect();
        KvBatch {
            layout,
            tensors,
            lengths: rows.iter().map(|(b, r)| b.lengths[*r].min(width)).collect(),
            width,
        }
    }
}

/// Copies rows `(source, row, source width)` into a `[rows, heads, width, dim]` buffer,
/// right-aligned (left padding with `zero`).
fn copy_rows<'a, T: Copy + 'a>(
    sources: &[(TensorSlice<'a>, usize, usize)],
    heads: usize,
    dim: usize,
    width: usize,
    values: impl Fn(TensorSlice<'a>) -> &'a [T],
    zero: T,
) -> Vec<T> {
    let mut out = vec![zero; sources.len() * heads * width * dim];
    for (r, &(slice, row, src_width)) in sources.iter().enumerate() {
        let src = values(slice);
        let take = src_width.min(width);
        for h in 0..heads {
            let src_end = ((row * heads + h) * src_width + src_width) * dim;
            let dst_end = ((r * heads + h) * width + width) * dim;
            let n = take * dim;
            if src_end <= src.len() {
                out[dst_end - n..dst_end].copy_from_slice(&src[src_end - n..src_end]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: KvLayout = KvLayout {
        layers: 1,
        kv_heads: 2,
        head_dim: 1,
        ty: ElementType::F32,
    };

    /// A one-row batch whose slot `t` of head `h` holds `base + 10 h + t + 1`.
    fn row(base: f32, len: usize) -> KvBatch {
        let values: Vec<f32> = (0..2)
            .flat_map(|h| (0..len).map(move |t| base + 10.0 * h as f32 + t as f32 + 1.0))
            .collect();
        let t = HostTensor::f32(vec![1, 2, len as i64, 1], values);
        KvBatch {
            layout: LAYOUT,
            tensors: vec![t.clone(), t],
            lengths: vec![len],
            width: len,
        }
    }

    fn values(b: &KvBatch) -> Vec<f32> {
        b.tensors[0].clone().into_f32().unwrap()
    }

    #[test]
    fn joining_left_pads_the_shorter_rows() {
        let mut b = row(100.0, 3);
        b.join(row(200.0, 1)).unwrap();
        assert_eq!((b.rows(), b.width(), b.lengths()), (2, 3, &[3, 1][..]));
        assert_eq!(
            values(&b),
            vec![101., 102., 103., 111., 112., 113., 0., 0., 201., 0., 0., 211.]
        );
        let mask = b.step_mask(1);
        assert_eq!(mask.shape, vec![2, 4]);
        assert_eq!(mask.data, TensorValues::I64(vec![1, 1, 1, 1, 0, 0, 1, 1]));
        assert_eq!(b.bytes(), 2 * 3 * LAYOUT.bytes_per_token());
    }

    #[test]
    fn leaving_drops_rows_and_unused_columns() {
        let mut b = row(100.0, 3);
        b.join(row(200.0, 1)).unwrap();
        b.join(row(300.0, 2)).unwrap();
        b.retain(&[false, true, true]);
        assert_eq!((b.rows(), b.width(), b.lengths()), (2, 2, &[1, 2][..]));
        assert_eq!(values(&b), vec![0., 201., 0., 211., 301., 302., 311., 312.]);
        b.retain(&[false, false]);
        assert_eq!((b.rows(), b.width(), b.bytes()), (0, 0, 0));
        b.join(row(400.0, 1)).unwrap();
        assert_eq!(values(&b), vec![401., 411.]);
    }

    #[test]
    fn blank_rows_for_a_prefill() {
        let b = KvBatch::blank(LAYOUT, 1);
        let past = b.past_inputs();
        assert_eq!(past.len(), 2);
        assert_eq!(past[0].0, "past_key_values.0.key");
        assert_eq!(past[1].0, "past_key_values.0.value");
        assert_eq!(past[0].1.shape, vec![1, 2, 0, 1]);
        assert_eq!(b.step_mask(3).data, TensorValues::I64(vec![1, 1, 1]));
    }
}
