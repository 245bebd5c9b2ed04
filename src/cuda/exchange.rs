//! Launcher of the sequence-parallel exchange layout (kernels/fused.cu, `sp_unpack_out`): one pass
//! where the Candle composition of `SeqParallel` makes a permuted copy.
//! Data movement only, in the widest unit (2-16 bytes) that divides the head size, every stride
//! and every offset in bytes, so every element type moves bit-exactly.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
use candle_core::{DType, Layout, Result};

use super::{address, function_in, wrap, Kernels};

/// Threads per block and the most blocks of the grid-stride copies.
const THREADS: u32 = 256;
const MAX_BLOCKS: u64 = 65_535;
/// Move units in bytes, widest first, with their kernel suffixes.
const UNITS: [(usize, &str); 4] = [(16, "u16b"), (8, "u8b"), (4, "u4b"), (2, "u2b")];

/// The widest unit dividing every byte quantity in `bytes`, and its kernel suffix.
fn unit(bytes: &[usize]) -> Result<(usize, &'static str)> {
    UNITS
        .iter()
        .copied()
        .find(|(u, _)| bytes.iter().all(|b| b % u == 0))
        .ok_or_else(|| candle_core::Error::Msg(format!("exchange layout: byte sizes {bytes:?} are not even")))
}

fn elem_bytes(d: DType) -> Result<usize> {
    match d {
        DType::BF16 | DType::F16 => Ok(2),
        DType::F32 => Ok(4),
        d => candle_core::bail!("sequence-parallel exchange takes bf16, f16 or f32, found {d:?}"),
    }
}

/// An uninitialized buffer of `n` elements of `dtype` (every kernel below writes all of it).
fn alloc(s: &CudaStorage, dtype: DType, n: usize) -> Result<CudaStorage> {
    let stream = s.device.cuda_stream();
    // SAFETY: the kernels write every element.
    let slice = unsafe {
        match dtype {
            DType::F32 => CudaStorageSlice::F32(stream.alloc(n).map_err(wrap("alloc"))?),
            DType::BF16 => CudaStorageSlice::BF16(stream.alloc(n).map_err(wrap("alloc"))?),
            _ => CudaStorageSlice::F16(stream.alloc(n).map_err(wrap("alloc"))?),
        }
    };
    Ok(CudaStorage { slice, device: s.device.clone() })
}

fn grid(total: usize) -> LaunchConfig {
    let blocks = (total as u64).div_ceil(THREADS as u64).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The received outputs of each head chunk (`[n, S_local, B, h, D]`, one piece per member's heads
/// of the chunk) into `[B, S_local, C*n*h, D]`: chunk `c`'s piece `j` holds heads
/// `(c*n + j)*h ..`. One launch per chunk into the one output.
pub fn unpack_out(
    recvs: &[(&CudaStorage, &Layout)],
    (n, s_loc, b, h, d): (usize, usize, usize, usize, usize),
) -> Result<CudaStorage> {
    let Some(&(first, _)) = recvs.first() else { candle_core::bail!("unpack_out: no received chunks") };
    let dtype = first.dtype();
    let es = elem_bytes(dtype)?;
    let per_chunk = n * s_loc * b * h * d;
    let mut offsets = vec![d * es];
    for (r, rl) in recvs {
        if rl.shape().elem_count() != per_chunk || !rl.is_contiguous() || r.dtype() != dtype {
            candle_core::bail!(
                "unpack_out: received {} elements of {:?}, expected {per_chunk} contiguous of {dtype:?}",
                rl.shape().elem_count(),
                r.dtype()
            );
        }
        offsets.push(rl.start_offset() * es);
    }
    let (u, suf) = unit(&offsets)?;
    let chunks = recvs.len();
    let out = alloc(first, dtype, chunks * per_chunk)?;
    let dev = &first.device;
    let f = function_in(dev, Kernels::Fused, &format!("sp_unpack_out_{suf}"))?;
    let stream = dev.cuda_stream();
    let dst = address(&out, 0)?;
    let (n_i, s_i, b_i, h_i, dv_i) = (n as i32, s_loc as i32, b as i32, h as i32, (d * es / u) as i32);
    let ht = (chunks * n * h) as i32;
    for (c, (r, rl)) in recvs.iter().enumerate() {
        let src = address(r, rl.start_offset())?;
        let head0 = (c * n * h) as i32;
        let mut bld = stream.launch_builder(&f);
        bld.arg(&src).arg(&dst).arg(&n_i).arg(&s_i).arg(&b_i).arg(&h_i).arg(&dv_i).arg(&ht).arg(&head0);
        // SAFETY: `per_chunk` elements in, checked above; the writes land in the chunk's heads of
        // the `chunks * per_chunk`-element output.
        unsafe { bld.launch(grid(per_chunk * es / u)) }.map_err(wrap("sp_unpack_out"))?;
    }
    Ok(out)
}
