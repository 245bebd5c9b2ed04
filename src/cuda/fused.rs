//! Launchers of kernels/fused.cu (the fused element-wise ops of src/models/fused.rs).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
use candle_core::{DType, Layout, Result};
use half::{bf16, f16};

use super::{function_in, view, wrap, Kernels};

/// Threads per row block of `ln_modulate` (`kThreads` in kernels/fused.cu).
const LN_THREADS: u32 = 256;
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
    let name = format!("ln_modulate_{}", suffix(dtype)?);
    let dev = &x.device;
    let f = function_in(dev, Kernels::Fused, &name)?;
    let stream = dev.cuda_stream();
    let mut y = alloc(x, dtype, rows * c)?;
    let (shv, scv) = (view::<f32>(shift, shl, "shift")?, view::<f32>(scale, scl, "scale")?);
    let (c_i, s_i, sm_i) = (c as i32, s as i32, sm as i32);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (LN_THREADS, 1, 1), shared_mem_bytes: 0 };
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
    let name = format!("gated_add_{}", suffix(dtype)?);
    let dev = &x.device;
    let f = function_in(dev, Kernels::Fused, &name)?;
    let stream = dev.cuda_stream();
    let n = rows * c;
    let mut y = alloc(x, dtype, n)?;
    let gv = view::<f32>(gate, gl, "gate")?;
    let (n_i, c_i, s_i, sm_i) = (n as i64, c as i32, s as i32, sm as i32);
    let blocks = (n as u64).div_ceil(EW_THREADS as u64).clamp(1, EW_MAX_BLOCKS) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (EW_THREADS, 1, 1), shared_mem_bytes: 0 };
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
