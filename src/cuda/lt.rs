//! cuBLASLt: one handle and workspace per device (shared by the FP8 GEMM of fp8.rs and the dense
//! GEMM below), and the dense half-precision linear `y = act(x W^T + b)` with the bias and the
//! tanh-GELU applied in the GEMM's epilogue, in f32 before the one rounding to bf16/f16 (what
//! PyTorch's `addmm` with bias does). Candle's cuBLAS GEMM has no epilogue: its bias add is a
//! separate pass over the whole output, ~9 ms of a 1024² FLUX.1 step on an H200.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys as ltsys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::{DType, Result, Tensor};
use half::{bf16, f16};

use super::wrap;

/// cuBLASLt workspace per device (what its FP8 and bf16 kernels ask for at these shapes, with
/// margin).
pub const WORKSPACE_BYTES: usize = 32 << 20;
/// `cublasOperation_t` values (an int32 attribute; the enum lives in cuBLAS's own header).
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;
/// The most alignment cuBLASLt's heuristic assumes of a pointer unless told less (its default).
pub(super) const MAX_ALIGN_BYTES: u32 = 256;

/// (m, n, k, dtype, GELU, bias, alignments of x, W and y/C, SM target) of a dense GEMM.
type DenseKey = (usize, usize, usize, DType, bool, bool, [u32; 3], i32);

/// The SM count target of a GEMM enqueued now on `dev` (0: the library's choice): all but
/// [`super::comm_carve`] while an exchange is in flight.
pub(super) fn sm_target(dev: &CudaDevice) -> Result<i32> {
    match super::comm_carve() {
        0 => Ok(0),
        carve => Ok(super::sm_count(dev)?.saturating_sub(carve).max(1) as i32),
    }
}

/// (m, n, k, out dtype, outer-vector scales, epilogue, SM target, C's alignment, accumulation) of
/// an FP8 GEMM.
pub type Fp8Key = (usize, usize, usize, DType, bool, u32, i32, u32, crate::nvfp4::fp8::Fp8Accum);

/// One cuBLASLt handle and workspace per device, with the algorithms picked so far.
pub struct Lt {
    handle: ltsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// FP8 GEMMs -> algorithm, None when unsupported.
    pub(super) fp8_algos: HashMap<Fp8Key, Option<ltsys::cublasLtMatmulAlgo_t>>,
    dense_algos: HashMap<DenseKey, Option<ltsys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: the handle is used only under the mutex below, on the device's own stream.
unsafe impl Send for Lt {}

/// The device's cuBLASLt state, made on first use (each device's under its own lock: ranks on
/// several GPUs do not wait for each other).
pub fn device_lt(dev: &CudaDevice) -> Result<Arc<Mutex<Lt>>> {
    static M: OnceLock<Mutex<HashMap<DeviceId, Arc<Mutex<Lt>>>>> = OnceLock::new();
    let mut map = M.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = map.get(&dev.id()) {
        return Ok(l.clone());
    }
    let handle = lt::create_handle().map_err(wrap("cublasLtCreate"))?;
    // SAFETY: cuBLASLt may leave the workspace uninitialized.
    let workspace = unsafe { dev.cuda_stream().alloc::<u8>(WORKSPACE_BYTES) }.map_err(wrap("alloc"))?;
    let l = Arc::new(Mutex::new(Lt { handle, workspace, fp8_algos: HashMap::new(), dense_algos: HashMap::new() }));
    map.insert(dev.id(), l.clone());
    Ok(l)
}

pub(super) fn cuda_type(d: DType) -> ltsys::cudaDataType {
    match d {
        DType::F32 => ltsys::cudaDataType::CUDA_R_32F,
        DType::F16 => ltsys::cudaDataType::CUDA_R_16F,
        _ => ltsys::cudaDataType::CUDA_R_16BF,
    }
}

pub(super) fn set<T>(
    desc: ltsys::cublasLtMatmulDesc_t,
    attr: ltsys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<()> {
    // SAFETY: `v` is a live value of the attribute's type.
    unsafe { lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, std::mem::size_of::<T>()) }
        .map_err(wrap("cublasLtMatmulDescSetAttribute"))
}

/// Descriptors of `D[n x m] = op(W)[n x k] * X[k x m]` in cuBLAS's column-major terms (W
/// `[N, K]` row-major, transposed; X `[M, K]` row-major; D is `[M, N]` row-major): the "TN"
/// layout, which Hopper's FP8 GEMMs require and the half-precision ones take as well.
pub(super) struct Descs {
    pub matmul: ltsys::cublasLtMatmulDesc_t,
    pub a: ltsys::cublasLtMatrixLayout_t,
    pub b: ltsys::cublasLtMatrixLayout_t,
    pub d: ltsys::cublasLtMatrixLayout_t,
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: created below, destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.matmul);
        }
    }
}

impl Descs {
    /// f32 accumulation, operands of type `input`, output `out`.
    pub(super) fn tn(m: usize, n: usize, k: usize, input: ltsys::cudaDataType, out: DType) -> Result<Self> {
        use ltsys::cublasLtMatmulDescAttributes_t as A;
        let matmul =
            lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, ltsys::cudaDataType::CUDA_R_32F)
                .map_err(wrap("cublasLtMatmulDescCreate"))?;
        let descs = Descs {
            matmul,
            a: lt::create_matrix_layout(input, k as u64, n as u64, k as i64).map_err(wrap("layout A"))?,
            b: lt::create_matrix_layout(input, k as u64, m as u64, k as i64).map_err(wrap("layout B"))?,
            d: lt::create_matrix_layout(cuda_type(out), n as u64, m as u64, n as i64).map_err(wrap("layout D"))?,
        };
        set(matmul, A::CUBLASLT_MATMUL_DESC_TRANSA, &CUBLAS_OP_T)?;
        set(matmul, A::CUBLASLT_MATMUL_DESC_TRANSB, &CUBLAS_OP_N)?;
        Ok(descs)
    }
}

/// The largest power of two (up to [`MAX_ALIGN_BYTES`]) dividing `addr`.
pub(super) fn alignment(addr: u64) -> u32 {
    (1u64 << addr.trailing_zeros().min(MAX_ALIGN_BYTES.trailing_zeros())) as u32
}

/// Whether cuBLASLt may split K and add the parts (`CANDIFF_GEMM_SPLIT_K=1`; default no). Without
/// split-K every output element is one f32 sum over K in k-tile order whatever kernel the
/// heuristic picks for M, so a row's result does not depend on how many other rows share the GEMM:
/// sequence-parallel ranks (M / N tokens each) then reproduce the single-GPU output exactly. With
/// it, FLUX.1 bf16 on 2 ranks differed from 1 GPU by rel. L2 1.46e-2 (docs/PERF.md).
fn split_k_allowed() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("CANDIFF_GEMM_SPLIT_K").as_deref() == Ok("1"))
}

/// cuBLASLt's first algorithm for `d` within the workspace, told the operands' alignment in bytes
/// (x, W, and the smaller of y's and C's): it otherwise assumes 256 bytes, and a kernel relying on
/// that would read misaligned views (row offsets of a larger activation). No split-K unless
/// [`split_k_allowed`].
pub(super) fn heuristic(
    ltd: &Lt,
    d: &Descs,
    align: [u32; 3],
) -> std::result::Result<ltsys::cublasLtMatmulAlgo_t, String> {
    use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
    let pref = lt::create_matmul_pref().map_err(|e| e.to_string())?;
    let ws = WORKSPACE_BYTES;
    let set_pref = |attr: P, v: *const c_void, size: usize| {
        // SAFETY: `v` points at a live value of the attribute's type.
        unsafe { lt::set_matmul_pref_attribute(pref, attr, v, size) }.map_err(|e| e.to_string())
    };
    let r = (|| {
        set_pref(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const usize as _, std::mem::size_of::<usize>())?;
        let attrs = [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
        ];
        for (attr, a) in attrs.iter().zip([align[0], align[1], align[2], align[2]]) {
            set_pref(*attr, &a as *const u32 as _, std::mem::size_of::<u32>())?;
        }
        if !split_k_allowed() {
            let none = ltsys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_NONE as u32;
            set_pref(
                P::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                &none as *const u32 as _,
                std::mem::size_of::<u32>(),
            )?;
        }
        // SAFETY: valid descriptors and preference.
        unsafe { lt::get_matmul_algo_heuristic(ltd.handle, d.matmul, d.a, d.b, d.d, d.d, pref) }
            .map(|h| h.algo)
            .map_err(|e| e.to_string())
    })();
    // SAFETY: created above, destroyed once.
    unsafe {
        let _ = lt::destroy_matmul_pref(pref);
    }
    r
}

/// Runs `D = alpha (W x) + beta C` (plus the descriptors' epilogue) with `algo`, on `stream`:
/// addresses of W, x, C (D's own buffer when beta = 0) and D.
///
/// # Safety
/// The descriptors must match the buffers' types, shapes and leading dimensions (C has D's), and
/// every buffer (and any bias or scale the descriptors point at) must outlive the GEMM in stream
/// order.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_tn(
    ltd: &mut Lt,
    d: &Descs,
    algo: &ltsys::cublasLtMatmulAlgo_t,
    (w_ptr, x_ptr, c_ptr, y_ptr): (u64, u64, u64, u64),
    beta: f32,
    stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    what: &'static str,
) -> Result<()> {
    let alpha = 1f32;
    let ws_len = ltd.workspace.len();
    let (ws_ptr, _g) = ltd.workspace.device_ptr_mut(stream);
    lt::matmul(
        ltd.handle,
        d.matmul,
        &alpha as *const f32 as *const c_void,
        &beta as *const f32 as *const c_void,
        w_ptr as *const c_void,
        d.a,
        x_ptr as *const c_void,
        d.b,
        c_ptr as *const c_void,
        d.d,
        y_ptr as *mut c_void,
        d.d,
        algo,
        ws_ptr as *mut c_void,
        ws_len,
        stream.cu_stream() as ltsys::cudaStream_t,
    )
    .map_err(wrap(what))
}

/// The epilogue adding a bias (when `bias`) and applying tanh-GELU (when `gelu`).
pub(super) fn epilogue(bias: bool, gelu: bool) -> ltsys::cublasLtEpilogue_t {
    use ltsys::cublasLtEpilogue_t as E;
    match (bias, gelu) {
        (true, true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
        (true, false) => E::CUBLASLT_EPILOGUE_BIAS,
        (false, true) => E::CUBLASLT_EPILOGUE_GELU,
        (false, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
    }
}

/// Device address of a bf16 / f16 GPU tensor's first element (`what` names it in the error).
pub(super) fn half_tensor_address(t: &Tensor, what: &str) -> Result<u64> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        candle_core::Storage::Cuda(s) => address(s, l.start_offset(), &s.device.cuda_stream()),
        _ => candle_core::bail!("{what} must be a bf16 or f16 GPU tensor"),
    }
}

/// Device address of element `offset` of a half-precision storage.
fn address(
    s: &CudaStorage,
    offset: usize,
    stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> Result<u64> {
    Ok(match &s.slice {
        CudaStorageSlice::BF16(x) => x.device_ptr(stream).0 + (offset * 2) as u64,
        CudaStorageSlice::F16(x) => x.device_ptr(stream).0 + (offset * 2) as u64,
        _ => candle_core::bail!("dense cuBLASLt GEMM takes bf16 or f16, found {:?}", s.dtype()),
    })
}

/// `act(x W^T + b) [+ acc]` for bf16/f16 `x` `[..., K]` and `w` `[N, K]` (bias `[N]` in the same
/// dtype; `gelu`: tanh-GELU, not with `acc`; `acc` `[..., N]` is added by the GEMM, beta = 1)
/// through cuBLASLt with the epilogue; `None` where it does not apply (other dtypes, CPU tensors,
/// no cuBLASLt algorithm for the shape, K or N not a multiple of 8), for the caller's plain path.
pub fn dense_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    gelu: bool,
    acc: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let dtype = x.dtype();
    let (n, k) = w.dims2()?;
    // cuBLASLt's half-precision kernels want 16-byte leading dimensions.
    const LD_ALIGN: usize = 8;
    if !matches!(dtype, DType::BF16 | DType::F16)
        || !x.device().is_cuda()
        || w.dtype() != dtype
        || bias.is_some_and(|b| b.dtype() != dtype || b.elem_count() != n)
        || x.dims().last() != Some(&k)
        || k % LD_ALIGN != 0
        || n % LD_ALIGN != 0
        || (acc.is_some() && gelu)
        || acc.is_some_and(|a| a.dtype() != dtype || a.elem_count() != x.elem_count() / k * n)
    {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    if m == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (w, bias) = (w.contiguous()?, bias.map(|b| b.contiguous()).transpose()?);
    let acc = acc.map(|a| a.contiguous()).transpose()?;
    let candle_core::Device::Cuda(dev) = x.device() else { return Ok(None) };
    let dev = dev.clone();
    let stream = dev.cuda_stream();
    let x_ptr = half_tensor_address(&x, "the dense GEMM's input")?;
    let w_ptr = half_tensor_address(&w, "the dense weight")?;
    let b_ptr = bias.as_ref().map(|b| half_tensor_address(b, "the dense bias")).transpose()?;
    let c_ptr = acc.as_ref().map(|a| half_tensor_address(a, "the accumulated tensor")).transpose()?;
    // SAFETY: the GEMM writes every element.
    let mut y = match dtype {
        DType::F16 => CudaStorageSlice::F16(unsafe { stream.alloc::<f16>(m * n) }.map_err(wrap("alloc"))?),
        _ => CudaStorageSlice::BF16(unsafe { stream.alloc::<bf16>(m * n) }.map_err(wrap("alloc"))?),
    };
    let epilogue = epilogue(b_ptr.is_some(), gelu);
    let state = device_lt(&dev)?;
    let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
    let ltd = &mut *guard;
    {
        let (y_ptr, _gy) = match &mut y {
            CudaStorageSlice::F16(v) => v.device_ptr_mut(&stream),
            CudaStorageSlice::BF16(v) => v.device_ptr_mut(&stream),
            _ => unreachable!("allocated above"),
        };
        let c_ptr = c_ptr.unwrap_or(y_ptr);
        let align = [alignment(x_ptr), alignment(w_ptr), alignment(y_ptr).min(alignment(c_ptr))];
        let d = Descs::tn(m, n, k, cuda_type(dtype), dtype)?;
        set(d.matmul, ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as u32))?;
        let sms = sm_target(&dev)?;
        if sms > 0 {
            set(d.matmul, ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sms)?;
        }
        if let Some(bp) = b_ptr {
            set(d.matmul, ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp)?;
        }
        let key = (m, n, k, dtype, gelu, b_ptr.is_some(), align, sms);
        // C is read only with beta = 1 (D's own buffer otherwise, unread).
        let beta = if acc.is_some() { 1f32 } else { 0f32 };
        let algo = match ltd.dense_algos.get(&key) {
            Some(a) => *a,
            None => {
                let a = heuristic(ltd, &d, align)
                    .map_err(|why| {
                        log::debug!("cuBLASLt has no bf16 GEMM with epilogue for M {m} N {n} K {k}: {why}");
                    })
                    .ok();
                ltd.dense_algos.insert(key, a);
                a
            }
        };
        let Some(algo) = algo else { return Ok(None) };
        // SAFETY: descriptors match the buffers' types, shapes and leading dimensions (C has D's);
        // the bias holds N values; all live until the GEMM has run (stream order).
        unsafe {
            matmul_tn(ltd, &d, &algo, (w_ptr, x_ptr, c_ptr, y_ptr), beta, &stream, "cublasLtMatmul (dense)")?;
        }
    }
    drop(guard);
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("non-empty") = n;
    Ok(Some(Tensor::from_storage(
        candle_core::Storage::Cuda(CudaStorage { slice: y, device: dev }),
        out_dims,
        candle_core::op::BackpropOp::none(),
        false,
    )))
}
