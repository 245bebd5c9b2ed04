//! Weight and scale layouts.
//!
//! The canonical form is what ModelOpt writes: codes low-nibble-first `[N, K/2]` and linear E4M3
//! block scales `[N, K/16]`. Every backend layout is produced from it once at load time, and
//! converted back for checks; padding is always zero and never reaches an output.

use super::format::GROUP_SIZE;
use crate::error::{CResult, CandiffError};

/// Rows of one 128x4 scale tile.
pub const SWIZZLE_ROWS: usize = 128;
/// Scale columns of one 128x4 scale tile.
pub const SWIZZLE_COLS: usize = 4;
/// Bytes in one 128x4 tile.
const SWIZZLE_TILE: usize = SWIZZLE_ROWS * SWIZZLE_COLS;
/// trtllm-gen's epilogue tile along M (FlashInfer `epilogue_tile_m`); N is padded to it.
pub const TRTLLM_TILE_N: usize = 128;
/// cutlass/cudnn pad both N and K to this.
pub const CUTLASS_ALIGN: usize = 32;
/// Packed bytes covered by one scale column (16 codes, two per byte).
const BYTES_PER_SCALE: usize = GROUP_SIZE / 2;

#[inline]
pub fn ceil_to(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Flat offset of scale `(r, c)` in a 128x4-swizzled buffer of padded width `cpad`.
#[inline]
pub fn swizzle_offset(r: usize, c: usize, cpad: usize) -> usize {
    (r / SWIZZLE_ROWS) * (cpad / SWIZZLE_COLS) * SWIZZLE_TILE
        + (c / SWIZZLE_COLS) * SWIZZLE_TILE
        + (r % 32) * 16
        + ((r % SWIZZLE_ROWS) / 32) * 4
        + c % SWIZZLE_COLS
}

/// Padded `[rows, cols]` of the swizzled form of a `[rows, cols]` scale matrix.
pub fn swizzled_shape(rows: usize, cols: usize) -> (usize, usize) {
    (ceil_to(rows, SWIZZLE_ROWS), ceil_to(cols, SWIZZLE_COLS))
}

/// Linear `[rows, cols]` scales to the 128x4 layout (zero padding).
pub fn swizzle_scales(linear: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    debug_assert_eq!(linear.len(), rows * cols);
    let (rp, cp) = swizzled_shape(rows, cols);
    let mut out = vec![0u8; rp * cp];
    for r in 0..rows {
        for c in 0..cols {
            out[swizzle_offset(r, c, cp)] = linear[r * cols + c];
        }
    }
    out
}

/// The 128x4 layout back to linear `[rows, cols]`, dropping the padding.
pub fn unswizzle_scales(sw: &[u8], rows: usize, cols: usize) -> CResult<Vec<u8>> {
    let (rp, cp) = swizzled_shape(rows, cols);
    if sw.len() != rp * cp {
        return Err(CandiffError::layout(format!(
            "swizzled scales for [{rows}, {cols}] must hold {rp}x{cp} = {} bytes, found {}",
            rp * cp,
            sw.len()
        )));
    }
    let mut out = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[r * cols + c] = sw[swizzle_offset(r, c, cp)];
        }
    }
    Ok(out)
}

/// Where trtllm-gen's row shuffle puts row `old` (within its group of 32 rows: `4a + b -> 8b + a`).
#[inline]
pub fn trtllm_shuffled_row(old: usize) -> usize {
    (old / 32) * 32 + (old % 4) * 8 + (old % 32) / 4
}

/// Inverse of [`trtllm_shuffled_row`].
#[inline]
pub fn trtllm_original_row(new: usize) -> usize {
    (new / 32) * 32 + (new % 8) * 4 + (new % 32) / 8
}

/// One linear layer's NVFP4 weight in canonical form.
#[derive(Debug, Clone, PartialEq)]
pub struct Nvfp4Weight {
    /// Output features.
    pub n: usize,
    /// Input features (a multiple of 16).
    pub k: usize,
    /// E2M1 codes, low nibble first, `[n, k/2]`.
    pub packed: Vec<u8>,
    /// E4M3 block scales, linear `[n, k/16]`.
    pub scales: Vec<u8>,
    /// Per-tensor dequantization scale (`1 / global_scale`).
    pub weight_scale_2: f32,
}

impl Nvfp4Weight {
    /// Checks the invariants every layout conversion relies on.
    pub fn new(n: usize, k: usize, packed: Vec<u8>, scales: Vec<u8>, weight_scale_2: f32) -> CResult<Self> {
        if k == 0 || n == 0 || !k.is_multiple_of(GROUP_SIZE) {
            return Err(CandiffError::layout(format!(
                "an NVFP4 weight needs N > 0 and K a positive multiple of {GROUP_SIZE}, found N = {n}, K = {k}"
            )));
        }
        if packed.len() != n * k / 2 {
            return Err(CandiffError::layout(format!(
                "packed codes for [{n}, {k}] must hold {} bytes, found {}",
                n * k / 2,
                packed.len()
            )));
        }
        if scales.len() != n * k / GROUP_SIZE {
            return Err(CandiffError::layout(format!(
                "block scales for [{n}, {k}] must hold {} bytes, found {}",
                n * k / GROUP_SIZE,
                scales.len()
            )));
        }
        Ok(Self { n, k, packed, scales, weight_scale_2 })
    }

    pub fn k_blocks(&self) -> usize {
        self.k / GROUP_SIZE
    }

    /// Dequantized `[n, k]` in f32: `(e2m1 * s) * weight_scale_2`, the reference operation order.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        let kb = self.k_blocks();
        for r in 0..self.n {
            for b in 0..kb {
                let s = super::format::e4m3_decode(self.scales[r * kb + b]);
                for j in 0..BYTES_PER_SCALE {
                    let byte = self.packed[r * self.k / 2 + b * BYTES_PER_SCALE + j];
                    let (lo, hi) = super::format::unpack_byte(byte, super::format::NibbleOrder::Low);
                    let base = r * self.k + b * GROUP_SIZE + 2 * j;
                    out[base] = (super::format::e2m1_decode(lo) * s) * self.weight_scale_2;
                    out[base + 1] = (super::format::e2m1_decode(hi) * s) * self.weight_scale_2;
                }
            }
        }
        out
    }
}

/// Codes per K tile of the Hopper kernels' code order (one 32-byte piece of a row).
pub const SM90_CODE_TILE: usize = 64;

/// Where [`LayoutKind::TrtllmSm90`] keeps code `k` (0..64) of a row's K tile: the 32-bit
/// little-endian word (0..8) of the tile's 32 bytes and the bit positions in it of the code's bits
/// 0..3 (mantissa, two exponent bits, sign).
///
/// Why: the wgmma kernels dequantize into A fragments, bf16 pairs holding `code x 2^-126` (the
/// magnitude bits at bf16 bits 8:6, the sign at 15; the second code 16 bits up). Thread `q` of a
/// quad needs, per K tile and row, the pairs (k, k + 1) with k = 16 s + 8 h + 2 q (steps s = 0..3,
/// halves h = 0, 1): 16 codes, stored here as its own 8 bytes (words 2q, 2q + 1; word w serves
/// steps 2w and 2w + 1). Inside a word the four pairs j = 2 (s % 2) + h sit where four cheap
/// operations put them in place ([`sm90_pair_bits`]: a mask; two rotations and a mask; a mask, a
/// multiplication and a mask) instead of five integer operations per pair from the linear order.
/// The GEMV (M <= 16) reads the same words: its thread takes a whole K tile.
pub fn sm90_code_bits(k: usize) -> (usize, [usize; 4]) {
    debug_assert!(k < SM90_CODE_TILE);
    let (q, h, half, step) = ((k % 8) / 2, k % 2, (k / 8) % 2, k / 16);
    let (w, j) = (step / 2, 2 * (step % 2) + half);
    // Where the pair's code `h` ends up: bits 6, 7, 8 (magnitude) and 15 (sign), +16 for h = 1.
    let target = |b: usize| 16 * h + [6, 7, 8, 15][b];
    let bits = std::array::from_fn(|b| match j {
        0 => target(b),
        1 => (target(b) + 32 - SM90_ROT1 as usize) % 32,
        2 => (target(b) + 32 - SM90_ROT2 as usize) % 32,
        // Sources that the multiplication by SM90_PAIR3_MUL moves onto the targets.
        _ => [[4, 0, 1, 3], [20, 16, 17, 19]][h][b],
    });
    (2 * q + w, bits)
}

/// The placed magnitude and sign bits of both halves of an A-fragment pair.
pub const SM90_PAIR_BITS: u32 = 0x81C0_81C0;
/// Left rotations placing pairs 1 and 2 of a word.
pub const SM90_ROT1: u32 = 10;
pub const SM90_ROT2: u32 = 13;
/// Pair 3: its bits (SM90_PAIR3_SRC) times 2^2 + 2^7 + 2^12 land on SM90_PAIR_BITS without carries
/// into them (the sums of the three shifted copies never meet there: checked over all 256 values
/// in the tests).
pub const SM90_PAIR3_SRC: u32 = 0x001B_001B;
pub const SM90_PAIR3_MUL: u32 = (1 << 2) | (1 << 7) | (1 << 12);

/// Pair `j` (0..4) of a word of the Hopper code order as bf16 pair bits (`code x 2^-126`, signs
/// in place): the kernels' operations (kernels/nvfp4_sm90.cu `sm90_pair`), as the CPU reference.
pub fn sm90_pair_bits(word: u32, j: usize) -> u32 {
    match j {
        0 => word & SM90_PAIR_BITS,
        1 => word.rotate_left(SM90_ROT1) & SM90_PAIR_BITS,
        2 => word.rotate_left(SM90_ROT2) & SM90_PAIR_BITS,
        _ => ((word & SM90_PAIR3_SRC).wrapping_mul(SM90_PAIR3_MUL)) & SM90_PAIR_BITS,
    }
}

/// Linear code bytes (whole 64-wide K tiles) to the Hopper code order, in place. Word (q, w) of a
/// tile takes the code bytes 16w + 4j + q (pair j = its two codes) through one table per pair:
/// 0.5 lookups per code, over the cores for large weights (FLUX.1-dev holds 1.2e10 codes).
fn sm90_reorder_codes(weight: &mut [u8]) {
    static TABLES: std::sync::OnceLock<[[u32; 256]; 4]> = std::sync::OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        std::array::from_fn(|j| {
            std::array::from_fn(|byte| {
                // Pair j of word (q = 0, w = 0) is codes k0 = 8j and k0 + 1; positions do not depend on q, w.
                (0..8).fold(0u32, |acc, bit| {
                    let (h, b) = (bit / 4, bit % 4);
                    let (_, bits) = sm90_code_bits(8 * j + h);
                    acc | ((((byte >> bit) & 1) as u32) << bits[b])
                })
            })
        })
    });
    const TILE_BYTES: usize = SM90_CODE_TILE / 2;
    let reorder = |chunk: &mut [u8]| {
        let mut linear = [0u8; TILE_BYTES];
        for tile in chunk.chunks_exact_mut(TILE_BYTES) {
            linear.copy_from_slice(tile);
            for q in 0..4 {
                for w in 0..2 {
                    let word = (0..4).fold(0u32, |acc, j| acc | tables[j][linear[16 * w + 4 * j + q] as usize]);
                    tile[8 * q + 4 * w..8 * q + 4 * w + 4].copy_from_slice(&word.to_le_bytes());
                }
            }
        }
    };
    debug_assert!(weight.len().is_multiple_of(TILE_BYTES));
    const PARALLEL_MIN_BYTES: usize = 1 << 20;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    if weight.len() < PARALLEL_MIN_BYTES || threads == 1 {
        reorder(weight);
        return;
    }
    let band = weight.len().div_ceil(threads).next_multiple_of(TILE_BYTES);
    std::thread::scope(|sc| {
        for chunk in weight.chunks_mut(band) {
            sc.spawn(move || reorder(chunk));
        }
    });
}

/// Code `k` of a prepared row (its bytes, physical row already chosen).
#[inline]
pub fn code_in_row(kind: LayoutKind, row: &[u8], k: usize) -> u8 {
    match kind {
        LayoutKind::TrtllmSm90 => {
            let tile = &row[(k / SM90_CODE_TILE) * (SM90_CODE_TILE / 2)..];
            let (word, bits) = sm90_code_bits(k % SM90_CODE_TILE);
            bits.iter().enumerate().fold(0u8, |c, (b, &bit)| c | (((tile[4 * word + bit / 8] >> (bit % 8)) & 1) << b))
        }
        _ => (row[k / 2] >> (4 * (k % 2))) & 0xF,
    }
}

/// Which kernel family a prepared weight is laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayoutKind {
    /// N padded to 128, rows shuffled (epilogue tile 128), scales shuffled then 128x4.
    Trtllm,
    /// [`LayoutKind::Trtllm`] with each row's codes reordered within every 64-wide K tile for our
    /// Hopper kernels ([`sm90_code_bits`]): what the trtllm variant prepares on an sm_90 GPU.
    TrtllmSm90,
    /// N and K padded to 32, 128x4 scales (shared by the cutlass and cudnn variants).
    Cutlass,
    /// The cutlass weight padding with linear `[N, K/16]` scales: cuDNN's engines on GPUs without
    /// FP4 tensor cores reject 128x4-reordered scales, so the cudnn variant uses this there.
    CutlassLinearScales,
}

impl LayoutKind {
    /// Whether scales are 128x4-swizzled (else linear rows of `scale_cols`).
    pub fn swizzled_scales(self) -> bool {
        !matches!(self, LayoutKind::CutlassLinearScales)
    }

    /// Offset of scale (physical row `p`, block `b`) in a buffer `scale_cols` wide.
    #[inline]
    pub fn scale_offset(self, p: usize, b: usize, scale_cols: usize) -> usize {
        if self.swizzled_scales() {
            swizzle_offset(p, b, scale_cols)
        } else {
            p * scale_cols + b
        }
    }
}

/// A weight in one backend's layout, ready for its kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedLayout {
    pub kind: LayoutKind,
    pub n: usize,
    pub k: usize,
    /// Row-major bytes `[weight_rows, weight_row_bytes]`.
    pub weight: Vec<u8>,
    pub weight_rows: usize,
    pub weight_row_bytes: usize,
    /// 128x4-swizzled scales `[scale_rows, scale_cols]`.
    pub scale: Vec<u8>,
    pub scale_rows: usize,
    pub scale_cols: usize,
}

impl PreparedLayout {
    /// Physical row holding logical output row `n`.
    #[inline]
    pub fn physical_row(kind: LayoutKind, n: usize) -> usize {
        match kind {
            LayoutKind::Trtllm | LayoutKind::TrtllmSm90 => trtllm_shuffled_row(n),
            LayoutKind::Cutlass | LayoutKind::CutlassLinearScales => n,
        }
    }

    pub fn prepare(w: &Nvfp4Weight, kind: LayoutKind) -> Self {
        let kb = w.k_blocks();
        let half_k = w.k / 2;
        match kind {
            LayoutKind::TrtllmSm90 => {
                let mut p = Self::prepare(w, LayoutKind::Trtllm);
                sm90_reorder_codes(&mut p.weight);
                p.kind = kind;
                p
            }
            LayoutKind::Trtllm => {
                let rows = ceil_to(w.n, TRTLLM_TILE_N);
                let scale_cols = ceil_to(kb, SWIZZLE_COLS);
                // K/16 not a multiple of 4: the kernel reads whole 4-scale groups, so the codes get
                // the matching zero bytes too.
                let row_bytes = half_k + (scale_cols - kb) * BYTES_PER_SCALE;
                let mut weight = vec![0u8; rows * row_bytes];
                let mut shuffled_scales = vec![0u8; rows * kb];
                for old in 0..w.n {
                    let new = trtllm_shuffled_row(old);
                    weight[new * row_bytes..new * row_bytes + half_k]
                        .copy_from_slice(&w.packed[old * half_k..(old + 1) * half_k]);
                    shuffled_scales[new * kb..(new + 1) * kb].copy_from_slice(&w.scales[old * kb..(old + 1) * kb]);
                }
                let scale = swizzle_scales(&shuffled_scales, rows, kb);
                Self {
                    kind,
                    n: w.n,
                    k: w.k,
                    weight,
                    weight_rows: rows,
                    weight_row_bytes: row_bytes,
                    scale,
                    scale_rows: rows,
                    scale_cols,
                }
            }
            LayoutKind::Cutlass | LayoutKind::CutlassLinearScales => {
                let rows = ceil_to(w.n, CUTLASS_ALIGN);
                let row_bytes = ceil_to(w.k, CUTLASS_ALIGN) / 2;
                let mut weight = vec![0u8; rows * row_bytes];
                for r in 0..w.n {
                    weight[r * row_bytes..r * row_bytes + half_k]
                        .copy_from_slice(&w.packed[r * half_k..(r + 1) * half_k]);
                }
                let (scale_rows, scale_cols, scale) = if kind.swizzled_scales() {
                    let (r, c) = swizzled_shape(w.n, kb);
                    (r, c, swizzle_scales(&w.scales, w.n, kb))
                } else {
                    (w.n, kb, w.scales.clone())
                };
                Self {
                    kind,
                    n: w.n,
                    k: w.k,
                    weight,
                    weight_rows: rows,
                    weight_row_bytes: row_bytes,
                    scale,
                    scale_rows,
                    scale_cols,
                }
            }
        }
    }

    /// Back to canonical form (padding dropped).
    pub fn to_canonical(&self, weight_scale_2: f32) -> CResult<Nvfp4Weight> {
        let kb = self.k / GROUP_SIZE;
        let half_k = self.k / 2;
        let mut packed = vec![0u8; self.n * half_k];
        let mut scales = vec![0u8; self.n * kb];
        for r in 0..self.n {
            let p = Self::physical_row(self.kind, r);
            let row = &self.weight[p * self.weight_row_bytes..(p + 1) * self.weight_row_bytes];
            for (j, byte) in packed[r * half_k..(r + 1) * half_k].iter_mut().enumerate() {
                *byte = code_in_row(self.kind, row, 2 * j) | (code_in_row(self.kind, row, 2 * j + 1) << 4);
            }
            for c in 0..kb {
                scales[r * kb + c] = self.scale[self.kind.scale_offset(p, c, self.scale_cols)];
            }
        }
        Nvfp4Weight::new(self.n, self.k, packed, scales, weight_scale_2)
    }

    /// E2M1 code `k` of logical row `n`.
    #[inline]
    pub fn code(&self, n: usize, k: usize) -> u8 {
        let p = Self::physical_row(self.kind, n);
        code_in_row(self.kind, &self.weight[p * self.weight_row_bytes..(p + 1) * self.weight_row_bytes], k)
    }

    /// Scale of logical row `n`, block `b`.
    #[inline]
    pub fn scale_byte(&self, n: usize, b: usize) -> u8 {
        let p = Self::physical_row(self.kind, n);
        self.scale[self.kind.scale_offset(p, b, self.scale_cols)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trtllm_row_shuffle_is_a_permutation_of_each_32_rows() {
        let mut seen = [false; 64];
        for old in 0..64 {
            let new = trtllm_shuffled_row(old);
            assert_eq!(new / 32, old / 32);
            assert!(!seen[new]);
            seen[new] = true;
            assert_eq!(trtllm_original_row(new), old);
        }
    }

    /// The bf16 pair bits of codes (lo, hi) x 2^-126: magnitude at bits 8:6, sign at 15.
    fn placed(lo: u8, hi: u8) -> u32 {
        let one = |c: u8| ((c as u32 & 7) << 6) | ((c as u32 & 8) << 12);
        one(lo) | (one(hi) << 16)
    }

    #[test]
    fn sm90_code_order_stores_every_bit_once() {
        let mut seen = [false; SM90_CODE_TILE / 2 * 8];
        for k in 0..SM90_CODE_TILE {
            let (word, bits) = sm90_code_bits(k);
            for bit in bits {
                assert!(bit < 32 && !seen[32 * word + bit], "k = {k}");
                seen[32 * word + bit] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    /// Every pair of every word, for all 256 values of its two codes (the other codes random):
    /// the kernels' operations give exactly the placed bits of the codes the pair stands for.
    #[test]
    fn sm90_pairs_come_out_placed_for_every_code_value() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand4 = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state & 0xF) as u8
        };
        for q in 0..4 {
            for w in 0..2 {
                for j in 0..4 {
                    // Row v holds the pair's codes v & 15 and v >> 4.
                    let k0 = 16 * (2 * w + j / 2) + 8 * (j % 2) + 2 * q;
                    let n = 256;
                    let mut codes: Vec<u8> = (0..n * SM90_CODE_TILE).map(|_| rand4()).collect();
                    for v in 0..n {
                        codes[v * SM90_CODE_TILE + k0] = (v & 0xF) as u8;
                        codes[v * SM90_CODE_TILE + k0 + 1] = (v >> 4) as u8;
                    }
                    let packed: Vec<u8> = codes.chunks(2).map(|c| c[0] | (c[1] << 4)).collect();
                    let wt = Nvfp4Weight::new(n, SM90_CODE_TILE, packed, vec![0x38; n * 4], 1.0).unwrap();
                    let p = PreparedLayout::prepare(&wt, LayoutKind::TrtllmSm90);
                    for v in 0..n {
                        let at = trtllm_shuffled_row(v) * p.weight_row_bytes + 8 * q + 4 * w;
                        let word = u32::from_le_bytes(p.weight[at..at + 4].try_into().unwrap());
                        let c = &codes[v * SM90_CODE_TILE + k0..];
                        assert_eq!(
                            sm90_pair_bits(word, j),
                            placed(c[0], c[1]),
                            "thread {q}, word {w}, pair {j}, codes {v:#x}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sm90_code_order_round_trips_with_padding() {
        // K = 80: one whole 64-wide tile and a padded one; N = 3: padded rows.
        let (n, k) = (3, 80);
        let packed: Vec<u8> = (0..n * k / 2).map(|i| (i * 37 + 11) as u8).collect();
        let scales: Vec<u8> = (0..n * k / 16).map(|i| (i * 13 + 40) as u8).collect();
        let w = Nvfp4Weight::new(n, k, packed, scales, 0.5).unwrap();
        let p = PreparedLayout::prepare(&w, LayoutKind::TrtllmSm90);
        let linear = PreparedLayout::prepare(&w, LayoutKind::Trtllm);
        assert_eq!(
            (p.weight_rows, p.weight_row_bytes, &p.scale),
            (linear.weight_rows, linear.weight_row_bytes, &linear.scale)
        );
        assert_ne!(p.weight, linear.weight);
        assert_eq!(p.to_canonical(0.5).unwrap(), w);
        for r in 0..n {
            for kk in 0..k {
                assert_eq!(p.code(r, kk), linear.code(r, kk));
            }
        }
    }

    /// A weight large enough for the reorder to run over several threads (1 MiB of codes).
    #[test]
    fn sm90_code_order_of_a_large_weight_round_trips() {
        let (n, k) = (512usize, 4096usize);
        let packed: Vec<u8> = (0..n * k / 2).map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
        let w = Nvfp4Weight::new(n, k, packed, vec![0x38; n * k / 16], 1.0).unwrap();
        let p = PreparedLayout::prepare(&w, LayoutKind::TrtllmSm90);
        assert_eq!(p.to_canonical(1.0).unwrap(), w);
    }

    #[test]
    fn swizzle_offset_matches_the_tile_formula_inverse() {
        // reshape(R/128, C/4, 32, 4, 4).permute(0, 3, 2, 1, 4) read back: the offset of (r, c)
        // decomposes into (r/128, c/4, r%32, (r%128)/32, c%4) in that memory order.
        let (rows, cols) = (256, 8);
        let mut hit = vec![false; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let o = swizzle_offset(r, c, cols);
                assert!(!hit[o]);
                hit[o] = true;
            }
        }
    }
}
