//! The VLM's language model: the token embedding and the decoder with its KV cache, as the
//! split ONNX exports lay them out (design §4.7b). [`DecoderModel::prefill`] runs one prompt
//! alone (its image features in place of the image tokens' embeddings);
//! [`DecoderModel::step`] runs one token for every sequence of a [`KvBatch`]. Greedy: the next
//! token is the first maximum of the last position's logits.

use anyhow::{bail, Context};

use super::rope::Positions;
use super::vision::ImageFeatures;
use crate::engine::kv::{KvBatch, KvLayout};
use crate::engine::tensor::{Graph, HostTensor, OutputView, TensorSlice};

/// A prompt ready for its prefill.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Token ids, the image tokens expanded.
    pub ids: Vec<i64>,
    /// Their embeddings are replaced, in order, by these rows.
    pub image_token: i64,
    pub features: ImageFeatures,
    pub positions: Positions,
}

/// The embedding and decoder sessions.
pub struct DecoderModel {
    embed: Graph,
    embed_input: String,
    embed_output: String,
    decoder: Graph,
    pub kv: KvLayout,
    /// Width of an embedding.
    pub hidden: usize,
}

impl DecoderModel {
    /// Checks the two graphs' layouts (names, ranks, the M-RoPE position input, the cache).
    pub fn new(embed: Graph, decoder: Graph) -> anyhow::Result<DecoderModel> {
        let (embed_input, embed_output) = match (embed.inputs.as_slice(), embed.outputs.as_slice())
        {
            ([input], [output]) => (input.name.clone(), output.name.clone()),
            _ => (
                embed.input("input_ids")?.name.clone(),
                embed.output("inputs_embeds")?.name.clone(),
            ),
        };
        let out = embed.output(&embed_output)?;
        let hidden = match out.shape.as_slice() {
            [_, _, h] if *h > 0 => *h as usize,
            other => bail!(
                "model {}: {embed_output} has shape {other:?}, expected [batch, sequence, hidden]",
                embed.name
            ),
        };
        let embeds = decoder.input("inputs_embeds")?;
        if embeds.dim(2).is_some_and(|h| h as usize != hidden) {
            bail!(
                "model {} takes embeddings of {:?} values, {} makes {hidden}",
                decoder.name,
                embeds.dim(2),
                embed.name
            );
        }
        decoder.input("attention_mask")?;
        let positions = decoder.input("position_ids")?;
        if positions.shape.len() != 3 || positions.dim(0).is_some_and(|d| d != 3) {
            bail!(
                "model {}: position_ids has shape {:?}, expected [3, batch, sequence] (M-RoPE)",
                decoder.name,
                positions.shape
            );
        }
        let logits = decoder.output("logits")?;
        if logits.shape.len() != 3 {
            bail!(
                "model {}: logits has shape {:?}, expected [batch, sequence, vocabulary]",
                decoder.name,
                logits.shape
            );
        }
        let kv = KvLayout::of(&decoder)?;
        Ok(DecoderModel {
            embed,
            embed_input,
            embed_output,
            decoder,
            kv,
            hidden,
        })
    }

    /// Embeddings `[rows, len, hidden]` of `ids` (`rows × len` of them), as f32.
    fn embed(&mut self, ids: Vec<i64>, rows: usize) -> anyhow::Result<Vec<f32>> {
        let len = ids.len() / rows.max(1);
        let ids = HostTensor::i64(vec![rows as i64, len as i64], ids);
        let input = self.embed_input.clone();
        let output = self.embed_output.clone();
        let outputs = self.embed.run(&[(input.as_str(), &ids)])?;
        let embeds = outputs.tensor(&output)?;
        if embeds.shape != [rows as i64, len as i64, self.hidden as i64] {
            bail!("{output} has shape {:?}", embeds.shape);
        }
        embeds.into_f32()
    }

    /// Runs a prompt alone from an empty cache: its first generated token and its cache.
    pub fn prefill(&mut self, prompt: &Prompt) -> anyhow::Result<(u32, KvBatch)> {
        let s = prompt.ids.len();
        if s == 0 || prompt.positions.ids.len() != 3 * s {
            bail!(
                "a prompt of {s} tokens with {} position ids",
                prompt.positions.ids.len()
            );
        }
        let mut embeds = self.embed(prompt.ids.clone(), 1)?;
        let h = self.hidden;
        if prompt.features.hidden != h && prompt.features.rows > 0 {
            bail!(
                "image features have {} values per row, the embeddings {h}",
                prompt.features.hidden
            );
        }
        let mut rows = prompt.features.values.chunks_exact(h.max(1));
        let mut replaced = 0;
        for (i, _) in prompt
            .ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == prompt.image_token)
        {
            let row = rows
                .next()
                .context("fewer image features than image tokens")?;
            embeds[i * h..(i + 1) * h].copy_from_slice(row);
            replaced += 1;
        }
        if replaced != prompt.features.rows {
            bail!(
                "{} image features for {replaced} image tokens",
                prompt.features.rows
            );
        }
        let mut cache = KvBatch::blank(self.kv, 1);
        let inputs_embeds = HostTensor::f32(vec![1, s as i64, h as i64], embeds);
        let positions = HostTensor::i64(vec![3, 1, s as i64], prompt.positions.ids.clone());
        let token = self
            .forward(&mut cache, &inputs_embeds, &positions, s)?
            .into_iter()
            .next()
            .context("no logits")?;
        Ok((token, cache))
    }

    /// One decode step: `tokens[b]` (the last token of row `b`) at position
    /// `lengths[b] + rope_deltas[b]` on all three rows; the cache grows by one slot per row.
    /// Returns each row's next token.
    pub fn step(
        &mut self,
        cache: &mut KvBatch,
        tokens: &[i64],
        rope_deltas: &[i64],
    ) -> anyhow::Result<Vec<u32>> {
        let b = cache.rows();
        if tokens.len() != b || rope_deltas.len() != b {
            bail!("a step of {} tokens for a batch of {b}", tokens.len());
        }
        let embeds = self.embed(tokens.to_vec(), b)?;
        let inputs_embeds = HostTensor::f32(vec![b as i64, 1, self.hidden as i64], embeds);
        let row: Vec<i64> = cache
            .lengths()
            .iter()
            .zip(rope_deltas)
            .map(|(&len, &delta)| len as i64 + delta)
            .collect();
        let positions = HostTensor::i64(vec![3, b as i64, 1], row.repeat(3));
        self.forward(cache, &inputs_embeds, &positions, 1)
    }

    /// One decoder call on `new` positions of every row of `cache` (the prompt of a prefill, the
    /// last token of a step): the last position's argmax per row; the cache grows by `new`
    /// slots per row, only once the call has succeeded.
    fn forward(
        &mut self,
        cache: &mut KvBatch,
        inputs_embeds: &HostTensor,
        positions: &HostTensor,
        new: usize,
    ) -> anyhow::Result<Vec<u32>> {
        let mask = cache.step_mask(new);
        let past = cache.past_inputs();
        let mut inputs: Vec<(&str, &HostTensor)> = vec![
            ("inputs_embeds", inputs_embeds),
            ("attention_mask", &mask),
            ("position_ids", positions),
        ];
        inputs.extend(past.iter().map(|(n, t)| (n.as_str(), *t)));
        let outputs = self.decoder.run(&inputs)?;
        let next = last_argmax(&outputs.view("logits")?, cache.rows(), new)?;
        // `past` borrows the cache until here.
        drop(past);
        cache.advance(&outputs, new)?;
        Ok(next)
    }
}

/// The argmax (first maximum; a NaN counts as the maximum, as numpy's) of the last position's
/// logits of each of `rows` rows of `len` positions.
fn last_argmax(logits: &OutputView, rows: usize, len: usize) -> anyhow::Result<Vec<u32>> {
    let (b, s, v) = match logits.shape {
        [b, s, v] => (*b as usize, *s as usize, *v as usize),
        other => bail!("logits have shape {other:?}"),
    };
    if b != rows || s != len || v == 0 || logits.values.len() != b * s * v {
        bail!(
            "logits have shape {:?} for {rows} rows of {len}",
            logits.shape
        );
    }
    Ok((0..b)
        .map(|row| {
            let start = (row * s + s - 1) * v;
            match logits.values {
                TensorSlice::F32(x) => argmax(x[start..start + v].iter().copied()),
                TensorSlice::F16(x) => argmax(x[start..start + v].iter().map(|h| h.to_f32())),
                TensorSlice::I64(x) => argmax(x[start..start + v].iter().map(|&i| i as f32)),
            }
        })
        .collect())
}

fn argmax(values: impl Iterator<Item = f32>) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, x) in values.enumerate() {
        if x.is_nan() {
            return i as u32;
        }
        if x > best.1 || i == 0 {
            best = (i, x);
        }
    }
    best.0 as u32
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_takes_the_first_maximum_and_nan() {
        assert_eq!(argmax([1.0, 3.0, 3.0, 2.0].into_iter()), 1);
        assert_eq!(
            argmax([f32::NEG_INFINITY, f32::NEG_INFINITY].into_iter()),
            0
        );
        assert_eq!(argmax([1.0, f32::NAN, 5.0].into_iter()), 1);
    }
}
