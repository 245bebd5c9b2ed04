//! Launchers of kernels/fused.cu (the fused element-wise ops of src/models/fused.rs).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
use candle_core::{DType, Layout, Result};
use half::{bf16, f16};

use super::{function_in, view, wrap, Kernels};

/// Threads per row block of `ln_modulate` (`kThreads` in kernels/fused.cu).
const LN_THREADS: u32 = 256;
/// Bytes per access of the vectorized `gated_add`, and the f32 values in one such access.
const VEC_BYTES: usize = 16;
const F32_PER_VEC: usize = 4;
/// Threads per block and blocks of the grid-stride `gated_add`.
const EW_THREADS: u32 = 256;
const EW_MAX_BLOCKS: u64 = 65_535;

fn suffix(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => candle_core::bail!("fused ops take f32, bf16 or f16, found {d:?}"),
    })
}

/// The element offsets at which each layout's data starts (for [`super::row_vec`]'s alignment).
fn starts(layouts: &[&Layout]) -> Vec<usize> {
    layouts.iter().map(|l| l.start_offset()).collect()
}

/// Output buffer of `n` elements of `dtype`.
fn alloc(s: &CudaStorage, dtype: DType, n: usize) -> Result<CudaStorageSlice> {
    let stream = s.device.cuda_stream();
    // SAFETY: the kernels write every element.
    Ok(unsafe {
        match dtype {
            DType::F32 => CudaStorageSlice::F32(stream.alloc::<f32>(n).map_err(wrap("alloc"))?),
            DType::BF16 => CudaStorageSlice::BF16(stream.alloc::<bf16>(n).map_err(wrap("alloc"))?),
            _ => CudaStorageSlice::F16(stream.alloc::<f16>(n).map_err(wrap("alloc"))?),
        }
    })
}

/// Pushes a contiguous view of `s` of the element type of `dtype`.
macro_rules! with_view {
    ($dtype:expr, $s:expr, $l:expr, $what:expr, |$v:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                let $v = view::<f32>($s, $l, $what)?;
                $body
            }
            DType::BF16 => {
                let $v = view::<bf16>($s, $l, $what)?;
                $body
            }
            _ => {
                let $v = view::<f16>($s, $l, $what)?;
                $body
            }
        }
    };
}

/// `y = LayerNorm(x) * (1 + scale) + shift` over rows of `c`; `x` has `s` rows per sample, the
/// f32 modulation `sm` (1 or `s`).
#[allow(clippy::too_many_arguments)]
pub fn ln_modulate(
    x: &CudaStorage,
    xl: &Layout,
    shift: &CudaStorage,
    shl: &Layout,
    scale: &CudaStorage,
    scl: &Layout,
    (rows, c, s, sm): (usize, usize, usize, usize),
    eps: f32,
) -> Result<CudaStorage> {
    let dtype = x.dtype();
    // bf16 rows in registers where they fit (the form fp8 mode's ln_modulate_fp8 shares, so that
    // both see the same statistics), else one thread per element and pass.
    let vec = if dtype == DType::BF16 { super::row_vec(c, &starts(&[xl, shl, scl])) } else { None };
    let (name, threads) =
        super::row_kernel(vec, "ln_modulate_rows", format!("ln_modulate_{}", suffix(dtype)?), LN_THREADS);
    let dev = &x.device;
    let f = function_in(dev, Kernels::Fused, &name)?;
    let stream = dev.cuda_stream();
    let mut y = alloc(x, dtype, rows * c)?;
    let (shv, scv) = (view::<f32>(shift, shl, "shift")?, view::<f32>(scale, scl, "scale")?);
    let (c_i, s_i, sm_i) = (c as i32, s as i32, sm as i32);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    with_view!(dtype, x, xl, "x", |xv| {
        let mut b = stream.launch_builder(&f);
        b.arg(&xv).arg(&shv).arg(&scv);
        match &mut y {
            CudaStorageSlice::F32(o) => b.arg(o),
            CudaStorageSlice::BF16(o) => b.arg(o),
            CudaStorageSlice::F16(o) => b.arg(o),
            _ => unreachable!("allocated above"),
        };
        b.arg(&c_i).arg(&s_i).arg(&sm_i).arg(&eps);
        // SAFETY: argument types match the kernel; `rows * c` bounds x and y, the caller checked
        // that shift/scale hold `rows / s * sm` rows of `c`.
        unsafe { b.launch(cfg) }.map_err(wrap("ln_modulate"))?;
    });
    Ok(CudaStorage { slice: y, device: dev.clone() })
}

/// [`ln_modulate`] of bf16 rows quantized in the same kernel as fp8-mode layers read their input
/// (each value rounded to bf16, then E4M3 with one f32 scale per row): byte for byte
/// `ln_modulate` followed by the layers' own quantization, without the bf16 output.
#[allow(clippy::too_many_arguments)]
pub fn ln_modulate_fp8(
    x: &CudaStorage,
    xl: &Layout,
    shift: &CudaStorage,
    shl: &Layout,
    scale: &CudaStorage,
    scl: &Layout,
    (rows, c, s, sm): (usize, usize, usize, usize),
    eps: f32,
) -> Result<(CudaSlice<u8>, CudaSlice<f32>)> {
    if x.dtype() != DType::BF16 {
        candle_core::bail!("ln_modulate_fp8 takes bf16 activations, found {:?}", x.dtype());
    }
    let dev = &x.device;
    // The same kernel choice as `ln_modulate` of these inputs: byte for byte its output quantized.
    let vec = super::row_vec(c, &starts(&[xl, shl, scl]));
    let (name, threads) = super::row_kernel(vec, "ln_modulate_fp8_rows", "ln_modulate_fp8".into(), LN_THREADS);
    let f = function_in(dev, Kernels::Fused, &name)?;
    let stream = dev.cuda_stream();
    // SAFETY: the kernel writes every element of both.
    let mut q = unsafe { stream.alloc::<u8>(rows * c) }.map_err(wrap("alloc"))?;
    let mut sa = unsafe { stream.alloc::<f32>(rows) }.map_err(wrap("alloc"))?;
    let xv = view::<bf16>(x, xl, "x")?;
    let (shv, scv) = (view::<f32>(shift, shl, "shift")?, view::<f32>(scale, scl, "scale")?);
    let (c_i, s_i, sm_i) = (c as i32, s as i32, sm as i32);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&f);
    b.arg(&xv).arg(&shv).arg(&scv).arg(&mut q).arg(&mut sa).arg(&c_i).arg(&s_i).arg(&sm_i).arg(&eps);
    // SAFETY: argument types match the kernel; `rows * c` bounds x and q, the caller checked that
    // shift/scale hold `rows / s * sm` rows of `c`.
    unsafe { b.launch(cfg) }.map_err(wrap("ln_modulate_fp8"))?;
    Ok((q, sa))
}

/// `y = x + u * gate` with f32 `gate` rows as in [`ln_modulate`].
#[allow(clippy::too_many_arguments)]
pub fn gated_add(
    x: &CudaStorage,
    xl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
    gate: &CudaStorage,
    gl: &Layout,
    (rows, c, s, sm): (usize, usize, usize, usize),
) -> Result<CudaStorage> {
    let dtype = x.dtype();
    if u.dtype() != dtype {
        candle_core::bail!("gated_add: x is {dtype:?}, u is {:?}", u.dtype());
    }
    let es = dtype.size_in_bytes();
    let per_vec = VEC_BYTES / es;
    let aligned = |l: &Layout| (l.start_offset() * es).is_multiple_of(VEC_BYTES);
    // The vector kernel's index arithmetic is 32-bit (fast divisions): fewer than 2^31 elements.
    let vec = c % per_vec == 0
        && aligned(xl)
        && aligned(ul)
        && gl.start_offset().is_multiple_of(F32_PER_VEC)
        && rows * c < FastDiv::LIMIT;
    let name = format!("gated_add{}_{}", if vec { "_vec" } else { "" }, suffix(dtype)?);
    let dev = &x.device;
    let f = function_in(dev, Kernels::Fused, &name)?;
    let stream = dev.cuda_stream();
    let n = rows * c;
    let mut y = alloc(x, dtype, n)?;
    let gv = view::<f32>(gate, gl, "gate")?;
    // The vector kernel counts 16-byte vectors.
    let units = if vec { n / per_vec } else { n };
    let (n_i, c_i, s_i, sm_i) = (units as i64, c as i32, s as i32, sm as i32);
    let blocks = (units as u64).div_ceil(EW_THREADS as u64).clamp(1, EW_MAX_BLOCKS) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (EW_THREADS, 1, 1), shared_mem_bytes: 0 };
    let divs = if vec { Some((FastDiv::new(c)?, FastDiv::new(s)?)) } else { None };
    with_view!(dtype, x, xl, "x", |xv| {
        with_view!(dtype, u, ul, "u", |uv| {
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&uv).arg(&gv);
            match &mut y {
                CudaStorageSlice::F32(o) => b.arg(o),
                CudaStorageSlice::BF16(o) => b.arg(o),
                CudaStorageSlice::F16(o) => b.arg(o),
                _ => unreachable!("allocated above"),
            };
            b.arg(&n_i).arg(&c_i).arg(&s_i).arg(&sm_i);
            if let Some((fc, fs)) = &divs {
                b.arg(&fc.mul).arg(&fc.shift).arg(&fs.mul).arg(&fs.shift);
            }
            // SAFETY: as in ln_modulate; `n` bounds x, u and y.
            unsafe { b.launch(cfg) }.map_err(wrap("gated_add"))?;
        })
    });
    Ok(CudaStorage { slice: y, device: dev.clone() })
}

/// Channel RMS norm over `[B, C, P]` (optionally followed by SiLU), f32 `gamma` `[C]`.
pub fn channel_rms(
    x: &CudaStorage,
    xl: &Layout,
    gamma: &CudaStorage,
    gl: &Layout,
    (b, c, p): (usize, usize, usize),
    eps: f32,
    silu: bool,
) -> Result<CudaStorage> {
    let dtype = x.dtype();
    let name = format!("channel_rms_{}", suffix(dtype)?);
    let dev = &x.device;
    let f = function_in(dev, Kernels::Fused, &name)?;
    let stream = dev.cuda_stream();
    let mut y = alloc(x, dtype, b * c * p)?;
    let gv = view::<f32>(gamma, gl, "gamma")?;
    let total = (b * p) as u64;
    let (c_i, p_i, t_i, s_i) = (c as i32, p as i64, total as i64, silu as i32);
    let blocks = total.div_ceil(EW_THREADS as u64).clamp(1, EW_MAX_BLOCKS) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (EW_THREADS, 1, 1), shared_mem_bytes: 0 };
    with_view!(dtype, x, xl, "x", |xv| {
        let mut bld = stream.launch_builder(&f);
        bld.arg(&xv).arg(&gv);
        match &mut y {
            CudaStorageSlice::F32(o) => bld.arg(o),
            CudaStorageSlice::BF16(o) => bld.arg(o),
            CudaStorageSlice::F16(o) => bld.arg(o),
            _ => unreachable!("allocated above"),
        };
        bld.arg(&c_i).arg(&p_i).arg(&t_i).arg(&eps).arg(&s_i);
        // SAFETY: argument types match the kernel; b*c*p bounds x and y, gamma holds c values.
        unsafe { bld.launch(cfg) }.map_err(wrap("channel_rms"))?;
    });
    Ok(CudaStorage { slice: y, device: dev.clone() })
}

/// `y = act(x + bias)` over rows of `c` (`bias` in x's dtype), `act` = identity or tanh-GELU.
pub fn bias_act(
    x: &CudaStorage,
    xl: &Layout,
    bias: &CudaStorage,
    bl: &Layout,
    c: usize,
    gelu: bool,
) -> Result<CudaStorage> {
    let dtype = x.dtype();
    let name = format!("bias_act_{}", suffix(dtype)?);
    let dev = &x.device;
    let f = function_in(dev, Kernels::Fused, &name)?;
    let stream = dev.cuda_stream();
    let n = xl.shape().elem_count();
    if bias.dtype() != dtype {
        candle_core::bail!("bias_act: x is {dtype:?}, bias is {:?}", bias.dtype());
    }
    let mut y = alloc(x, dtype, n)?;
    let (n_i, c_i, g_i) = (n as i64, c as i32, gelu as i32);
    let blocks = (n as u64).div_ceil(EW_THREADS as u64).clamp(1, EW_MAX_BLOCKS) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (EW_THREADS, 1, 1), shared_mem_bytes: 0 };
    with_view!(dtype, x, xl, "x", |xv| {
        with_view!(dtype, bias, bl, "bias", |bv| {
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&bv);
            match &mut y {
                CudaStorageSlice::F32(o) => b.arg(o),
                CudaStorageSlice::BF16(o) => b.arg(o),
                CudaStorageSlice::F16(o) => b.arg(o),
                _ => unreachable!("allocated above"),
            };
            b.arg(&n_i).arg(&c_i).arg(&g_i);
            // SAFETY: argument types match the kernel; n bounds x and y, bias holds c values.
            unsafe { b.launch(cfg) }.map_err(wrap("bias_act"))?;
        })
    });
    Ok(CudaStorage { slice: y, device: dev.clone() })
}

/// Threads per block of `qk_norm_rope` (one warp per head row, or per `QK_ROWS_PER_WARP` rows).
const QK_THREADS: u32 = 256;
/// Head rows of one token per warp on the four-per-lane path (when the head count allows):
/// all loaded before use, for more bytes in flight than one 256-byte row per warp.
/// `CANDIFF_QK_ROWS=1|2` sets fewer (1 is the former one-row kernel), for comparisons.
const QK_ROWS_PER_WARP: usize = 4;

fn qk_rows_per_warp() -> usize {
    static ROWS: OnceLock<usize> = OnceLock::new();
    *ROWS.get_or_init(|| match std::env::var("CANDIFF_QK_ROWS").as_deref() {
        Ok("1") => 1,
        Ok("2") => 2,
        _ => QK_ROWS_PER_WARP,
    })
}
/// Whether `qk_norm_rope` may take eight 16-bit values per lane (half a warp per row group);
/// `CANDIFF_QK_LANE8=0` keeps four per lane (a warp per row group), for A/B measurements.
fn qk_lane8() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("CANDIFF_QK_LANE8").as_deref() != Ok("0"))
}

/// (mul, shift) of the fast divisions of `qk_norm_rope`'s row index by the head count, the
/// sequence length and the heads per piece (kernels/fused.cu `QkDivs`, passed by value).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct QkDivs {
    heads: FastDiv,
    s_len: FastDiv,
    hl: FastDiv,
}

// SAFETY: plain `repr(C)` u32 fields, the kernel's struct of six unsigned ints.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for QkDivs {}

/// Most head rows of one `qk_norm_rope` launch: its thread and row indices are 32-bit (fast
/// divisions need rows below 2^31, and each row may take a warp of 32 threads), so 2^27 (~2.8M
/// tokens of 48 heads).
const QK_MAX_ROWS: usize = 1 << 27;

/// Head size the four-per-lane path of `qk_norm_rope` covers (a warp x 4).
const VEC4_ROW: usize = 128;

pub use crate::models::fused::{FastDiv, HeadsIn, HeadsOut};

/// A storage and its layout (a RoPE table).
pub type Table<'a> = (&'a CudaStorage, &'a Layout);

/// Per-head RMSNorm (when `w` is given; it needs `rope`) then interleaved RoPE (when `rope`
/// (cos, sin) is given), or a plain copy, of the `[B, S, H, D]` rows read as `src` says into `y`
/// as `dst` says. The caller guarantees that every offset lies inside `x` and `y`.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope(
    x: &CudaStorage,
    src: HeadsIn,
    (b, s, h, d): (usize, usize, usize, usize),
    w: Option<(&CudaStorage, &Layout)>,
    rope: Option<(Table, Table)>,
    eps: f32,
    y: &mut CudaStorage,
    dst: HeadsOut,
) -> Result<()> {
    let dtype = x.dtype();
    if y.dtype() != dtype {
        candle_core::bail!("qk_norm_rope: output {:?} for input {dtype:?}", y.dtype());
    }
    let mode: i32 = match (w.is_some(), rope.is_some()) {
        (true, true) => 2,
        (false, true) => 1,
        (false, false) => 0,
        (true, false) => candle_core::bail!("qk_norm_rope: the norm runs only with RoPE"),
    };
    let dev = x.device.clone();
    let stream = dev.cuda_stream();
    let rows = b * s * h;
    if rows >= QK_MAX_ROWS {
        candle_core::bail!(
            "qk_norm_rope: {rows} head rows (b {b} x s {s} x h {h}); the kernel takes fewer than {QK_MAX_ROWS}"
        );
    }
    let divs = QkDivs { heads: FastDiv::new(h)?, s_len: FastDiv::new(s)?, hl: FastDiv::new(dst.hl)? };
    let i64s = [src.sb, src.ss, src.sh].map(|v| v as i64);
    let o64s = [dst.yb, dst.ys, dst.yp].map(|v| v as i64);
    let (hl_i, s_i, h_i, d_i, rows_i) = (dst.hl as i32, s as i32, h as i32, d as i32, rows as i64);
    // Four elements per lane in one access when a row is exactly a warp's four each and every
    // offset keeps those accesses aligned (storage bases are 256-byte aligned).
    let four = |v: usize| v.is_multiple_of(4);
    let even = |l: &Layout| l.start_offset().is_multiple_of(2);
    let vec4 = d == VEC4_ROW
        && [src.start, src.sb, src.ss, src.sh, dst.start, dst.yb, dst.ys, dst.yp].into_iter().all(four)
        && w.is_none_or(|(_, wl)| four(wl.start_offset()))
        && rope.is_none_or(|((_, cl), (_, sl))| even(cl) && even(sl));
    // Rows per warp on that path: as many of one token's heads as divide the head count.
    let most = qk_rows_per_warp();
    let per_warp =
        if vec4 { [4, 2, 1].into_iter().find(|&r| r <= most && h.is_multiple_of(r)).unwrap_or(1) } else { 1 };
    let vec_rows = if vec4 { per_warp as i32 } else { 0 };
    // Eight per lane, half a warp per row group, where 16-bit values keep every offset 16-byte
    // aligned (cos / sin rows too).
    let eight = |v: usize| v.is_multiple_of(8);
    let lane8 = vec4
        && qk_lane8()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && [src.start, src.sb, src.ss, src.sh, dst.start, dst.yb, dst.ys, dst.yp].into_iter().all(eight)
        && w.is_none_or(|(_, wl)| eight(wl.start_offset()))
        && rope.is_none_or(|((_, cl), (_, sl))| {
            cl.start_offset().is_multiple_of(4) && sl.start_offset().is_multiple_of(4)
        });
    let groups_per_warp = if lane8 { 2 } else { 1 };
    let warps_per_block = (QK_THREADS / 32) as u64;
    let blocks = (rows.div_ceil(per_warp * groups_per_warp) as u64).div_ceil(warps_per_block).max(1) as u32;
    let name = format!("qk_norm_rope{}_{}", if lane8 { "8" } else { "" }, suffix(dtype)?);
    let f = function_in(&dev, Kernels::Fused, &name)?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (QK_THREADS, 1, 1), shared_mem_bytes: 0 };
    macro_rules! go {
        ($t:ty, $yv:ident) => {{
            let all = x.as_cuda_slice::<$t>()?;
            let xv = all.slice(src.start..);
            // Unread without a norm / RoPE: x stands in as a valid pointer.
            let wv = match w {
                Some((ws, wl)) => view::<$t>(ws, wl, "norm weight")?,
                None => all.slice(src.start..),
            };
            let (cv, sv) = match rope {
                Some(((cs, cl), (ss_, sl))) => (Some(view::<f32>(cs, cl, "cos")?), Some(view::<f32>(ss_, sl, "sin")?)),
                None => (None, None),
            };
            let mut yv = $yv.slice_mut(dst.start..);
            let mut bld = stream.launch_builder(&f);
            bld.arg(&xv).arg(&i64s[0]).arg(&i64s[1]).arg(&i64s[2]).arg(&wv);
            let null = 0u64;
            match (&cv, &sv) {
                (Some(c), Some(sn)) => bld.arg(c).arg(sn),
                _ => bld.arg(&null).arg(&null),
            };
            bld.arg(&mut yv).arg(&o64s[0]).arg(&o64s[1]).arg(&o64s[2]);
            bld.arg(&hl_i).arg(&s_i).arg(&h_i).arg(&d_i).arg(&rows_i).arg(&eps).arg(&mode).arg(&vec_rows).arg(&divs);
            // SAFETY: argument types match the kernel; the caller checked that every (b, s, h, d)
            // offset lies inside x and y, and cos/sin (read only with RoPE) hold s rows of d/2.
            unsafe { bld.launch(cfg) }.map_err(wrap("qk_norm_rope"))?;
        }};
    }
    match &mut y.slice {
        CudaStorageSlice::F32(o) => go!(f32, o),
        CudaStorageSlice::BF16(o) => go!(bf16, o),
        CudaStorageSlice::F16(o) => go!(f16, o),
        _ => candle_core::bail!("qk_norm_rope takes f32, bf16 or f16"),
    }
    Ok(())
}

/// Most 4-element vectors per thread of `rms_rope` (`kRowVecs`): rows of at most
/// `LN_THREADS * 4 * RMS_ROW_VECS` values.
const RMS_ROW_VECS: usize = 8;

/// RMSNorm over whole rows of `c` (weight `w` `[c]`) then, with `rope` (cos, sin `[s_len, d/2]`),
/// interleaved-pair RoPE per head of `d`, of contiguous `[rows, c]` `x` (kernels/fused.cu
/// `rms_rope`). With `fp8_descale`, E4M3 codes of the values divided by it (a u8 storage).
#[allow(clippy::too_many_arguments)]
pub fn rms_rope(
    x: &CudaStorage,
    xl: &Layout,
    w: (&CudaStorage, &Layout),
    rope: Option<(Table, Table)>,
    (rows, c, d, s_len): (usize, usize, usize, usize),
    eps: f32,
    fp8_descale: Option<f32>,
) -> Result<CudaStorage> {
    let dtype = x.dtype();
    if !c.is_multiple_of(4)
        || c > LN_THREADS as usize * 4 * RMS_ROW_VECS
        || !d.is_multiple_of(4)
        || !c.is_multiple_of(d)
    {
        candle_core::bail!(
            "rms_rope: rows of {c} values in heads of {d} (needs multiples of 4, at most {})",
            LN_THREADS as usize * 4 * RMS_ROW_VECS
        );
    }
    // 16-byte rows of 4 values need aligned starts (storage bases are 256-byte aligned).
    let aligned = |l: &Layout, k: usize| l.start_offset().is_multiple_of(k);
    if !aligned(xl, 4) || !aligned(w.1, 4) || rope.is_some_and(|((_, cl), (_, sl))| !aligned(cl, 2) || !aligned(sl, 2))
    {
        candle_core::bail!("rms_rope: unaligned inputs");
    }
    let dev = &x.device;
    // bf16 rows in registers where they fit and heads hold whole 16-byte vectors.
    let vec = match (dtype, &rope) {
        (DType::BF16, _) if !d.is_multiple_of(super::ROW_VEC_ELEMS) => None,
        (DType::BF16, Some(((_, cl), (_, sl)))) => super::row_vec(c, &starts(&[xl, w.1, cl, sl])),
        (DType::BF16, None) => super::row_vec(c, &starts(&[xl, w.1])),
        _ => None,
    };
    let (name, threads) = super::row_kernel(vec, "rms_rope_rows", format!("rms_rope_{}", suffix(dtype)?), LN_THREADS);
    let f = function_in(dev, Kernels::Fused, &name)?;
    let stream = dev.cuda_stream();
    let mut y = match fp8_descale {
        // SAFETY: the kernel writes every element.
        Some(_) => CudaStorageSlice::U8(unsafe { stream.alloc::<u8>(rows * c) }.map_err(wrap("alloc"))?),
        None => alloc(x, dtype, rows * c)?,
    };
    let descale = fp8_descale.unwrap_or(1.0);
    let (c_i, d_i, s_i, rope_i) = (c as i32, d as i32, s_len as i32, rope.is_some() as i32);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let (cv, sv) = match rope {
        Some(((cs, cl), (ss, sl))) => (Some(view::<f32>(cs, cl, "cos")?), Some(view::<f32>(ss, sl, "sin")?)),
        None => (None, None),
    };
    with_view!(dtype, x, xl, "x", |xv| {
        with_view!(dtype, w.0, w.1, "norm weight", |wv| {
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&wv);
            let null = 0u64;
            match (&cv, &sv) {
                (Some(c), Some(sn)) => b.arg(c).arg(sn),
                _ => b.arg(&null).arg(&null),
            };
            match &mut y {
                CudaStorageSlice::F32(o) => b.arg(o).arg(&null),
                CudaStorageSlice::BF16(o) => b.arg(o).arg(&null),
                CudaStorageSlice::F16(o) => b.arg(o).arg(&null),
                // The T output is not written: x stands in as a valid pointer.
                CudaStorageSlice::U8(o) => b.arg(&xv).arg(o),
                _ => unreachable!("allocated above"),
            };
            b.arg(&descale).arg(&c_i).arg(&d_i).arg(&s_i).arg(&eps).arg(&rope_i);
            // SAFETY: argument types match the kernel; x and y hold rows * c values, w c values,
            // cos/sin (read only with RoPE) s_len rows of d/2 (the caller checked).
            unsafe { b.launch(cfg) }.map_err(wrap("rms_rope"))?;
        })
    });
    Ok(CudaStorage { slice: y, device: dev.clone() })
}

/// An uninitialized buffer of `n` elements of `like`'s dtype on its GPU (the caller writes all of
/// it before anything reads it).
pub fn uninit_like(like: &candle_core::Tensor, n: usize) -> Result<CudaStorage> {
    let (st, _) = like.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*st else { candle_core::bail!("uninit_like: a GPU tensor") };
    Ok(CudaStorage { slice: alloc(s, like.dtype(), n)?, device: s.device.clone() })
}

/// `y = [o, act(m)]` per row (see kernels/fused.cu `cat_act`); `m` is read at `m_start` with rows
/// `m_stride` apart; `o` (may be empty when `c` = 0) contiguous.
#[allow(clippy::too_many_arguments)]
pub fn cat_act(
    o: Option<(&CudaStorage, &Layout)>,
    m: &CudaStorage,
    (m_start, m_stride): (usize, usize),
    (rows, c, w): (usize, usize, usize),
    swiglu: bool,
) -> Result<CudaStorage> {
    let dtype = m.dtype();
    // 16-byte vectors where every row piece starts on one (bf16: 8 values).
    const VEC: usize = 8;
    let o_start = o.map_or(0, |(_, l)| l.start_offset());
    let vec = dtype == DType::BF16 && [c, w, m_stride, m_start, o_start].iter().all(|v| v.is_multiple_of(VEC));
    let name = if vec { "cat_act_vec_bf16".to_string() } else { format!("cat_act_{}", suffix(dtype)?) };
    let dev = &m.device;
    let f = function_in(dev, Kernels::Fused, &name)?;
    let stream = dev.cuda_stream();
    let n = rows * (c + w);
    let mut y = alloc(m, dtype, n)?;
    let (ms_i, rows_i, c_i, w_i, sw_i) = (m_stride as i64, rows as i64, c as i32, w as i32, swiglu as i32);
    let cfg = if vec {
        // Vectors of a row along x, rows along y (grid-strided past the y limit).
        const MAX_GRID_Y: usize = 65_535;
        let per_row = ((c + w) / VEC).div_ceil(EW_THREADS as usize) as u32;
        LaunchConfig {
            grid_dim: (per_row.max(1), rows.clamp(1, MAX_GRID_Y) as u32, 1),
            block_dim: (EW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    } else {
        let blocks = (n as u64).div_ceil(EW_THREADS as u64).clamp(1, EW_MAX_BLOCKS) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (EW_THREADS, 1, 1), shared_mem_bytes: 0 }
    };
    macro_rules! go {
        ($t:ty) => {{
            let mv = m.as_cuda_slice::<$t>()?.slice(m_start..);
            // An empty `o` still needs a valid pointer argument: `m` stands in (never read).
            let ov = match o {
                Some((os, ol)) => view::<$t>(os, ol, "o")?,
                None => m.as_cuda_slice::<$t>()?.slice(m_start..),
            };
            let mut b = stream.launch_builder(&f);
            b.arg(&ov).arg(&mv).arg(&ms_i);
            match &mut y {
                CudaStorageSlice::F32(v) => b.arg(v),
                CudaStorageSlice::BF16(v) => b.arg(v),
                CudaStorageSlice::F16(v) => b.arg(v),
                _ => unreachable!("allocated above"),
            };
            b.arg(&rows_i).arg(&c_i).arg(&w_i).arg(&sw_i);
            // SAFETY: argument types match the kernel; the caller checked that rows x (c + w) fit
            // y, rows x c fit o, and every m row (w or 2w values) lies inside m's buffer.
            unsafe { b.launch(cfg) }.map_err(wrap("cat_act"))?;
        }};
    }
    match dtype {
        DType::F32 => go!(f32),
        DType::BF16 => go!(bf16),
        _ => go!(f16),
    }
    Ok(CudaStorage { slice: y, device: dev.clone() })
}
