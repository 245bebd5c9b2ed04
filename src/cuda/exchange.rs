//! Launchers of the sequence-parallel exchange layouts (kernels/fused.cu, `sp_*`): one pass each
//! where the Candle composition of `SeqParallel` makes stacks, permuted copies and concatenations.
//! Data movement only, in the widest unit (2-16 bytes) that divides the head size, every stride
//! and every offset in bytes, so every element type moves bit-exactly.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
use candle_core::{DType, Layout, Result};

use super::{function_in, wrap, Kernels};

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

/// Device address of element `offset` of `s`.
fn address(s: &CudaStorage, offset: usize) -> Result<u64> {
    let stream = s.device.cuda_stream();
    let (base, es) = match &s.slice {
        CudaStorageSlice::BF16(x) => (x.device_ptr(&stream).0, 2),
        CudaStorageSlice::F16(x) => (x.device_ptr(&stream).0, 2),
        CudaStorageSlice::F32(x) => (x.device_ptr(&stream).0, 4),
        CudaStorageSlice::U32(x) => (x.device_ptr(&stream).0, 4),
        _ => candle_core::bail!("sequence-parallel exchange: unexpected storage {:?}", s.dtype()),
    };
    Ok(base + (offset * es) as u64)
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

/// Strides of a `[B, H, S, D]` view with unit stride along D.
fn bhs_strides(l: &Layout, what: &str) -> Result<[usize; 3]> {
    let st = l.stride();
    if l.dims().len() != 4 || st[3] != 1 {
        candle_core::bail!(
            "{what}: expected a [B, H, S, D] view with unit stride along D, found {:?} / {st:?}",
            l.dims()
        );
    }
    Ok([st[0], st[1], st[2]])
}

/// Local q, k, v (`[B, H, S_local, D]` views) into the all-to-all send buffer
/// `[n, 3, S_local, B, h, D]` (member j gets heads `j*h ..`), `h = H / n`.
pub fn pack_qkv(qkv: [(&CudaStorage, &Layout); 3], n: usize) -> Result<CudaStorage> {
    let (q, ql) = qkv[0];
    let dtype = q.dtype();
    let es = elem_bytes(dtype)?;
    let dims = ql.dims();
    let (b, heads, s_loc, d) = (dims[0], dims[1], dims[2], dims[3]);
    let h = heads / n;
    let mut bytes = vec![d * es];
    let mut strides = Vec::with_capacity(3);
    for (i, (s, l)) in qkv.iter().enumerate() {
        if s.dtype() != dtype || l.dims() != dims {
            candle_core::bail!("pack_qkv: input {i} is {:?} {:?}, q is {dtype:?} {dims:?}", s.dtype(), l.dims());
        }
        let st = bhs_strides(l, "pack_qkv")?;
        bytes.extend(st.iter().map(|x| x * es));
        bytes.push(l.start_offset() * es);
        strides.push(st);
    }
    let (u, suf) = unit(&bytes)?;
    let per = |x: usize| (x * es / u) as i64;
    let total = n * 3 * s_loc * b * h * d;
    let out = alloc(q, dtype, total)?;
    let dev = &q.device;
    let f = function_in(dev, Kernels::Fused, &format!("sp_pack_qkv_{suf}"))?;
    let stream = dev.cuda_stream();
    let ptrs = [
        address(qkv[0].0, qkv[0].1.start_offset())?,
        address(qkv[1].0, qkv[1].1.start_offset())?,
        address(qkv[2].0, qkv[2].1.start_offset())?,
    ];
    let st: Vec<i64> = strides.iter().flat_map(|s| s.iter().map(|&x| per(x))).collect();
    let dst = address(&out, 0)?;
    let (n_i, h_i, s_i, b_i, dv_i) = (n as i32, h as i32, s_loc as i32, b as i32, per(d) as i32);
    let mut bld = stream.launch_builder(&f);
    bld.arg(&ptrs[0]).arg(&ptrs[1]).arg(&ptrs[2]);
    for x in &st {
        bld.arg(x);
    }
    bld.arg(&dst).arg(&n_i).arg(&h_i).arg(&s_i).arg(&b_i).arg(&dv_i);
    // SAFETY: argument types match the kernel; every index lies inside the views (their dims and
    // strides as Candle laid them out) and the `total`-element output.
    unsafe { bld.launch(grid(total * es / u)) }.map_err(wrap("sp_pack_qkv"))?;
    Ok(out)
}

/// The received pieces (member m's `[3, held_m, B, h, D]`, in member order) into q, k, v of the
/// whole sequence, `[3, S, B, h, D]`; `map` holds three u32 per token (see kernels/fused.cu).
pub fn unpack_qkv(
    recv: (&CudaStorage, &Layout),
    map: (&CudaStorage, &Layout),
    s_total: usize,
    (b, h, d): (usize, usize, usize),
) -> Result<CudaStorage> {
    let (r, rl) = recv;
    let dtype = r.dtype();
    let es = elem_bytes(dtype)?;
    let (u, suf) = unit(&[d * es, rl.start_offset() * es])?;
    let row = (b * h * d * es / u) as i64;
    let total = 3 * s_total * b * h * d;
    if rl.shape().elem_count() != total || !rl.is_contiguous() {
        candle_core::bail!("unpack_qkv: received {} elements, expected {total} contiguous", rl.shape().elem_count());
    }
    let out = alloc(r, dtype, total)?;
    let dev = &r.device;
    let f = function_in(dev, Kernels::Fused, &format!("sp_unpack_qkv_{suf}"))?;
    let stream = dev.cuda_stream();
    let (src, mp, dst) = (address(r, rl.start_offset())?, address(map.0, map.1.start_offset())?, address(&out, 0)?);
    let s_i = s_total as i32;
    let mut bld = stream.launch_builder(&f);
    bld.arg(&src).arg(&mp).arg(&dst).arg(&s_i).arg(&row);
    // SAFETY: the map's rows point inside the received buffer (built from the same sizes).
    unsafe { bld.launch(grid(total * es / u)) }.map_err(wrap("sp_unpack_qkv"))?;
    Ok(out)
}

/// This rank's heads of the attention output (`[B, h, S, D]` view) into the send buffer: each
/// token's `[B, h, D]` row at its member-order row `p` of `map`.
pub fn pack_out(o: (&CudaStorage, &Layout), map: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    let (os, ol) = o;
    let dtype = os.dtype();
    let es = elem_bytes(dtype)?;
    let dims = ol.dims();
    let (b, h, s_total, d) = (dims[0], dims[1], dims[2], dims[3]);
    let st = bhs_strides(ol, "pack_out")?;
    let (u, suf) = unit(&[d * es, st[0] * es, st[1] * es, st[2] * es, ol.start_offset() * es])?;
    let per = |x: usize| (x * es / u) as i64;
    let total = b * h * s_total * d;
    let out = alloc(os, dtype, total)?;
    let dev = &os.device;
    let f = function_in(dev, Kernels::Fused, &format!("sp_pack_out_{suf}"))?;
    let stream = dev.cuda_stream();
    let (src, mp, dst) = (address(os, ol.start_offset())?, address(map.0, map.1.start_offset())?, address(&out, 0)?);
    let (sb, sh, ss) = (per(st[0]), per(st[1]), per(st[2]));
    let (s_i, b_i, h_i, dv_i) = (s_total as i32, b as i32, h as i32, per(d) as i32);
    let mut bld = stream.launch_builder(&f);
    bld.arg(&src).arg(&sb).arg(&sh).arg(&ss).arg(&mp).arg(&dst).arg(&s_i).arg(&b_i).arg(&h_i).arg(&dv_i);
    // SAFETY: reads stay inside the view; the map is a permutation of 0..S (built from the same sizes).
    unsafe { bld.launch(grid(total * es / u)) }.map_err(wrap("sp_pack_out"))?;
    Ok(out)
}

/// The received outputs (`[n, S_local, B, h, D]`, one piece per member's heads) into
/// `[B, S_local, n*h, D]`.
pub fn unpack_out(
    recv: (&CudaStorage, &Layout),
    (n, s_loc, b, h, d): (usize, usize, usize, usize, usize),
) -> Result<CudaStorage> {
    let (r, rl) = recv;
    let dtype = r.dtype();
    let es = elem_bytes(dtype)?;
    let total = n * s_loc * b * h * d;
    if rl.shape().elem_count() != total || !rl.is_contiguous() {
        candle_core::bail!("unpack_out: received {} elements, expected {total} contiguous", rl.shape().elem_count());
    }
    let (u, suf) = unit(&[d * es, rl.start_offset() * es])?;
    let out = alloc(r, dtype, total)?;
    let dev = &r.device;
    let f = function_in(dev, Kernels::Fused, &format!("sp_unpack_out_{suf}"))?;
    let stream = dev.cuda_stream();
    let (src, dst) = (address(r, rl.start_offset())?, address(&out, 0)?);
    let (n_i, s_i, b_i, h_i, dv_i) = (n as i32, s_loc as i32, b as i32, h as i32, (d * es / u) as i32);
    let mut bld = stream.launch_builder(&f);
    bld.arg(&src).arg(&dst).arg(&n_i).arg(&s_i).arg(&b_i).arg(&h_i).arg(&dv_i);
    // SAFETY: `total` elements in and out, checked above.
    unsafe { bld.launch(grid(total * es / u)) }.map_err(wrap("sp_unpack_out"))?;
    Ok(out)
}
