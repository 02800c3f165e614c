//! The initial latent noise of a diffusion repair: a counter-based generator keyed by the job,
//! so a redelivered job draws the same numbers and writes the same pixels, and the Python
//! reference (`models/diffusion-reference/noise.py`) draws them too.
//!
//! ```text
//! key      = u64 little-endian of the first 8 bytes of sha256("{job_id}:{iteration}:{region}")
//! u64[n]   = mix64(key + (n + 1) * 0x9E3779B97F4A7C15)      (wrapping; SplitMix64)
//! pair k   : a = u64[2k], b = u64[2k+1]
//!            u1 = ((a >> 11) + 1) * 2^-53 in (0, 1],  u2 = (b >> 11) * 2^-53 in [0, 1)
//!            r = sqrt(-2 ln u1); normal[2k] = r cos(2 pi u2), normal[2k+1] = r sin(2 pi u2)
//! ```
//!
//! Counter-based rather than a stateful generator: any element can be computed on its own, and
//! nothing about the order in which regions or jobs are processed can change a region's noise.

use sha2::{Digest, Sha256};

/// SplitMix64's increment (the golden ratio in 64 bits).
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const TWO_POW_M53: f64 = 1.0 / (1u64 << 53) as f64;

/// The generator's key of one region repair.
pub fn noise_key(job_id: &str, iteration: usize, region: usize) -> u64 {
    let digest = Sha256::digest(format!("{job_id}:{iteration}:{region}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// SplitMix64's finaliser.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `n`-th u64 of the stream of `key`.
pub fn nth_u64(key: u64, n: u64) -> u64 {
    mix64(key.wrapping_add(n.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)))
}

/// The first `count` standard normals of the stream of `key` (Box-Muller in f64, then f32).
pub fn normals(key: u64, count: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(count + 1);
    let mut k = 0u64;
    while out.len() < count {
        let (a, b) = (nth_u64(key, 2 * k), nth_u64(key, 2 * k + 1));
        let u1 = ((a >> 11) + 1) as f64 * TWO_POW_M53;
        let u2 = (b >> 11) as f64 * TWO_POW_M53;
        let r = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        out.push((r * angle.cos()) as f32);
        out.push((r * angle.sin()) as f32);
        k += 1;
    }
    out.truncate(count);
    out
}

/// The initial noise of one region repair: `count` normals, the C-order elements of the
/// latent tensor `[1, 4, h, w]`.
pub fn region_noise(job_id: &str, iteration: usize, region: usize, count: usize) -> Vec<f32> {
    normals(noise_key(job_id, iteration, region), count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    // The known answers of models/README.md ("The noise contract"), printed by noise.py.
    #[test]
    fn keys_and_the_stream_match_the_contract() {
        assert_eq!(noise_key("job-7", 0, 2), 0x55c4_8944_3118_df80);
        assert_eq!(noise_key("job-7", 0, 2), 6180215514633658240);
        let words: Vec<u64> = (0..4).map(|n| nth_u64(0x55c4_8944_3118_df80, n)).collect();
        assert_eq!(
            words,
            [
                0x9789_e840_0678_69af,
                0x8037_3e16_90eb_e99c,
                0x75c1_41f2_af19_d555,
                0x937f_dd5d_16c7_1a2c
            ]
        );
        assert_eq!(noise_key("a", 1, 0), 0x8c61_98db_a2fa_8b6a);
        // SplitMix64 seeded with 0: its well-known first output.
        assert_eq!(nth_u64(0, 0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn normals_match_the_contract() {
        close(
            &normals(noise_key("job-7", 0, 2), 8),
            &[
                -1.02403295,
                -0.00542364782,
                -1.10623002,
                -0.573932946,
                0.36465773,
                1.55456305,
                2.25120592,
                -0.912169158,
            ],
        );
        close(
            &normals(noise_key("a", 1, 0), 3),
            &[-0.207371578, -0.0773101375, 0.491778135],
        );
        let latents = region_noise("job-7", 0, 2, 4 * 16 * 16);
        let picked: Vec<f32> = [0, 1, 255, 1023].iter().map(|&i| latents[i]).collect();
        close(&picked, &[-1.024033, -0.00542365, -1.4949894, -2.2217925]);
    }

    #[test]
    fn an_odd_count_drops_the_last_sine_and_prefixes_agree() {
        let key = noise_key("job-7", 0, 2);
        let seven = normals(key, 7);
        assert_eq!(seven.len(), 7);
        assert_eq!(seven[..], normals(key, 8)[..7]);
        assert_ne!(
            region_noise("job-7", 0, 2, 4),
            region_noise("job-7", 0, 3, 4)
        );
        assert_ne!(
            region_noise("job-7", 0, 2, 4),
            region_noise("job-7", 1, 2, 4)
        );
    }
}
