//! Prompts as text encoders see them: a bundle's `tokenizer.json`, its post-processor (the
//! special tokens the encoder was trained with, e.g. `[CLS] … [SEP]` or
//! `<|startoftext|> … <|endoftext|>`), truncation to the encoder's length with the special
//! tokens kept, and right padding with the encoder's own pad id.
//!
//! The pad id is the bundle's when it names one, else the tokenizer's padding setting, else the
//! id of a conventional pad token in its vocabulary; never a guessed 0, which is a real token in
//! most vocabularies (`!` in CLIP's).

use std::path::Path;

use anyhow::bail;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{ErrorClass, JobError};

/// Pad tokens looked up in the vocabulary when neither the bundle nor the tokenizer names one.
const CONVENTIONAL_PAD_TOKENS: &[&str] = &["[PAD]", "<pad>", "<|pad|>", "<PAD>"];

/// A prompt as the model sees it: exactly `max_tokens` ids and their attention mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
}

/// How a bundle asks for its prompts to be encoded.
#[derive(Debug, Clone, Copy)]
pub struct EncodingSpec {
    /// Sequence length of the encoder (ids are truncated, then padded to it).
    pub max_tokens: usize,
    /// Run the tokenizer's post-processor (special tokens). Default on.
    pub add_special_tokens: bool,
    /// The encoder's pad id, when the bundle names it.
    pub pad_id: Option<u32>,
}

/// A tokenizer ready to encode prompts for one text encoder.
pub struct PromptEncoder {
    tokenizer: Tokenizer,
    spec: EncodingSpec,
    pad_id: u32,
}

impl PromptEncoder {
    pub fn load(path: &Path, spec: EncodingSpec) -> anyhow::Result<PromptEncoder> {
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?;
        if spec.max_tokens == 0 {
            bail!("max_tokens must be at least 1");
        }
        let pad_id = match spec.pad_id {
            Some(id) => id,
            None => match tokenizer.get_padding().map(|p| p.pad_id) {
                Some(id) => id,
                None => match CONVENTIONAL_PAD_TOKENS
                    .iter()
                    .find_map(|t| tokenizer.token_to_id(t))
                {
                    Some(id) => id,
                    None => bail!(
                        "tokenizer {} names no pad token (no padding setting, none of {:?} in \
                         its vocabulary): set pad_id in the bundle",
                        path.display(),
                        CONVENTIONAL_PAD_TOKENS
                    ),
                },
            },
        };
        // Truncation inside the tokenizer keeps the post-processor's special tokens (an
        // end-of-text token stays last); padding is ours, to exactly max_tokens.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: spec.max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| anyhow::anyhow!("tokenizer {}: {e}", path.display()))?;
        tokenizer.with_padding(None);
        Ok(PromptEncoder {
            tokenizer,
            spec,
            pad_id,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Encodes a prompt to exactly `max_tokens` ids, padded on the right with the pad id;
    /// the attention mask is 1 for real tokens (special ones included), 0 for padding.
    pub fn encode(&self, prompt: &str) -> Result<Tokens, JobError> {
        let encoding = self
            .tokenizer
            .encode(prompt, self.spec.add_special_tokens)
            .map_err(|e| {
                JobError::new(
                    ErrorClass::InvalidMessage,
                    format!("prompt cannot be tokenized: {e}"),
                )
            })?;
        let n = self.spec.max_tokens;
        let mut ids: Vec<i64> = encoding
            .get_ids()
            .iter()
            .take(n)
            .map(|&id| i64::from(id))
            .collect();
        let mut attention_mask = vec![1; ids.len()];
        ids.resize(n, i64::from(self.pad_id));
        attention_mask.resize(n, 0);
        Ok(Tokens {
            ids,
            attention_mask,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_tokenizer() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/reference/tokenizer.json")
    }

    #[test]
    fn pads_with_the_vocabularys_pad_token_and_masks_it() {
        let spec = EncodingSpec {
            max_tokens: 6,
            add_special_tokens: true,
            pad_id: None,
        };
        let encoder = PromptEncoder::load(&reference_tokenizer(), spec).unwrap();
        assert_eq!(
            encoder.pad_id(),
            0,
            "[PAD] is 0 in the reference vocabulary"
        );
        let tokens = encoder.encode("A Magenta sky.").unwrap();
        assert_eq!(tokens.ids, vec![6, 53, 78, 2, 0, 0]);
        assert_eq!(tokens.attention_mask, vec![1, 1, 1, 1, 0, 0]);
    }

    #[test]
    fn the_bundles_pad_id_wins_and_long_prompts_are_truncated() {
        let spec = EncodingSpec {
            max_tokens: 3,
            add_special_tokens: true,
            pad_id: Some(1),
        };
        let encoder = PromptEncoder::load(&reference_tokenizer(), spec).unwrap();
        assert_eq!(encoder.encode("a").unwrap().ids, vec![6, 1, 1]);
        let long = encoder.encode("a magenta sky .").unwrap();
        assert_eq!(long.ids, vec![6, 53, 78]);
        assert_eq!(long.attention_mask, vec![1, 1, 1]);
    }
}
