//! Multimodal rotary positions (M-RoPE, transformers' `get_rope_index` for one image): the
//! `[3, S]` position ids (temporal, height, width rows) of a prompt and its rope delta, which
//! places every generated token at `past_length + rope_delta` on all three rows.

/// Position ids of one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positions {
    /// Rows t, h, w, each `S` long, concatenated.
    pub ids: Vec<i64>,
    /// `max(position) + 1 - S`.
    pub rope_delta: i64,
}

/// Positions of `ids`, whose image tokens (`image_token`, following `vision_start`) come from a
/// grid of `(t, h, w)` patches merged `merge × merge`. A prompt without image tokens counts
/// positions 0.. on every row.
pub fn rope_index(
    ids: &[i64],
    image_token: i64,
    vision_start: i64,
    grid: [i64; 3],
    merge: i64,
) -> Result<Positions, String> {
    let s = ids.len();
    let Some(start) = ids.iter().position(|&t| t == image_token) else {
        let row: Vec<i64> = (0..s as i64).collect();
        return Ok(Positions {
            ids: [row.clone(), row.clone(), row].concat(),
            rope_delta: 0,
        });
    };
    if start == 0 || ids[start - 1] != vision_start {
        return Err("the image tokens must follow the vision start token".into());
    }
    let (t, lh, lw) = (grid[0], grid[1] / merge, grid[2] / merge);
    let n = (t * lh * lw) as usize;
    if start + n > s || ids[start..start + n].iter().any(|&x| x != image_token) {
        return Err(format!(
            "the prompt has not the {n} consecutive image tokens its grid needs"
        ));
    }
    let mut rows = vec![vec![0i64; s]; 3];
    let off = start as i64;
    for (k, row) in rows.iter_mut().enumerate() {
        for (i, p) in row.iter_mut().enumerate().take(start) {
            *p = i as i64;
        }
        for q in 0..n {
            let q = q as i64;
            row[start + q as usize] = off
                + match k {
                    0 => q / (lh * lw),
                    1 => (q / lw) % lh,
                    _ => q % lw,
                };
        }
        let next = off + t.max(lh).max(lw);
        for (j, p) in row.iter_mut().skip(start + n).enumerate() {
            *p = next + j as i64;
        }
    }
    let max = rows.iter().flatten().copied().max().unwrap_or(-1);
    Ok(Positions {
        ids: rows.concat(),
        rope_delta: max + 1 - s as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_tokens_take_grid_positions_and_text_continues_after_the_largest() {
        // [a, vs, img x 4 (grid 1x4x4 merged 2 -> 2x2), b, c]
        let ids = [5, 9, 7, 7, 7, 7, 6, 6];
        let p = rope_index(&ids, 7, 9, [1, 4, 4], 2).unwrap();
        let (t, h, w) = (&p.ids[0..8], &p.ids[8..16], &p.ids[16..24]);
        assert_eq!(t, &[0, 1, 2, 2, 2, 2, 4, 5]);
        assert_eq!(h, &[0, 1, 2, 2, 3, 3, 4, 5]);
        assert_eq!(w, &[0, 1, 2, 3, 2, 3, 4, 5]);
        assert_eq!(p.rope_delta, 5 + 1 - 8);
    }

    #[test]
    fn text_only_and_malformed_prompts() {
        let p = rope_index(&[1, 2, 3], 7, 9, [1, 4, 4], 2).unwrap();
        assert_eq!(p.ids, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
        assert_eq!(p.rope_delta, 0);
        assert!(rope_index(&[7, 7, 7, 7], 7, 9, [1, 4, 4], 2).is_err());
        assert!(rope_index(&[9, 7, 7, 7], 7, 9, [1, 4, 4], 2).is_err());
    }
}
