//! FP8 mode on the GPU: NVFP4 -> E4M3 weight conversion at load, per-token activation
//! quantization, and cuBLASLt's FP8 GEMM (Hopper needs the "TN" layout: both operands K-major,
//! which is exactly how weights `[N, K]` and activations `[M, K]` are stored).
//!
//! Scales: cuBLASLt applies one f32 per weight row and one per token through its outer-vector scale
//! mode (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F`). Where the library has no such kernel for
//! the shape, the GEMM runs unscaled into f32 and `fp8_scale_out` applies both vectors (slower,
//! same result up to accumulation order); which one ran is logged once per process.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::sys as ltsys;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
use candle_core::{DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::lt::{
    alignment, device_lt, epilogue, half_tensor_address, heuristic, matmul_tn, set, Descs, MAX_ALIGN_BYTES,
};
use super::{function_in, input_bf16, view, wrap, Kernels};
use crate::nvfp4::fp8::Fp8Accum;
use crate::nvfp4::linear::Nvfp4Matmul;
use crate::nvfp4::Nvfp4Weight;

/// Threads per row block (`kThreads` in kernels/fp8.cu).
const ROW_THREADS: u32 = 256;
/// FP8 tensor cores exist from Ada (sm_89) on.
pub const MIN_FP8_CAPABILITY: (i32, i32) = (8, 9);
/// cuBLASLt needs 16-byte aligned leading dimensions: K (E4M3 bytes); N is padded at load.
const ALIGN_BYTES: usize = 16;
/// Grid cap of the grid-stride scaling pass.
const SCALE_MAX_BLOCKS: u64 = 65_535;

fn ensure_fp8(dev: &CudaDevice) -> Result<()> {
    let cc = super::compute_capability(dev)?;
    if cc < MIN_FP8_CAPABILITY {
        candle_core::bail!(
            "--nvfp4-mode fp8 needs FP8 tensor cores (compute capability 8.9 or newer); this GPU is {}.{}: use w4a16",
            cc.0,
            cc.1
        );
    }
    Ok(())
}

/// E4M3 `[n, k]` and f32 row scales `[n]` from a canonical NVFP4 weight, converted on `device`.
pub fn weight_to_fp8(w: &Nvfp4Weight, device: &Device) -> Result<(Tensor, Tensor)> {
    let Device::Cuda(dev) = device else { candle_core::bail!("weight_to_fp8: not a CUDA device") };
    ensure_fp8(dev)?;
    if !w.k.is_multiple_of(ALIGN_BYTES) {
        candle_core::bail!("fp8 mode needs K to be a multiple of {ALIGN_BYTES}, found {}", w.k);
    }
    let stream = dev.cuda_stream();
    let packed = stream.clone_htod(&w.packed).map_err(wrap("upload"))?;
    let scales = stream.clone_htod(&w.scales).map_err(wrap("upload"))?;
    // SAFETY: the kernel writes every element of both outputs.
    let mut out = unsafe { stream.alloc::<u8>(w.n * w.k) }.map_err(wrap("alloc"))?;
    let mut row = unsafe { stream.alloc::<f32>(w.n) }.map_err(wrap("alloc"))?;
    let f = function_in(dev, Kernels::Fp8, "nvfp4_to_fp8_weight")?;
    let (ws2, k) = (w.weight_scale_2, w.k as i32);
    let mut b = stream.launch_builder(&f);
    b.arg(&packed).arg(&scales).arg(&ws2).arg(&k).arg(&mut out).arg(&mut row);
    let cfg = LaunchConfig { grid_dim: (w.n as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument types match the kernel; one block per row of K elements.
    unsafe { b.launch(cfg) }.map_err(wrap("nvfp4_to_fp8_weight"))?;
    let weight = CudaStorage { slice: CudaStorageSlice::U8(out), device: dev.clone() };
    let scale = CudaStorage { slice: CudaStorageSlice::F32(row), device: dev.clone() };
    let none = candle_core::op::BackpropOp::none;
    let weight = Tensor::from_storage(candle_core::Storage::Cuda(weight), (w.n, w.k), none(), false);
    let scale = Tensor::from_storage(candle_core::Storage::Cuda(scale), w.n, none(), false);
    Ok((weight, scale))
}

/// Descriptors of one FP8 GEMM (E4M3 operands, TN), with per-row / per-token scale vectors when
/// `outer_vec`, accumulating as `accum` says.
fn descs(m: usize, n: usize, k: usize, out: DType, outer_vec: bool, accum: Fp8Accum) -> Result<Descs> {
    use ltsys::cublasLtMatmulDescAttributes_t as A;
    let descs = Descs::tn(m, n, k, ltsys::cudaDataType::CUDA_R_8F_E4M3, out)?;
    // An int8_t attribute, 0 (f32 promotion) unless set: 1 keeps the sum in the tensor cores for
    // all of K. Set only when asked, so the default path makes no extra call per GEMM.
    if accum == Fp8Accum::Fast {
        set(descs.matmul, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
    }
    if outer_vec {
        let mode = ltsys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
        set(descs.matmul, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode)?;
        set(descs.matmul, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode)?;
    }
    Ok(descs)
}

/// Which scaling ran, reported once.
fn note_path(outer_vec: bool, why: &str) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if outer_vec {
            log::info!("fp8 mode: cuBLASLt FP8 GEMM with per-row/per-token scale vectors");
        } else {
            log::warn!("fp8 mode: cuBLASLt has no outer-vector FP8 scaling here ({why}); scaling in a separate pass");
        }
    });
}

/// `y = x W^T` in FP8 for an fp8-mode layer: `s2` E4M3 weight `[n, k]`, `s3` f32 row scales.
pub fn linear_fwd(
    op: &Nvfp4Matmul,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (xq, sa) = quantize_storage(s1, l1, op.k)?;
    let (y, shape, _) = gemm_fp8(
        op,
        s1.device(),
        l1.shape().dims(),
        s1.dtype(),
        (&xq.slice(..), &sa.slice(..)),
        (s2, l2),
        (s3, l3),
        None,
    )?;
    Ok((y, shape))
}

/// What cuBLASLt adds to an fp8 GEMM after its scales: a bias and tanh-GELU, or a tensor `acc`
/// (beta = 1; not with GELU).
#[derive(Debug, Clone, Copy)]
struct Epilogue {
    bias: Option<u64>,
    gelu: bool,
    acc: Option<u64>,
}

/// The fp8-mode layer `act(x W^T + b) [+ acc]` with the bias (`[N]`, the output's dtype),
/// tanh-GELU and `acc` (the output's shape and dtype) in cuBLASLt's epilogue where the scaled
/// GEMM runs (after the per-row / per-token scales); returns the output and whether the epilogue
/// ran (else the caller adds the bias, activation and `acc`).
pub fn linear_with_epilogue(
    op: &Nvfp4Matmul,
    x: &Tensor,
    weight: &Tensor,
    scale: &Tensor,
    bias: Option<&Tensor>,
    gelu: bool,
    acc: Option<&Tensor>,
) -> Result<(Tensor, bool)> {
    // The per-token quantization, then the same GEMM as for activations quantized beforehand.
    linear_act_with_epilogue(op, &Fp8Act::quantize(x)?, weight, scale, bias, gelu, acc)
}

/// The epilogue of an fp8 layer call: the bias's and accumulated tensor's addresses, the latter
/// checked against the `outputs` elements of the output's `dtype` (contiguous, as the callers make it).
fn epilogue_of(
    bias: Option<&Tensor>,
    gelu: bool,
    acc: Option<&Tensor>,
    outputs: usize,
    dtype: DType,
) -> Result<Epilogue> {
    if gelu && acc.is_some() {
        candle_core::bail!("fp8 linear: GELU and an accumulated tensor do not go together");
    }
    if let Some(a) = acc {
        if a.elem_count() != outputs || a.dtype() != dtype {
            candle_core::bail!(
                "fp8 linear: accumulated tensor {:?} {:?} for {outputs} outputs in {dtype:?}",
                a.dims(),
                a.dtype()
            );
        }
    }
    Ok(Epilogue {
        bias: bias.map(|b| half_tensor_address(b, "fp8 linear: the bias")).transpose()?,
        gelu,
        acc: acc.map(|a| half_tensor_address(a, "fp8 linear: the accumulated tensor")).transpose()?,
    })
}

/// Activations quantized for fp8-mode layers: E4M3 rows `[m, k]` (u8), one f32 scale per row, and
/// the shape and dtype of the tensor they stand for (a layer's output takes that dtype).
#[derive(Debug, Clone)]
pub struct Fp8Act {
    pub q: Tensor,
    pub scale: Tensor,
    pub dims: Vec<usize>,
    pub dtype: DType,
}

impl Fp8Act {
    /// A GPU tensor's rows in E4M3 with one scale per row (`fp8_quant_rows`, as every fp8 layer
    /// quantizes its input).
    pub fn quantize(x: &Tensor) -> Result<Self> {
        let x = x.contiguous()?;
        let k = *x.dims().last().ok_or_else(|| candle_core::Error::Msg("fp8 activations: a scalar".into()))?;
        let (st, l) = x.storage_and_layout();
        let candle_core::Storage::Cuda(c) = &*st else { candle_core::bail!("fp8 activations: GPU tensors only") };
        let (q, sa) = quantize_storage(c, l, k)?;
        let m = x.elem_count() / k;
        Ok(Self::from_parts(c.device(), q, sa, m, x.dims(), x.dtype()))
    }

    pub(crate) fn from_parts(
        dev: &CudaDevice,
        q: CudaSlice<u8>,
        sa: CudaSlice<f32>,
        m: usize,
        dims: &[usize],
        dtype: DType,
    ) -> Self {
        let k = dims.last().copied().unwrap_or(1);
        let none = candle_core::op::BackpropOp::none;
        let q = CudaStorage { slice: CudaStorageSlice::U8(q), device: dev.clone() };
        let sa = CudaStorage { slice: CudaStorageSlice::F32(sa), device: dev.clone() };
        Self {
            q: Tensor::from_storage(candle_core::Storage::Cuda(q), (m, k), none(), false),
            scale: Tensor::from_storage(candle_core::Storage::Cuda(sa), m, none(), false),
            dims: dims.to_vec(),
            dtype,
        }
    }
}

/// The fp8-mode layer `act(x W^T + b) [+ acc]` (as [`linear_with_epilogue`]) on activations
/// quantized beforehand ([`Fp8Act`]): no quantization pass of its own.
#[allow(clippy::too_many_arguments)]
pub fn linear_act_with_epilogue(
    op: &Nvfp4Matmul,
    x: &Fp8Act,
    weight: &Tensor,
    scale: &Tensor,
    bias: Option<&Tensor>,
    gelu: bool,
    acc: Option<&Tensor>,
) -> Result<(Tensor, bool)> {
    if x.dims.last() != Some(&op.k) {
        candle_core::bail!("fp8 linear: quantized input {:?} must end in K = {}", x.dims, op.k);
    }
    let acc = acc.map(|a| a.contiguous()).transpose()?;
    let m = x.q.elem_count() / op.k;
    let ep = epilogue_of(bias, gelu, acc.as_ref(), m * op.n, x.dtype)?;
    let guards = [
        x.q.storage_and_layout(),
        x.scale.storage_and_layout(),
        weight.storage_and_layout(),
        scale.storage_and_layout(),
    ];
    let mut cuda = Vec::with_capacity(4);
    for (st, l) in &guards {
        match &**st {
            candle_core::Storage::Cuda(c) => cuda.push((c, *l)),
            _ => candle_core::bail!("fp8 linear: GPU tensors only"),
        }
    }
    let xq = view::<u8>(cuda[0].0, cuda[0].1, "quantized input")?;
    let sa = view::<f32>(cuda[1].0, cuda[1].1, "input scales")?;
    let (y, shape, applied) =
        gemm_fp8(op, cuda[0].0.device(), &x.dims, x.dtype, (&xq, &sa), cuda[2], cuda[3], Some(ep))?;
    let y = Tensor::from_storage(candle_core::Storage::Cuda(y), shape, candle_core::op::BackpropOp::none(), false);
    Ok((y, applied))
}

/// Rows of `k` values (any float dtype; bf16 read in place, others rounded to bf16 first) to E4M3
/// with one f32 scale per row.
fn quantize_storage(s1: &CudaStorage, l1: &Layout, k: usize) -> Result<(CudaSlice<u8>, CudaSlice<f32>)> {
    let dev = s1.device().clone();
    let dims = l1.shape().dims();
    if dims.last() != Some(&k) {
        candle_core::bail!("fp8 linear: input {dims:?} must end in K = {k}");
    }
    let m = l1.shape().elem_count() / k;
    let stream = dev.cuda_stream();
    // Activations: bf16 (read in place when they are bf16 already), then E4M3 with one scale per
    // token.
    let converted;
    let in_place;
    // SAFETY: the kernel writes every element.
    let mut xq = unsafe { stream.alloc::<u8>(m * k) }.map_err(wrap("alloc"))?;
    let mut sa = unsafe { stream.alloc::<f32>(m) }.map_err(wrap("alloc"))?;
    // bf16 inputs are read in place from their offset (`view` below checks that they are
    // contiguous); other dtypes are converted into a fresh buffer.
    let start = if s1.dtype() == DType::BF16 { l1.start_offset() } else { 0 };
    let vec = super::row_vec(k, &[start]);
    let (name, threads) = super::row_kernel(vec, "fp8_quant_rows", "fp8_quant_rows".into(), ROW_THREADS);
    let f = function_in(&dev, Kernels::Fp8, &name)?;
    let k_i = k as i32;
    let mut b = stream.launch_builder(&f);
    if s1.dtype() == DType::BF16 {
        in_place = view::<bf16>(s1, l1, "input")?;
        b.arg(&in_place);
    } else {
        converted = input_bf16(s1, l1)?;
        b.arg(&converted);
    }
    b.arg(&k_i).arg(&mut xq).arg(&mut sa);
    let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument types match the kernel; one block per row; the vector kernels get rows of
    // at most threads * 8 * NV values, K % 8 == 0, 16-byte aligned (`row_vec`).
    unsafe { b.launch(cfg) }.map_err(wrap("fp8_quant_rows"))?;
    Ok((xq, sa))
}

/// The scaled FP8 GEMM (and its epilogue) on quantized activations `xq` `[m, k]` with row scales
/// `sa`, for an input of shape `dims` and dtype `in_dtype` (the output's dtype follows it). The
/// epilogue (bias, GELU or an accumulated tensor) applies only on the outer-vector path; the flag
/// says whether it ran.
#[allow(clippy::too_many_arguments)]
fn gemm_fp8(
    op: &Nvfp4Matmul,
    dev: &CudaDevice,
    dims: &[usize],
    in_dtype: DType,
    (xq, sa): (&CudaView<u8>, &CudaView<f32>),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    ep: Option<Epilogue>,
) -> Result<(CudaStorage, Shape, bool)> {
    let dev = dev.clone();
    let (n, k) = (op.n, op.k);
    if dims.last() != Some(&k) {
        candle_core::bail!("fp8 linear: input {dims:?} must end in K = {k}");
    }
    let m = dims.iter().product::<usize>() / k;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty") = n;
    let out_dtype = match in_dtype {
        DType::F32 | DType::F16 => in_dtype,
        _ => DType::BF16,
    };
    if n * out_dtype.size_in_bytes() % ALIGN_BYTES != 0 {
        candle_core::bail!(
            "fp8 mode needs N x {} bytes to be a multiple of {ALIGN_BYTES}, found N = {n}",
            out_dtype.size_in_bytes()
        );
    }
    if xq.len() != m * k || sa.len() != m {
        candle_core::bail!("fp8 linear: {} quantized values and {} scales for {m} rows of {k}", xq.len(), sa.len());
    }
    let stream = dev.cuda_stream();
    let w = view::<u8>(s2, l2, "fp8 weight")?;
    let sw = view::<f32>(s3, l3, "fp8 row scales")?;
    // SAFETY: the GEMM writes every element of D.
    let mut y = match out_dtype {
        DType::F32 => CudaStorageSlice::F32(unsafe { stream.alloc::<f32>(m * n) }.map_err(wrap("alloc"))?),
        DType::F16 => CudaStorageSlice::F16(unsafe { stream.alloc::<f16>(m * n) }.map_err(wrap("alloc"))?),
        _ => CudaStorageSlice::BF16(unsafe { stream.alloc::<bf16>(m * n) }.map_err(wrap("alloc"))?),
    };

    let state = device_lt(&dev)?;
    let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
    let ltd = &mut *guard;
    let (xq_ptr, _g1) = xq.device_ptr(&stream);
    let (w_ptr, _g2) = w.device_ptr(&stream);
    let (sw_ptr, _g4) = sw.device_ptr(&stream);
    let (sa_ptr, _g5) = sa.device_ptr(&stream);
    // Outer-vector scaling first (the scale pointers are part of what the heuristic checks);
    // otherwise the unscaled GEMM plus the in-place scaling pass.
    let mut plan = None;
    let mut why = String::new();
    for outer_vec in [true, false] {
        let d = descs(m, n, k, out_dtype, outer_vec, op.fp8_accum)?;
        // The epilogue (bias, GELU) only where the scales are applied inside the GEMM.
        let epilogue = match (outer_vec, ep) {
            (true, Some(e)) => epilogue(e.bias.is_some(), e.gelu),
            _ => epilogue(false, false),
        };
        if outer_vec {
            use ltsys::cublasLtMatmulDescAttributes_t as A;
            set(d.matmul, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw_ptr)?;
            set(d.matmul, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sa_ptr)?;
            set(d.matmul, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as u32))?;
            if let Some(Epilogue { bias: Some(bp), .. }) = ep {
                set(d.matmul, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp)?;
            }
        }
        let sms = super::lt::sm_target(&dev)?;
        if sms > 0 {
            set(d.matmul, ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sms)?;
        }
        let c_align = ep.and_then(|e| e.acc).map_or(MAX_ALIGN_BYTES, alignment);
        let key = (m, n, k, out_dtype, outer_vec, epilogue as u32, sms, c_align, op.fp8_accum);
        let algo = match ltd.fp8_algos.get(&key) {
            Some(a) => *a,
            None => {
                // The quantized activations and the output are fresh (fully aligned) buffers.
                let align = [MAX_ALIGN_BYTES, alignment(w_ptr), c_align];
                let a = heuristic(ltd, &d, align).map_err(|e| why = e).ok();
                ltd.fp8_algos.insert(key, a);
                a
            }
        };
        if let Some(a) = algo {
            // The accumulated tensor, too, only where the scales apply inside the GEMM.
            let acc = if outer_vec { ep.and_then(|e| e.acc) } else { None };
            let applied = epilogue != ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT || acc.is_some();
            plan = Some((outer_vec, d, a, applied, acc));
            break;
        }
    }
    let Some((outer_vec, d, algo, applied, acc)) = plan else {
        candle_core::bail!(
            "cuBLASLt has no FP8 GEMM for M = {m}, N = {n}, K = {k} on this GPU ({why}); use --nvfp4-mode w4a16"
        )
    };
    note_path(outer_vec, &why);
    // C is read only with beta = 1 (D's own buffer otherwise, unread).
    let beta = if acc.is_some() { 1f32 } else { 0f32 };
    {
        let (y_ptr, _g6) = match &mut y {
            CudaStorageSlice::F32(v) => v.device_ptr_mut(&stream),
            CudaStorageSlice::F16(v) => v.device_ptr_mut(&stream),
            CudaStorageSlice::BF16(v) => v.device_ptr_mut(&stream),
            _ => unreachable!("allocated above"),
        };
        let c_ptr = acc.unwrap_or(y_ptr);
        // SAFETY: descriptors match the buffers' types, shapes and leading dimensions (C has D's,
        // checked by the caller); all live until the GEMM has run (stream order).
        unsafe {
            matmul_tn(ltd, &d, &algo, (w_ptr, xq_ptr, c_ptr, y_ptr), beta, &stream, "cublasLtMatmul (fp8)")?;
        }
    }
    if !outer_vec {
        let (m_i, n_i) = (m as i64, n as i32);
        let cfg = LaunchConfig {
            grid_dim: (((m * n) as u64).div_ceil(ROW_THREADS as u64).min(SCALE_MAX_BLOCKS) as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = match out_dtype {
            DType::F32 => "fp8_scale_out_f32",
            DType::F16 => "fp8_scale_out_f16",
            _ => "fp8_scale_out_bf16",
        };
        let f = function_in(&dev, Kernels::Fp8, name)?;
        let mut b = stream.launch_builder(&f);
        match &mut y {
            CudaStorageSlice::F32(v) => b.arg(v),
            CudaStorageSlice::F16(v) => b.arg(v),
            CudaStorageSlice::BF16(v) => b.arg(v),
            _ => unreachable!("allocated above"),
        };
        b.arg(sa).arg(&sw).arg(&m_i).arg(&n_i);
        // SAFETY: argument types match the kernel; grid-stride over M x N.
        unsafe { b.launch(cfg) }.map_err(wrap(name))?;
    }
    drop(guard);
    Ok((CudaStorage { slice: y, device: dev }, Shape::from(out_dims), applied || ep.is_none()))
}

/// An fp8 layer's per-row weight scales (`[n]` f32) and bias (`[n]`, the output's dtype) times a
/// per-feature gate (`[n]` f32), in one launch: `residual + gate ⊙ (x W^T + b)` is then one scaled
/// GEMM with the residual as C (beta = 1), no separate gated add.
pub fn gate_fold(scale: &Tensor, bias: Option<&Tensor>, gate: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let n = scale.elem_count();
    if scale.dtype() != DType::F32 || gate.dtype() != DType::F32 || gate.elem_count() != n {
        candle_core::bail!(
            "gate_fold: scale {:?} {:?} and gate {:?} {:?}",
            scale.dims(),
            scale.dtype(),
            gate.dims(),
            gate.dtype()
        );
    }
    if let Some(b) = bias {
        if b.elem_count() != n {
            candle_core::bail!("gate_fold: bias {:?} for {n} features", b.dims());
        }
    }
    let (scale, gate) = (scale.contiguous()?, gate.contiguous()?);
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let candle_core::Device::Cuda(dev) = scale.device() else { candle_core::bail!("gate_fold: GPU tensors only") };
    let dev = dev.clone();
    let stream = dev.cuda_stream();
    let (ss, sl) = scale.storage_and_layout();
    let (gs, gl) = gate.storage_and_layout();
    let (candle_core::Storage::Cuda(ss), candle_core::Storage::Cuda(gs)) = (&*ss, &*gs) else {
        candle_core::bail!("gate_fold: GPU tensors only")
    };
    let sv = view::<f32>(ss, sl, "the weight scales")?;
    let gv = view::<f32>(gs, gl, "the gate")?;
    // SAFETY: the kernel writes every element.
    let mut s_out = unsafe { stream.alloc::<f32>(n) }.map_err(wrap("alloc"))?;
    let n_i = n as i32;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(ROW_THREADS as usize) as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let none = candle_core::op::BackpropOp::none;
    let guard = bias.as_ref().map(|b| b.storage_and_layout());
    let bias_storage = match &guard {
        Some((st, l)) => match &**st {
            candle_core::Storage::Cuda(c) => Some((c, *l)),
            _ => candle_core::bail!("gate_fold: GPU tensors only"),
        },
        None => None,
    };
    macro_rules! run {
        ($t:ty, $suffix:literal, $variant:ident) => {{
            let f = function_in(&dev, Kernels::Fp8, concat!("fp8_gate_fold_", $suffix))?;
            let mut b_out = match bias_storage {
                // SAFETY: the kernel writes every element.
                Some(_) => Some(unsafe { stream.alloc::<$t>(n) }.map_err(wrap("alloc"))?),
                None => None,
            };
            let b_in = bias_storage.map(|(c, l)| view::<$t>(c, l, "the bias")).transpose()?;
            let null = 0u64;
            let mut b = stream.launch_builder(&f);
            b.arg(&sv);
            match &b_in {
                Some(v) => b.arg(v),
                None => b.arg(&null),
            };
            b.arg(&gv).arg(&mut s_out);
            match &mut b_out {
                Some(v) => b.arg(v),
                None => b.arg(&null),
            };
            b.arg(&n_i);
            // SAFETY: argument types match the kernel; a null bias pointer skips the bias.
            unsafe { b.launch(cfg) }.map_err(wrap("fp8_gate_fold"))?;
            b_out.map(|v| {
                let st = CudaStorage { slice: CudaStorageSlice::$variant(v), device: dev.clone() };
                Tensor::from_storage(candle_core::Storage::Cuda(st), n, none(), false)
            })
        }};
    }
    let b_out = match bias.as_ref().map(|b| b.dtype()) {
        None | Some(DType::BF16) => run!(half::bf16, "bf16", BF16),
        Some(DType::F16) => run!(half::f16, "f16", F16),
        Some(DType::F32) => run!(f32, "f32", F32),
        Some(d) => candle_core::bail!("gate_fold: bias in {d:?}"),
    };
    drop(guard);
    let st = CudaStorage { slice: CudaStorageSlice::F32(s_out), device: dev.clone() };
    Ok((Tensor::from_storage(candle_core::Storage::Cuda(st), n, none(), false), b_out))
}

/// Fold jobs per `mod_finish` launch (`kModJobs` in kernels/fp8.cu).
const MOD_JOBS: usize = 4;

/// A layer's folded per-row weight scales and bias (none without one).
pub type ScaleBias = (Tensor, Option<Tensor>);

/// One fold of [`modulation_finish`]: an fp8 layer's per-row weight scales (`[n]` f32) and bias
/// (`[n]`, the modulation's dtype), and where the gate's `n` values start in the modulation output.
pub struct FoldJob<'a> {
    pub scale: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub gate: usize,
}

/// kernels/fp8.cu `FoldJob` (pointers as device addresses; 0 is null).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FoldJobArg {
    sw: u64,
    b: u64,
    sw_out: u64,
    b_out: u64,
    gate: i64,
    n: i32,
    _pad: i32,
}

/// kernels/fp8.cu `ModJobs`, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ModJobsArg {
    job: [FoldJobArg; MOD_JOBS],
    count: i32,
    _pad: i32,
}

// SAFETY: plain `repr(C)` integers laid out as the kernel's structs (8-byte fields first, explicit
// tail padding).
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for ModJobsArg {}

/// A block's modulation projection output `modv` (bf16, f16 or f32, contiguous) as f32, and each
/// job's gate folded into its layer's scales and bias exactly as [`gate_fold`] does, in one launch
/// per [`MOD_JOBS`] jobs instead of a cast and a launch per fold. The folded pairs come back in
/// the jobs' order.
pub fn modulation_finish(modv: &Tensor, jobs: &[FoldJob]) -> Result<(Tensor, Vec<ScaleBias>)> {
    let dtype = modv.dtype();
    let suffix = match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        d => candle_core::bail!("modulation_finish: a {d:?} modulation; expected bf16, f16 or f32"),
    };
    let modv = modv.contiguous()?;
    let len = modv.elem_count();
    if dtype == DType::F32 && jobs.is_empty() {
        return Ok((modv, Vec::new()));
    }
    for j in jobs {
        let n = j.scale.elem_count();
        let bias_ok = j.bias.is_none_or(|b| b.dtype() == dtype && b.elem_count() == n);
        if j.scale.dtype() != DType::F32 || !bias_ok || j.gate + n > len {
            candle_core::bail!(
                "modulation_finish: a fold of {n} {:?} scales (bias {:?}) from modulation value {} of {len} {dtype:?}",
                j.scale.dtype(),
                j.bias.map(|b| (b.dims().to_vec(), b.dtype())),
                j.gate
            );
        }
    }
    let candle_core::Device::Cuda(dev) = modv.device() else {
        candle_core::bail!("modulation_finish: GPU tensors only")
    };
    let dev = dev.clone();
    let stream = dev.cuda_stream();
    let f = function_in(&dev, Kernels::Fp8, &format!("mod_finish_{suffix}"))?;
    // Address and length of a contiguous GPU tensor the caller keeps alive past the launch.
    let cuda = |t: &Tensor| -> Result<(u64, usize)> {
        if !t.is_contiguous() {
            candle_core::bail!("modulation_finish: a strided {:?} tensor; expected a contiguous one", t.dims());
        }
        let (st, l) = t.storage_and_layout();
        let candle_core::Storage::Cuda(c) = &*st else { candle_core::bail!("modulation_finish: GPU tensors only") };
        Ok((super::address(c, l.start_offset())?, t.elem_count()))
    };
    // Outputs the kernel writes whole (part 0 the f32 copy, part 1 + j job j's n values).
    let uninit = |d: DType, n: usize| -> Result<Tensor> {
        // SAFETY: the launch below writes every element.
        let slice = unsafe {
            match d {
                DType::F32 => CudaStorageSlice::F32(stream.alloc(n).map_err(wrap("alloc"))?),
                DType::BF16 => CudaStorageSlice::BF16(stream.alloc(n).map_err(wrap("alloc"))?),
                _ => CudaStorageSlice::F16(stream.alloc(n).map_err(wrap("alloc"))?),
            }
        };
        let st = CudaStorage { slice, device: dev.clone() };
        Ok(Tensor::from_storage(candle_core::Storage::Cuda(st), n, candle_core::op::BackpropOp::none(), false))
    };
    // The f32 copy (none needed for an f32 modulation).
    let out = if dtype == DType::F32 { modv.clone() } else { uninit(DType::F32, len)?.reshape(modv.shape())? };
    let (mod_ptr, _) = cuda(&modv)?;
    let out_ptr = if dtype == DType::F32 { 0 } else { cuda(&out)?.0 };
    let mut folded = Vec::with_capacity(jobs.len());
    let groups: Vec<&[FoldJob]> = if jobs.is_empty() { vec![&[]] } else { jobs.chunks(MOD_JOBS).collect() };
    for (i, group) in groups.into_iter().enumerate() {
        let mut arg = ModJobsArg { count: group.len() as i32, ..Default::default() };
        let mut widest = if i == 0 { len } else { 0 };
        for (slot, j) in arg.job.iter_mut().zip(group) {
            let (sw, n) = cuda(j.scale)?;
            let sw_out = uninit(DType::F32, n)?;
            let b_out = j.bias.map(|_| uninit(dtype, n)).transpose()?;
            *slot = FoldJobArg {
                sw,
                b: j.bias.map(|b| cuda(b).map(|p| p.0)).transpose()?.unwrap_or(0),
                sw_out: cuda(&sw_out)?.0,
                b_out: b_out.as_ref().map(|b| cuda(b).map(|p| p.0)).transpose()?.unwrap_or(0),
                gate: j.gate as i64,
                n: n as i32,
                _pad: 0,
            };
            widest = widest.max(n);
            folded.push((sw_out, b_out));
        }
        let cfg = LaunchConfig {
            grid_dim: (widest.div_ceil(ROW_THREADS as usize).max(1) as u32, 1 + group.len() as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (out_i, len_i) = (if i == 0 { out_ptr } else { 0u64 }, len as i64);
        let mut b = stream.launch_builder(&f);
        b.arg(&mod_ptr).arg(&out_i).arg(&len_i).arg(&arg);
        // SAFETY: every address points into a live tensor of the stated length and dtype (checked
        // above); part 0 writes out[0..len], part 1 + j job j's n scales and biases.
        unsafe { b.launch(cfg) }.map_err(wrap("mod_finish"))?;
    }
    Ok((out, folded))
}
