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

/// Which kernel family a prepared weight is laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayoutKind {
    /// N padded to 128, rows shuffled (epilogue tile 128), scales shuffled then 128x4.
    Trtllm,
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
            LayoutKind::Trtllm => trtllm_shuffled_row(n),
            LayoutKind::Cutlass | LayoutKind::CutlassLinearScales => n,
        }
    }

    pub fn prepare(w: &Nvfp4Weight, kind: LayoutKind) -> Self {
        let kb = w.k_blocks();
        let half_k = w.k / 2;
        match kind {
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
            packed[r * half_k..(r + 1) * half_k]
                .copy_from_slice(&self.weight[p * self.weight_row_bytes..p * self.weight_row_bytes + half_k]);
            for c in 0..kb {
                scales[r * kb + c] = self.scale[self.kind.scale_offset(p, c, self.scale_cols)];
            }
        }
        Nvfp4Weight::new(self.n, self.k, packed, scales, weight_scale_2)
    }

    /// Code byte `j` (of `K/2`) of logical row `n`.
    #[inline]
    pub fn code_byte(&self, n: usize, j: usize) -> u8 {
        let p = Self::physical_row(self.kind, n);
        self.weight[p * self.weight_row_bytes + j]
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
