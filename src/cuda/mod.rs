//! GPU execution of the NVFP4 variants (compiled only with `--features cuda`).
//!
//! Kernels live in `kernels/*.cu`, built by `build.rs` into one fatbin that is loaded once per
//! device. Each launch validates its inputs; nothing here converts weights at run time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaModule, CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::{DType, Layout, Result, Shape};
use half::{bf16, f16};

use crate::error::CandiffError;
use crate::nvfp4::layout::LayoutKind;
use crate::nvfp4::linear::Nvfp4Matmul;
use crate::nvfp4::{tiling, ActMode, Backend};

static NVFP4_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nvfp4.fatbin"));
static FUSED_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused.fatbin"));
static FP8_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fp8.fatbin"));
static SM90_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nvfp4_sm90.fatbin"));
#[cfg(candiff_cutlass)]
static CUTLASS_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/nvfp4_cutlass.fatbin"));

#[cfg(feature = "cudnn")]
pub mod attn_fp8;
#[cfg(feature = "cudnn")]
pub mod cudnn;
pub mod exchange;
pub mod fp8;
pub mod fused;
pub mod lt;
#[cfg(candiff_sm100)]
pub mod sm100;

/// The compiled kernel modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kernels {
    /// trtllm variant, activation quantizer, conversions (kernels/nvfp4.cu).
    Nvfp4,
    /// Fused element-wise kernels of the transformer blocks (kernels/fused.cu).
    Fused,
    /// FP8-mode conversions (kernels/fp8.cu).
    Fp8,
    /// trtllm variant's wgmma GEMM, sm_90a SASS only (kernels/nvfp4_sm90.cu).
    Sm90,
    /// cutlass variant, CuTe (kernels/nvfp4_cutlass.cu).
    #[cfg(candiff_cutlass)]
    Cutlass,
}

impl Kernels {
    fn image(self) -> &'static [u8] {
        match self {
            Kernels::Nvfp4 => NVFP4_FATBIN,
            Kernels::Fused => FUSED_FATBIN,
            Kernels::Fp8 => FP8_FATBIN,
            Kernels::Sm90 => SM90_FATBIN,
            #[cfg(candiff_cutlass)]
            Kernels::Cutlass => CUTLASS_FATBIN,
        }
    }
}

/// Output tile of the W4A16 GEMM kernel (`BM`, `BN` in kernels/nvfp4.cu) and its block size.
const GEMM_TILE_M: u32 = 128;
const GEMM_TILE_N: u32 = 128;
const GEMM_THREADS: u32 = 256;
/// Up to this many rows the memory-bound GEMV kernel runs instead (`GEMV_MAX_M`), with one warp
/// per output column and `GEMV_WARPS` warps per block.
const GEMV_MAX_M: usize = 16;
const GEMV_WARPS: u32 = 8;
/// Output features per CTA of the sm_90 wgmma GEMM (`kRows`), its block size, its pipeline depth
/// (`kStages`), the bytes one token takes in a 64-wide K tile, and the weight bytes of a tile (128
/// rows x 32 code bytes + one 512-byte scale tile).
const SM90_ROWS: u32 = tiling::SM90_ROWS as u32;
const SM90_THREADS: u32 = 256;
const SM90_STAGES: u32 = 5;
const SM90_TILE_BYTES_PER_TOKEN: u32 = 128;
const SM90_WEIGHT_TILE_BYTES: u32 = 128 * 32 + 512;
/// The sm_90 GEMV: largest compiled K split (CTAs per cluster, `__cluster_dims__`), code bytes of
/// a row in one 256-wide K chunk (`kGemvChunkBytes`), block size (`kGemvWarps` x 32).
const SM90_GEMV_MAX_SPLIT: usize = 8;
const SM90_GEMV_CHUNK_BYTES: usize = 128;
const SM90_GEMV_THREADS: u32 = 256;
/// The bulk GEMV: the eight computing warps and the copying one.
const SM90_GEMV_BULK_THREADS: u32 = 288;
/// Slack to align the first stage to the 1024-byte period of the 128-byte swizzle.
const SM90_ALIGN_SLACK: u32 = 1024;
/// The TMA form's CTAs per cluster (`tma::kCtas`: a pair of feature blocks), the bytes of one of
/// its mbarriers (a full and an empty one per stage), its producer warpgroup
/// (`tma::kProducerThreads`, after the two consumer ones) and its compiled pipeline depths.
const SM90_TMA_CTAS: usize = 2;
const SM90_BARRIER_BYTES: u32 = 8;
const SM90_TMA_PRODUCER_THREADS: u32 = 128;
const SM90_TMA_STAGE_CHOICES: [u32; 2] = [5, 6];
const SM90_TMA_DEFAULT_STAGES: u32 = 6;
/// The TMA-store epilogue (`tmast` kernels): a warp's box of 16 features x
/// [`sm90_store_box_tokens`] tokens, eight consumer warps' boxes in shared memory, which leaves
/// room for 5 stages at 256 tokens.
const SM90_TMA_STORE_BOX_FEATURES: u32 = 16;
const SM90_CONSUMER_WARPS: u32 = 8;
const SM90_TMA_STORE_STAGES: u32 = 5;
/// Tokens per staging box at `bt` tokens per CTA (`tma::store_tokens`): the tile up to 128 tokens,
/// else half of it where that is a whole number of 16-token stmatrix steps, else all of it (176,
/// 208).
fn sm90_store_box_tokens(bt: u32) -> u32 {
    const STMATRIX_TOKENS: u32 = 16;
    if bt <= 128 {
        bt
    } else if (bt / 2).is_multiple_of(STMATRIX_TOKENS) {
        bt / 2
    } else {
        bt
    }
}
/// The staging boxes' shared memory at `bt` tokens per CTA (16-bit outputs).
fn sm90_store_staging_bytes(bt: u32) -> u32 {
    SM90_CONSUMER_WARPS * SM90_TMA_STORE_BOX_FEATURES * sm90_store_box_tokens(bt) * 2
}
/// The TMA form with K parts in its clusters (`tmak{2,3,4}` kernels, split tiles): per-element
/// stores, 6 stages whatever `CANDIFF_SM90_TMA_STAGES` says; up to 4 parts (clusters of 8 CTAs,
/// the portable limit).
const SM90_TMA_SPLIT_STAGES: u32 = 6;
/// The oldest GPU our kernels are built for (bf16 tensor cores, sm_80).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

type ModuleCache = Mutex<HashMap<(DeviceId, Kernels), Arc<CudaModule>>>;

fn modules() -> &'static ModuleCache {
    static M: OnceLock<ModuleCache> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// The NUL-terminated message a C++ shim wrote into `buf`.
pub(crate) fn ffi_message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// bf16 values per 16-byte vector of the register-resident row kernels.
pub(crate) const ROW_VEC_ELEMS: usize = 8;
/// Most vectors per thread of their instances (`*_t{128,256}_v{1..=8}`).
const ROW_VEC_MAX_PER_THREAD: usize = 8;
/// Rows up to this many values go to 128-thread blocks, longer ones to 256.
const ROW_VEC_SMALL: usize = 128 * ROW_VEC_ELEMS * ROW_VEC_MAX_PER_THREAD;

/// The register-resident kernel instance (block size, 16-byte vectors per thread) for bf16 rows
/// of `c` values whose buffers start at element offsets `starts` (16-byte alignment needs
/// multiples of 8): kernels/fused.cu `*_rows_t*_v*` and kernels/fp8.cu `fp8_quant_rows_t*_v*`,
/// which read a row once in 16-byte vectors where the scalar kernels read it element by element,
/// twice or more. `None` where the row does not fit or is misaligned: the scalar kernel.
/// `CANDIFF_ROW_VEC=0` keeps the scalar kernels everywhere, for A/B measurements.
pub(crate) fn row_vec(c: usize, starts: &[usize]) -> Option<(u32, usize)> {
    static ON: OnceLock<bool> = OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("CANDIFF_ROW_VEC").as_deref() != Ok("0"));
    let threads = if c <= ROW_VEC_SMALL { 128 } else { 256 };
    let per_thread = (c / ROW_VEC_ELEMS).div_ceil(threads);
    (on && c.is_multiple_of(ROW_VEC_ELEMS)
        && (1..=ROW_VEC_MAX_PER_THREAD).contains(&per_thread)
        && starts.iter().all(|s| s.is_multiple_of(ROW_VEC_ELEMS)))
    .then_some((threads as u32, per_thread))
}

/// The kernel name and block size of a row kernel: `{vec_prefix}_t{threads}_v{nv}` where
/// [`row_vec`] chose an instance, else the scalar kernel `scalar` with `scalar_threads`.
pub(crate) fn row_kernel(
    vec: Option<(u32, usize)>,
    vec_prefix: &str,
    scalar: String,
    scalar_threads: u32,
) -> (String, u32) {
    match vec {
        Some((t, nv)) => (format!("{vec_prefix}_t{t}_v{nv}"), t),
        None => (scalar, scalar_threads),
    }
}

pub(crate) fn wrap<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> candle_core::Error + '_ {
    move |e| candle_core::Error::Msg(format!("{what}: {e}"))
}

/// Kernel handles already looked up, per device and module: a lookup is a driver call, and
/// launchers run once per layer call (several thousand times per denoising step).
type FunctionCache = Mutex<HashMap<(DeviceId, Kernels), HashMap<String, CudaFunction>>>;

/// `kernels`' module on `dev`, loaded once.
fn module_of(dev: &CudaDevice, kernels: Kernels) -> Result<Arc<CudaModule>> {
    let mut m = modules().lock().expect("module cache poisoned");
    if let Some(module) = m.get(&(dev.id(), kernels)) {
        return Ok(module.clone());
    }
    let image = candle_core::cuda_backend::cudarc::nvrtc::Ptx::from_binary(kernels.image().to_vec());
    let module = dev.cuda_stream().context().load_module(image).map_err(wrap("loading the NVFP4 kernels"))?;
    m.insert((dev.id(), kernels), module.clone());
    Ok(module)
}

/// The Hopper GEMM's phase log ([`crate::nvfp4::phases`]) as it stands after the stream's work so
/// far, zeroed for the next launch (the caller launches, then takes).
#[cfg(feature = "sm90-phases")]
pub fn sm90_phases_take(dev: &CudaDevice) -> Result<Vec<u64>> {
    use crate::nvfp4::phases::PHASE_SYMBOL;
    let module = module_of(dev, Kernels::Sm90)?;
    let stream = dev.cuda_stream();
    let mut log = module.get_global(PHASE_SYMBOL, &stream).map_err(wrap(PHASE_SYMBOL))?;
    let bytes = stream.clone_dtoh(&log).map_err(wrap(PHASE_SYMBOL))?;
    stream.memset_zeros(&mut log).map_err(wrap(PHASE_SYMBOL))?;
    stream.synchronize().map_err(wrap(PHASE_SYMBOL))?;
    Ok(crate::nvfp4::phases::words_of(&bytes))
}

fn function_in(dev: &CudaDevice, kernels: Kernels, name: &str) -> Result<CudaFunction> {
    static FUNCTIONS: OnceLock<FunctionCache> = OnceLock::new();
    let functions = FUNCTIONS.get_or_init(Default::default);
    if let Some(f) =
        functions.lock().expect("function cache poisoned").get(&(dev.id(), kernels)).and_then(|m| m.get(name))
    {
        return Ok(f.clone());
    }
    let f = module_of(dev, kernels)?.load_function(name).map_err(wrap(name))?;
    functions
        .lock()
        .expect("function cache poisoned")
        .entry((dev.id(), kernels))
        .or_default()
        .insert(name.to_string(), f.clone());
    Ok(f)
}

fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    function_in(dev, Kernels::Nvfp4, name)
}

/// What the kernels' dispatch needs to know about a device, queried once per device.
#[derive(Debug, Clone, Copy)]
struct DeviceProps {
    /// (major, minor) compute capability.
    cc: (i32, i32),
    /// Streaming multiprocessors.
    sms: usize,
}

fn device_props(dev: &CudaDevice) -> Result<DeviceProps> {
    static CACHE: OnceLock<Mutex<HashMap<DeviceId, DeviceProps>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().expect("device cache poisoned").get(&dev.id()) {
        return Ok(*p);
    }
    let ctx = dev.cuda_stream().context().clone();
    let attr = |a, what| ctx.attribute(a).map_err(wrap(what));
    use sys::CUdevice_attribute as A;
    let props = DeviceProps {
        cc: (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "cc")?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, "cc")?,
        ),
        sms: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "SM count")? as usize,
    };
    cache.lock().expect("device cache poisoned").insert(dev.id(), props);
    Ok(props)
}

/// Streaming multiprocessors of the device (queried once per device).
pub fn sm_count(dev: &CudaDevice) -> Result<usize> {
    Ok(device_props(dev)?.sms)
}

/// (major, minor) compute capability (queried once per device).
pub fn compute_capability(dev: &CudaDevice) -> Result<(i32, i32)> {
    Ok(device_props(dev)?.cc)
}

/// GPU name, driver version (e.g. 13000) and total memory in bytes.
pub fn device_info(dev: &CudaDevice) -> Result<(String, i32, usize)> {
    let ctx = dev.cuda_stream().context().clone();
    let name = ctx.name().map_err(wrap("device name"))?;
    let mem = ctx.total_mem().map_err(wrap("device memory"))?;
    let mut v = 0i32;
    // SAFETY: plain out-parameter query; the driver is initialised (we hold a context).
    unsafe { sys::cuDriverGetVersion(&mut v) };
    Ok((name, v, mem))
}

/// The layout `backend` prepares weights in on this device.
pub fn layout_for(backend: Backend, dev: &CudaDevice) -> Result<LayoutKind> {
    let cc = compute_capability(dev)?;
    Ok(match backend {
        // cuDNN's engines without FP4 tensor cores only take linear block scales.
        Backend::Cudnn if cc.0 < 10 => LayoutKind::CutlassLinearScales,
        // The Hopper kernels read their own code order (fewer instructions per weight).
        Backend::Trtllm if hopper_kernels(dev)? => LayoutKind::TrtllmSm90,
        b => b.layout(),
    })
}

/// Can `backend` run on this device with this build? Errors say what is missing.
pub fn check_backend(backend: Backend, dev: &CudaDevice) -> Result<()> {
    let cc = compute_capability(dev)?;
    if cc < MIN_COMPUTE_CAPABILITY {
        return Err(CandiffError::Unsupported(format!(
            "the NVFP4 {backend} variant needs compute capability {}.{} or newer, this GPU has {}.{}",
            MIN_COMPUTE_CAPABILITY.0, MIN_COMPUTE_CAPABILITY.1, cc.0, cc.1
        ))
        .into());
    }
    let missing = |why: &str| -> Result<()> {
        Err(CandiffError::Unsupported(format!("the NVFP4 {backend} variant {why}")).into())
    };
    match backend {
        Backend::Trtllm => Ok(()),
        Backend::Cutlass if cfg!(candiff_cutlass) => Ok(()),
        Backend::Cutlass => missing(
            "was left out of this build (no CUTLASS headers): rebuild after `scripts/setup-cuda.sh --cutlass`, or use trtllm",
        ),
        #[cfg(feature = "cudnn")]
        Backend::Cudnn => cudnn::check_version(),
        #[cfg(not(feature = "cudnn"))]
        Backend::Cudnn => missing("needs a build with `--features cudnn`; or use trtllm"),
    }
}

fn launch_1d(n: usize) -> LaunchConfig {
    const T: u32 = 256;
    LaunchConfig { grid_dim: ((n as u32).div_ceil(T), 1, 1), block_dim: (T, 1, 1), shared_mem_bytes: 0 }
}

fn view<'a, T: candle_core::cuda_backend::CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("nvfp4: {what} must be contiguous")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// Device address of element `offset` of `s` (bf16, f16, f32 or u32 storage): for kernels that
/// take pointers inside a struct argument or at an offset the launch builder cannot express.
pub(crate) fn address(s: &CudaStorage, offset: usize) -> Result<u64> {
    let stream = s.device.cuda_stream();
    let (base, es) = match &s.slice {
        CudaStorageSlice::BF16(x) => (x.device_ptr(&stream).0, 2),
        CudaStorageSlice::F16(x) => (x.device_ptr(&stream).0, 2),
        CudaStorageSlice::F32(x) => (x.device_ptr(&stream).0, 4),
        CudaStorageSlice::U32(x) => (x.device_ptr(&stream).0, 4),
        _ => candle_core::bail!("a device address of {:?} storage: expected bf16, f16, f32 or u32", s.dtype()),
    };
    Ok(base + (offset * es) as u64)
}

/// Alignment in bytes of every fresh device allocation, which the GEMM kernels may rely on for x.
const ALLOC_ALIGN_BYTES: usize = 256;

/// A bf16 input read where it lies: contiguous and as aligned as a fresh allocation. (Copying it
/// instead cost a read and a write of every activation before each NVFP4 GEMM: ~6 ms of a FLUX.1
/// 1024² W4A16 step, docs/PERF.md session 14.) None: the caller converts or copies it.
fn in_place_bf16<'a>(s: &'a CudaStorage, l: &Layout) -> Result<Option<CudaView<'a, bf16>>> {
    let aligned = (l.start_offset() * std::mem::size_of::<bf16>()).is_multiple_of(ALLOC_ALIGN_BYTES);
    if s.dtype() != DType::BF16 || !aligned || l.contiguous_offsets().is_none() {
        return Ok(None);
    }
    view::<bf16>(s, l, "input").map(Some)
}

/// x as contiguous bf16 in a fresh buffer (f32/f16 inputs are rounded, as the reference quantizer
/// sees them).
fn input_bf16(s: &CudaStorage, l: &Layout) -> Result<CudaSlice<bf16>> {
    let dev = &s.device;
    let n = l.shape().elem_count();
    let stream = dev.cuda_stream();
    // SAFETY: every element is written by the copy or the conversion kernel below.
    let mut out = unsafe { stream.alloc::<bf16>(n) }.map_err(wrap("alloc"))?;
    match s.dtype() {
        DType::BF16 => {
            let v = view::<bf16>(s, l, "input")?;
            stream.memcpy_dtod(&v, &mut out).map_err(wrap("copy"))?;
        }
        DType::F32 | DType::F16 => {
            let name = if s.dtype() == DType::F32 { "f32_to_bf16" } else { "f16_to_bf16" };
            let f = function(dev, name)?;
            let mut b = stream.launch_builder(&f);
            let (vf32, vf16);
            if s.dtype() == DType::F32 {
                vf32 = view::<f32>(s, l, "input")?;
                b.arg(&vf32);
            } else {
                vf16 = view::<f16>(s, l, "input")?;
                b.arg(&vf16);
            }
            b.arg(&mut out);
            b.arg(&n);
            // SAFETY: argument types match the kernel signature; n bounds every access.
            unsafe { b.launch(launch_1d(n)) }.map_err(wrap(name))?;
        }
        d => candle_core::bail!("nvfp4 linear: input must be bf16, f16 or f32, found {d:?}"),
    }
    Ok(out)
}

/// Quantizes bf16 activations `[m, k]` with `input_scale`: packed codes + 128x4 scales when
/// `codes` is true, and the exact bf16 block-scaled values (for the tensor-core GEMM) when `deq` is.
pub fn quantize_activations(
    dev: &CudaDevice,
    x: &CudaView<bf16>,
    m: usize,
    k: usize,
    input_scale: f32,
    codes: bool,
    deq: bool,
) -> Result<(Option<(CudaSlice<u8>, CudaSlice<u8>)>, Option<CudaSlice<bf16>>)> {
    quantize_activations_padded(dev, x, m, k, k, input_scale, codes, deq)
}

/// As [`quantize_activations`], with code rows `k_pad / 2` bytes apart (zero padding past K).
#[allow(clippy::too_many_arguments)]
pub fn quantize_activations_padded(
    dev: &CudaDevice,
    x: &CudaView<bf16>,
    m: usize,
    k: usize,
    k_pad: usize,
    input_scale: f32,
    codes: bool,
    deq: bool,
) -> Result<(Option<(CudaSlice<u8>, CudaSlice<u8>)>, Option<CudaSlice<bf16>>)> {
    let stream = dev.cuda_stream();
    let kb = k / 16;
    let scale_cols = kb.div_ceil(4) * 4;
    let scale_rows = m.div_ceil(128) * 128;
    let mut packed = if codes { Some(stream.alloc_zeros::<u8>(m * k_pad / 2).map_err(wrap("alloc"))?) } else { None };
    let mut scales =
        if codes { Some(stream.alloc_zeros::<u8>(scale_rows * scale_cols).map_err(wrap("alloc"))?) } else { None };
    let mut out = if deq { Some(stream.alloc_zeros::<bf16>(m * k).map_err(wrap("alloc"))?) } else { None };
    let f = function(dev, "nvfp4_quantize_act_bf16")?;
    let (m_i, k_i, sc_i, row_i) = (m as i32, k as i32, scale_cols as i32, (k_pad / 2) as i32);
    let null = 0u64;
    let mut b = stream.launch_builder(&f);
    b.arg(x).arg(&m_i).arg(&k_i).arg(&input_scale);
    match (&mut packed, &mut scales) {
        (Some(p), Some(s)) => {
            b.arg(p).arg(&row_i).arg(s);
        }
        _ => {
            b.arg(&null).arg(&row_i).arg(&null);
        }
    }
    b.arg(&sc_i);
    match &mut out {
        Some(o) => b.arg(o),
        None => b.arg(&null),
    };
    // SAFETY: argument types match the kernel; null pointers disable the matching outputs.
    unsafe { b.launch(launch_1d(m * kb)) }.map_err(wrap("nvfp4_quantize_act_bf16"))?;
    Ok((packed.zip(scales), out))
}

/// One GEMM as every variant's entry point takes it: bf16 activations `[m, k]`, the prepared weight
/// and scales, and the output dtype.
#[derive(Clone, Copy)]
pub(crate) struct GemmCall<'a> {
    pub op: &'a Nvfp4Matmul,
    pub dev: &'a CudaDevice,
    pub x: &'a CudaView<'a, bf16>,
    pub w: &'a CudaView<'a, u8>,
    pub sc: &'a CudaView<'a, u8>,
    pub m: usize,
    pub out_dtype: DType,
}

/// What the sm90 W4A16 GEMM fuses around the product where [`epilogue_in_gemm`] (and, for a
/// second input part, [`parts_in_gemm`]) says it runs: the bias `[N]` in the output's dtype
/// (contiguous), tanh-GELU on output features `>= gelu_from`, and the input's features past the
/// first part's read from `second` (rows of either part may be strided).
pub struct Epilogue<'a> {
    pub bias: Option<(&'a CudaStorage, &'a Layout)>,
    pub gelu_from: Option<usize>,
    pub second: Option<(&'a CudaStorage, &'a Layout)>,
}

/// bf16 rows read where they lie by the sm90 GEMM: the view from the first row's start, the row
/// count, and the row stride in elements. The kernel copies 16-byte pieces, so the start and the
/// stride must keep 16-byte alignment; the last dimension must be dense and the leading ones must
/// collapse into one uniform row stride (a slice of columns, as a fused projection's outputs are).
fn strided_rows<'a>(s: &'a CudaStorage, l: &Layout) -> Result<Option<(CudaView<'a, bf16>, usize, usize)>> {
    const ALIGN_ELEMS: usize = 16 / std::mem::size_of::<bf16>();
    let (dims, strides) = (l.shape().dims(), l.stride());
    let Some((&w, lead)) = dims.split_last() else { return Ok(None) };
    if s.dtype() != DType::BF16 || w == 0 || strides[dims.len() - 1] != 1 {
        return Ok(None);
    }
    let rows: usize = lead.iter().product();
    // The row stride: that of the innermost leading dimension of size > 1 (w when there is none);
    // every outer one must be a whole multiple of rows at that stride.
    let mut ld = None;
    let mut expect = 0;
    for i in (0..lead.len()).rev() {
        if lead[i] == 1 {
            continue;
        }
        match ld {
            None => {
                ld = Some(strides[i]);
                expect = strides[i] * lead[i];
            }
            Some(_) if strides[i] == expect => expect *= lead[i],
            Some(_) => return Ok(None),
        }
    }
    let ld = ld.unwrap_or(w);
    if ld < w || !ld.is_multiple_of(ALIGN_ELEMS) || !l.start_offset().is_multiple_of(ALIGN_ELEMS) {
        return Ok(None);
    }
    let start = l.start_offset();
    let end = start + (rows - 1) * ld + w;
    Ok(Some((s.as_cuda_slice::<bf16>()?.slice(start..end), rows, ld)))
}

/// Whether `[first, second] W^T` of this W4A16 layer (the input's features split after the first
/// part's) runs as one sm90 GEMM reading both parts where they lie ([`epilogue_in_gemm`]'s
/// conditions, both parts bf16 rows of 16-byte alignment, the split on a 64-wide K tile).
pub fn parts_in_gemm(op: &Nvfp4Matmul, first: &candle_core::Tensor, second: &candle_core::Tensor) -> Result<bool> {
    let (c, w) = (first.dims().last().copied().unwrap_or(0), second.dims().last().copied().unwrap_or(0));
    let rows = |t: &candle_core::Tensor| t.elem_count() / t.dims().last().copied().unwrap_or(1).max(1);
    if c + w != op.k
        || !c.is_multiple_of(tiling::SM90_K_TILE)
        || c == 0
        || w == 0
        || rows(first) != rows(second)
        || first.dtype() != DType::BF16
        || second.dtype() != DType::BF16
        || !first.device().same_device(second.device())
    {
        return Ok(false);
    }
    let fits = |t: &candle_core::Tensor| -> Result<bool> {
        let (st, l) = t.storage_and_layout();
        Ok(match &*st {
            candle_core::Storage::Cuda(s) => strided_rows(s, l)?.is_some(),
            _ => false,
        })
    };
    Ok(fits(first)? && fits(second)? && epilogue_in_gemm(op, first, None)? && rows(first) > tiling::SM90_GEMV_MAX_M)
}

/// Whether `act(x W^T + b)` of this W4A16 layer runs as one kernel with the bias and activation in
/// its epilogue on this device: the trtllm variant's sm90 GEMM or GEMV (M <= 16), with the bias
/// in the output's dtype (x's, bf16 for bf16 input). Else the caller adds them in a pass after.
pub fn epilogue_in_gemm(op: &Nvfp4Matmul, x: &candle_core::Tensor, bias: Option<&candle_core::Tensor>) -> Result<bool> {
    let candle_core::Device::Cuda(dev) = x.device() else { return Ok(false) };
    let out_dtype = match x.dtype() {
        DType::F32 | DType::F16 => x.dtype(),
        _ => DType::BF16,
    };
    let bias_fits = bias.is_none_or(|b| b.dtype() == out_dtype && b.rank() == 1 && b.dim(0).is_ok_and(|n| n <= op.n));
    Ok(op.backend == Backend::Trtllm && op.mode == ActMode::W4A16 && bias_fits && use_wgmma(dev, op)?)
}

/// `y = alpha * (x ⊗ W)` on the GPU for a prepared NVFP4 weight; with `epi`, `act(y + bias)` in
/// the GEMM's epilogue (the caller checked [`epilogue_in_gemm`]).
#[allow(clippy::too_many_arguments)]
pub fn nvfp4_linear_fwd(
    op: &Nvfp4Matmul,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    epi: Option<&Epilogue>,
) -> Result<(CudaStorage, Shape)> {
    if epi.is_some() && (op.backend != Backend::Trtllm || op.mode != ActMode::W4A16) {
        candle_core::bail!(
            "nvfp4 linear: a fused bias/activation epilogue asked of the {} {} path",
            op.backend,
            op.mode
        );
    }
    if op.mode == ActMode::Fp8 {
        return fp8::linear_fwd(op, s1, l1, s2, l2, s3, l3);
    }
    if let Some(second) = epi.and_then(|e| e.second) {
        return sm90_parts_fwd(op, (s1, l1), second, (s2, l2), (s3, l3), epi.expect("has a second part"));
    }
    let dev = s1.device().clone();
    let dims = l1.shape().dims();
    if dims.last() != Some(&op.k) {
        candle_core::bail!("nvfp4 linear: input {dims:?} must end in K = {}", op.k);
    }
    let m = l1.shape().elem_count() / op.k;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty") = op.n;
    let converted;
    let x = match in_place_bf16(s1, l1)? {
        Some(v) => v,
        None => {
            converted = input_bf16(s1, l1)?;
            converted.slice(..)
        }
    };
    #[cfg(candiff_sm100)]
    if op.backend == Backend::Cutlass && op.mode == ActMode::W4A4 && compute_capability(&dev)? == sm100::SM100 {
        // FP4 tensor cores: activations quantized to codes, CUTLASS's block-scaled GEMM.
        let out_dtype = if s1.dtype() == DType::F32 { DType::F32 } else { DType::BF16 };
        let w = view::<u8>(s2, l2, "weight")?;
        let sc = view::<u8>(s3, l3, "scale")?;
        let call = GemmCall { op, dev: &dev, x: &x, w: &w, sc: &sc, m, out_dtype };
        return sm100::fp4_gemm(&call).map(|s| (s, Shape::from(out_dims)));
    }
    let deq;
    let x = match op.mode {
        ActMode::W4A16 => x,
        ActMode::W4A4 => {
            deq = quantize_activations(&dev, &x, m, op.k, op.input_scale, false, true)?.1.expect("deq requested");
            deq.slice(..)
        }
        ActMode::Fp8 => unreachable!("handled above"),
    };
    let w = view::<u8>(s2, l2, "weight")?;
    let sc = view::<u8>(s3, l3, "scale")?;
    let out_dtype = match s1.dtype() {
        DType::F32 | DType::F16 => s1.dtype(),
        _ => DType::BF16,
    };
    let call = GemmCall { op, dev: &dev, x: &x, w: &w, sc: &sc, m, out_dtype };
    match op.backend {
        Backend::Trtllm => {}
        #[cfg(candiff_cutlass)]
        Backend::Cutlass => {
            return cutlass_gemm(&call).map(|s| (s, Shape::from(out_dims)));
        }
        #[cfg(feature = "cudnn")]
        Backend::Cudnn => {
            return cudnn::matmul(&call).map(|s| (s, Shape::from(out_dims)));
        }
        #[allow(unreachable_patterns)]
        b => candle_core::bail!("the NVFP4 {b} variant is not in this build"),
    }
    if use_wgmma(&dev, op)? {
        if m > tiling::SM90_GEMV_MAX_M {
            return Ok((sm90_gemm(&call, epi)?, Shape::from(out_dims)));
        }
        return Ok((sm90_gemv(&call, epi)?, Shape::from(out_dims)));
    }
    if epi.is_some() {
        candle_core::bail!("nvfp4 linear: a fused bias/activation epilogue asked of a kernel without one (M = {m})");
    }
    let layout = "trtllm";
    let (kernel, cfg) = if m <= GEMV_MAX_M {
        let cfg = LaunchConfig {
            grid_dim: ((op.n as u32).div_ceil(GEMV_WARPS), 1, 1),
            block_dim: (GEMV_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        ("gemv", cfg)
    } else {
        let cfg = LaunchConfig {
            grid_dim: ((op.n as u32).div_ceil(GEMM_TILE_N), (m as u32).div_ceil(GEMM_TILE_M), 1),
            block_dim: (GEMM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        ("gemm", cfg)
    };
    let out =
        launch_gemm(&call, cfg, "nvfp4 gemm", |suffix| function(&dev, &format!("nvfp4_{kernel}_{layout}_{suffix}")))?;
    Ok((out, Shape::from(out_dims)))
}

/// `[first, second] W^T` by the sm90 GEMM, both parts read where they lie (the caller checked
/// [`parts_in_gemm`]; anything else is an error here, never a different path).
fn sm90_parts_fwd(
    op: &Nvfp4Matmul,
    (s1, l1): (&CudaStorage, &Layout),
    (sb, lb): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
    epi: &Epilogue,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device().clone();
    let (Some((x, m, ldx)), Some((x2, m2, ldx2))) = (strided_rows(s1, l1)?, strided_rows(sb, lb)?) else {
        candle_core::bail!(
            "nvfp4 linear: a two-part input needs bf16 rows with 16-byte alignment; found {:?} {:?} and {:?} {:?}",
            s1.dtype(),
            l1,
            sb.dtype(),
            lb
        );
    };
    let c = l1.shape().dims().last().copied().unwrap_or(0);
    let w_part = lb.shape().dims().last().copied().unwrap_or(0);
    if m != m2 || c + w_part != op.k || !c.is_multiple_of(tiling::SM90_K_TILE) {
        candle_core::bail!(
            "nvfp4 linear: two input parts of {m} x {c} and {m2} x {w_part} for K = {} (the split on a multiple of {})",
            op.k,
            tiling::SM90_K_TILE
        );
    }
    if op.backend != Backend::Trtllm
        || op.mode != ActMode::W4A16
        || m <= tiling::SM90_GEMV_MAX_M
        || !use_wgmma(&dev, op)?
    {
        candle_core::bail!(
            "nvfp4 linear: a two-part input is read by the trtllm W4A16 GEMM on Hopper (M > {}) only; this is {} {} at M = {m}",
            tiling::SM90_GEMV_MAX_M,
            op.backend,
            op.mode
        );
    }
    let w = view::<u8>(s2, l2, "weight")?;
    let sc = view::<u8>(s3, l3, "scale")?;
    let call = GemmCall { op, dev: &dev, x: &x, w: &w, sc: &sc, m, out_dtype: DType::BF16 };
    let mut out_dims = l1.shape().dims().to_vec();
    *out_dims.last_mut().expect("non-empty") = op.n;
    let input = Parts { x2: &x2, ldx, ldx2, k_split: c };
    Ok((sm90_gemm_parts(&call, Some(epi), &input)?, Shape::from(out_dims)))
}

/// The sm90 GEMM's input as two parts (see kernels/nvfp4_sm90.cu): features `< k_split` from the
/// call's x (rows `ldx` apart), the rest from `x2` (rows `ldx2` apart).
struct Parts<'a> {
    x2: &'a CudaView<'a, bf16>,
    ldx: usize,
    ldx2: usize,
    k_split: usize,
}

/// Which kernels run the trtllm variant's W4A16 product (`CANDIFF_TRTLLM_GEMM`): `auto` (the Hopper
/// kernels on compute capability 9.0 — wgmma GEMM, tensor-core GEMV for M <= 16 — else the portable
/// ones), `wgmma` (the Hopper kernels or an error), `mma` (the portable kernels, for comparisons).
/// Chosen when a layer is prepared: the Hopper kernels read the [`LayoutKind::TrtllmSm90`] code
/// order, the portable ones [`LayoutKind::Trtllm`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrtllmGemm {
    Auto,
    Wgmma,
    Mma,
}

/// `CANDIFF_TRTLLM_GEMM`, read once per process (it is consulted on every linear).
fn trtllm_gemm_choice() -> Result<TrtllmGemm> {
    static CHOICE: OnceLock<std::result::Result<TrtllmGemm, String>> = OnceLock::new();
    let choice = CHOICE.get_or_init(|| match std::env::var("CANDIFF_TRTLLM_GEMM").as_deref() {
        Err(_) | Ok("") | Ok("auto") => Ok(TrtllmGemm::Auto),
        Ok("wgmma") => Ok(TrtllmGemm::Wgmma),
        Ok("mma") => Ok(TrtllmGemm::Mma),
        Ok(other) => Err(format!("CANDIFF_TRTLLM_GEMM={other}: expected auto, wgmma or mma")),
    });
    choice.clone().map_err(|e| CandiffError::Unsupported(e).into())
}

/// Does the trtllm variant prepare its weights for the Hopper kernels on this device?
fn hopper_kernels(dev: &CudaDevice) -> Result<bool> {
    let sm90 = compute_capability(dev)? == (9, 0);
    match trtllm_gemm_choice()? {
        TrtllmGemm::Auto => Ok(sm90),
        TrtllmGemm::Mma => Ok(false),
        TrtllmGemm::Wgmma if sm90 => Ok(true),
        TrtllmGemm::Wgmma => Err(CandiffError::Unsupported(format!(
            "CANDIFF_TRTLLM_GEMM=wgmma needs compute capability 9.0; this GPU is {:?}. Unset it to pick the kernels automatically",
            compute_capability(dev)?
        ))
        .into()),
    }
}

/// Does the Hopper GEMM/GEMV take this layer? Exactly when its weight was prepared in their code
/// order (activation rows are 16-byte aligned: K is a multiple of 16 for every NVFP4 weight).
fn use_wgmma(dev: &CudaDevice, op: &Nvfp4Matmul) -> Result<bool> {
    if op.kind != LayoutKind::TrtllmSm90 {
        return Ok(false);
    }
    let cc = compute_capability(dev)?;
    if cc != (9, 0) {
        return Err(CandiffError::Unsupported(format!(
            "this NVFP4 weight was prepared in the Hopper kernels' code order, which runs on compute capability 9.0 only; this GPU is {cc:?}: load the layer on this device (its layout is chosen there)"
        ))
        .into());
    }
    Ok(true)
}

/// The last wave of the wgmma GEMM (`CANDIFF_SM90_TAIL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sm90Tail {
    /// `0`: every tile whole.
    Whole,
    /// `1` (default): split along K where [`tiling::sm90_plan`] says; the TMA form adds the parts'
    /// sums inside a cluster (distributed shared memory), the cp.async form through global memory
    /// and a second kernel.
    Split,
    /// `global`: split, the TMA form's sums through global memory too (comparisons).
    SplitGlobal,
}

/// Tokens per CTA of the wgmma GEMM (`CANDIFF_SM90_TOKENS`; all but the default for measurements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sm90Tokens {
    /// `plan` (default): [`tiling::sm90_plan`]'s choice, the fill widths included where the TMA
    /// form runs.
    Plan,
    /// `nofill`: the base plan, 128 or 256 tokens without the TMA form's rules (the fill widths
    /// of session 31, 256 tokens split along K where the base takes 128 of session 32).
    NoFill,
    /// A number: that many tokens (128 or 256 anywhere; the fill widths, 176, 208 and 224, where
    /// the TMA form runs, the plan's choice elsewhere), never split along K but at 128 and 256.
    Forced(usize),
}

impl Sm90Tokens {
    fn parse(v: &str) -> std::result::Result<Self, String> {
        match v {
            "" | "plan" => Ok(Self::Plan),
            "nofill" => Ok(Self::NoFill),
            n => n.parse().ok().filter(|&bt| tiling::sm90_tokens_compiled(bt)).map(Self::Forced).ok_or_else(|| {
                format!("CANDIFF_SM90_TOKENS={v}: expected plan, nofill, or one of 128, 176, 208, 224, 256")
            }),
        }
    }
}

/// `CANDIFF_SM90_TOKENS` ([`Sm90Tokens`]); a thread's [`with_sm90_tokens`] overrides it.
fn sm90_tokens() -> Result<Sm90Tokens> {
    static ENV: OnceLock<std::result::Result<Sm90Tokens, String>> = OnceLock::new();
    setting(&SM90_TOKENS, &ENV, "CANDIFF_SM90_TOKENS", Sm90Tokens::parse)
}

/// Runs `f` with the wgmma GEMM's tokens per CTA set to `tokens` on this thread (`doctor`).
pub fn with_sm90_tokens<R>(tokens: Sm90Tokens, f: impl FnOnce() -> R) -> R {
    with_setting(&SM90_TOKENS, tokens, f)
}

/// `CANDIFF_SM90_TAIL` = `0` (no split of the last wave) or `global` ([`Sm90Tail`]; for
/// measurements); a thread's [`with_sm90_tail`] overrides it.
fn sm90_tail() -> Result<Sm90Tail> {
    static ENV: OnceLock<std::result::Result<Sm90Tail, String>> = OnceLock::new();
    setting(&SM90_TAIL, &ENV, "CANDIFF_SM90_TAIL", |v| match v {
        "1" | "" => Ok(Sm90Tail::Split),
        "0" => Ok(Sm90Tail::Whole),
        "global" => Ok(Sm90Tail::SplitGlobal),
        other => Err(format!("CANDIFF_SM90_TAIL={other}: expected 0, 1 or global")),
    })
}

/// Runs `f` with the wgmma GEMM's last wave handled as `tail` on this thread (`doctor`).
pub fn with_sm90_tail<R>(tail: Sm90Tail, f: impl FnOnce() -> R) -> R {
    with_setting(&SM90_TAIL, tail, f)
}

/// The Hopper kernels read whole 128-row tiles of whole 64-wide K tiles, as the trtllm layout pads
/// them (zeros); anything else is refused rather than read out of bounds.
fn check_sm90_weight(call: &GemmCall, what: &str) -> Result<()> {
    let GemmCall { op, w, .. } = *call;
    let rows = op.n.div_ceil(SM90_ROWS as usize) * SM90_ROWS as usize;
    if w.len() < rows * op.weight_row_bytes || !op.weight_row_bytes.is_multiple_of(32) {
        candle_core::bail!(
            "{what}: the trtllm layout holds {rows} rows of whole 64-wide K tiles; found {} bytes with rows of {}",
            w.len(),
            op.weight_row_bytes
        );
    }
    Ok(())
}

/// The trtllm variant on Hopper for M <= `GEMV_MAX_M`: tensor-core GEMV, one 128-row tile per CTA
/// or per cluster of CTAs that split K (kernels/nvfp4_sm90.cu `gemv_sm90`), with the GEMM's bias
/// and GELU epilogue (a two-part input is the GEMM's alone: [`parts_in_gemm`]).
fn sm90_gemv(call: &GemmCall, epi: Option<&Epilogue>) -> Result<CudaStorage> {
    check_sm90_weight(call, "nvfp4 sm90 gemv")?;
    let GemmCall { op, dev, m, .. } = *call;
    // n8 token tiles of the mma: one up to 8 tokens, two up to 16.
    let tiles = if m <= 8 { 1 } else { 2 };
    let row_tiles = op.n.div_ceil(SM90_ROWS as usize);
    let chunks = op.weight_row_bytes.div_ceil(SM90_GEMV_CHUNK_BYTES);
    let codes_map = match sm90_gemv_form()? {
        Sm90GemvForm::Bulk => sm90_gemv_codes_map(call)?,
        Sm90GemvForm::Reg => None,
    };
    let split = sm90_gemv_split(row_tiles, chunks, device_props(dev)?.sms, codes_map.is_some())?;
    let (form, threads, smem) = match codes_map {
        Some(_) => ("bulk_", SM90_GEMV_BULK_THREADS, sm90_gemv_bulk_smem(tiles, split)),
        None => ("", SM90_GEMV_THREADS, 0),
    };
    let cfg =
        LaunchConfig { grid_dim: (row_tiles as u32, split, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
    if epi.is_some_and(|e| e.second.is_some()) {
        candle_core::bail!("nvfp4 sm90 gemv: an input in two parts (M = {m}); only the GEMM reads one");
    }
    let stream = dev.cuda_stream();
    let (mut y, suffix) = gemm_output(call)?;
    let f = sm90_function(dev, &format!("nvfp4_gemv_sm90_{form}nt{tiles}_s{split}_{suffix}"), smem)?;
    let args = GemmArgs::of(call);
    let bias = epi.and_then(|e| e.bias).map(|(b, l)| BiasView::of(b, l, call.out_dtype)).transpose()?;
    let bias_len = bias.as_ref().map_or(0, BiasView::len) as i32;
    let gelu_from = gelu_from_arg(epi);
    let null = 0u64;
    {
        let mut b = stream.launch_builder(&f);
        // The weight is read through the map: its view stays borrowed for the launch.
        let _w = codes_map.as_ref().map(|_| call.w.device_ptr(&stream));
        if let Some(map) = &codes_map {
            b.arg(map);
        }
        args.push(&mut b, call, &mut y)?;
        BiasView::push(&mut b, bias.as_ref(), &null);
        b.arg(&bias_len).arg(&gelu_from);
        // SAFETY: argument types match the kernel's signature; it writes every element of y.
        unsafe { b.launch(cfg) }.map_err(wrap("nvfp4 sm90 gemv"))?;
    }
    Ok(CudaStorage { slice: y, device: dev.clone() })
}

/// The two forms of the sm90 GEMV (kernels/nvfp4_sm90.cu), which give the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sm90GemvForm {
    /// A copying warp fills a pipeline of whole chunks in shared memory (TMA boxes of codes),
    /// where the weight allows a box; the register form elsewhere.
    Bulk,
    /// Each thread loads its next chunk into registers (comparisons).
    Reg,
}

/// `CANDIFF_SM90_GEMV` = `bulk` (default; where [`sm90_gemv_codes_map`] allows) or `reg`; a
/// thread's [`with_sm90_gemv_form`] overrides it.
fn sm90_gemv_form() -> Result<Sm90GemvForm> {
    static ENV: OnceLock<std::result::Result<Sm90GemvForm, String>> = OnceLock::new();
    setting(&SM90_GEMV_FORM, &ENV, "CANDIFF_SM90_GEMV", |v| match v {
        "" | "bulk" => Ok(Sm90GemvForm::Bulk),
        "reg" => Ok(Sm90GemvForm::Reg),
        other => Err(format!("CANDIFF_SM90_GEMV={other}: expected bulk or reg")),
    })
}

/// Runs `f` with the GEMV in `form` on this thread (`doctor` compares the two forms).
pub fn with_sm90_gemv_form<R>(form: Sm90GemvForm, f: impl FnOnce() -> R) -> R {
    with_setting(&SM90_GEMV_FORM, form, f)
}

/// The bulk GEMV's dynamic shared memory for `tiles` n8 token tiles and a K split over `split` CTAs
/// (kernels/nvfp4_sm90.cu `kGemvBulkStages`, `bulk_stage_bytes`, `kGemvXferFloats`): the alignment
/// slack, its stages (a box of 128 code rows of a chunk, four scale tiles, 8 tokens' chunk per
/// tile), a full and an empty mbarrier per stage and, split, the f32 partial sums other CTAs send.
const fn sm90_gemv_bulk_smem(tiles: u32, split: u32) -> u32 {
    const STAGES: u32 = 4;
    const CODE_BYTES: u32 = SM90_ROWS * SM90_GEMV_CHUNK_BYTES as u32;
    const SCALE_BYTES: u32 = 4 * 512;
    const TOKEN_BYTES: u32 = 2 * 256;
    const F32_BYTES: u32 = 4;
    let xfer = if split > 1 { SM90_ROWS * tiles * 8 * F32_BYTES } else { 0 };
    SM90_ALIGN_SLACK
        + STAGES * (CODE_BYTES + SCALE_BYTES + tiles * 8 * TOKEN_BYTES)
        + 2 * STAGES * SM90_BARRIER_BYTES
        + xfer
}

/// The bulk GEMV's descriptor of the weight codes (boxes of 128 rows x one 128-byte chunk, 128-byte
/// swizzle), where the weight allows: rows of at least one chunk (K >= 256), a 16-byte aligned
/// start. `None`: the register form runs.
fn sm90_gemv_codes_map(call: &GemmCall) -> Result<Option<TensorMap>> {
    let op = call.op;
    let stream = call.dev.cuda_stream();
    let w_ptr = call.w.device_ptr(&stream).0;
    let row_bytes = op.weight_row_bytes;
    if row_bytes < SM90_GEMV_CHUNK_BYTES || !Tile2d::fits(w_ptr, row_bytes as u64) {
        return Ok(None);
    }
    let map = Tile2d {
        ptr: w_ptr,
        dtype: sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        elem_bytes: 1,
        cols: row_bytes as u64,
        rows: (op.n.div_ceil(SM90_ROWS as usize) * SM90_ROWS as usize) as u64,
        row_bytes: row_bytes as u64,
        box_cols: SM90_GEMV_CHUNK_BYTES as u32,
        box_rows: SM90_ROWS,
        swizzle: sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
    }
    .encode()?;
    Ok(Some(map))
}

// Two bulk GEMV CTAs per SM (its `__launch_bounds__`) where the grid may exceed the SMs: 228 KiB of
// shared memory per Hopper SM, 1 KiB of it reserved per CTA. A split grid has fewer CTAs than SMs
// (`sm90_gemv_split`: below 0.5 CTAs per SM unsplit, then doubled at most until 0.5): one per SM
// is enough there, and 16 tokens split take that room.
const _: () = {
    const SM_SMEM: u32 = 228 * 1024;
    const RESERVED_PER_CTA: u32 = 1024;
    assert!(2 * (sm90_gemv_bulk_smem(1, 1) + RESERVED_PER_CTA) <= SM_SMEM);
    assert!(2 * (sm90_gemv_bulk_smem(2, 1) + RESERVED_PER_CTA) <= SM_SMEM);
    assert!(2 * (sm90_gemv_bulk_smem(1, 2) + RESERVED_PER_CTA) <= SM_SMEM);
    assert!(sm90_gemv_bulk_smem(2, 2) + RESERVED_PER_CTA <= SM_SMEM);
};

/// The epilogues' `gelu_from` argument: features from it on are activated (i32::MAX: none).
fn gelu_from_arg(epi: Option<&Epilogue>) -> i32 {
    epi.and_then(|e| e.gelu_from).map_or(i32::MAX, |f| f.min(i32::MAX as usize) as i32)
}

/// CTAs per 128-row tile of the GEMV (its K split, a compiled cluster size): the fewest that give
/// at least 0.5 CTAs per SM for the bulk form (`bulk`), 1.4 for the register form, with at least
/// two 256-wide K chunks each. Split sweeps on an H200 (docs/PERF.md): the register form's best
/// split of each FLUX/Wan shape at 1.5-2.5 CTAs per SM (session 9; the next split down never more
/// than 7% slower); the bulk form's at 0.55-1.1, or within 2% of it there (session 25: its CTAs
/// keep enough bytes in flight on their own, and each split adds a cluster reduction).
/// `CANDIFF_SM90_GEMV_SPLIT` = 1, 2, 4 or 8 overrides it (for measurements).
fn sm90_gemv_split(row_tiles: usize, chunks: usize, sms: usize, bulk: bool) -> Result<u32> {
    // Read once per process, as CANDIFF_TRTLLM_GEMM: consulted on every linear.
    static FORCED: OnceLock<std::result::Result<Option<u32>, String>> = OnceLock::new();
    let forced = FORCED.get_or_init(|| match std::env::var("CANDIFF_SM90_GEMV_SPLIT").as_deref() {
        Err(_) | Ok("") => Ok(None),
        Ok(v @ ("1" | "2" | "4" | "8")) => Ok(Some(v.parse().expect("a listed number"))),
        Ok(other) => Err(format!("CANDIFF_SM90_GEMV_SPLIT={other}: expected 1, 2, 4 or 8")),
    });
    if let Some(split) = forced.clone().map_err(CandiffError::Unsupported)? {
        return Ok(split);
    }
    // CTAs per SM wanted, as a ratio of integers.
    const BULK_CTAS_PER_SM: (usize, usize) = (1, 2);
    const REG_CTAS_PER_SM: (usize, usize) = (7, 5);
    let (num, den) = if bulk { BULK_CTAS_PER_SM } else { REG_CTAS_PER_SM };
    let mut split = 1;
    while split < SM90_GEMV_MAX_SPLIT && den * row_tiles * split < num * sms && 4 * split <= chunks {
        split *= 2;
    }
    Ok(split as u32)
}

thread_local! {
    /// SM count the wgmma GEMM's tiling decisions assume (0: the device's). `doctor` lowers it so
    /// that its small products take the split-tail path too.
    static SM90_POLICY_SMS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// The wgmma GEMM's form for this thread (`None`: `CANDIFF_SM90_GEMM`); `doctor` runs both.
    static SM90_FORM: std::cell::Cell<Option<Sm90Form>> = const { std::cell::Cell::new(None) };
    /// The GEMV's form for this thread (`None`: `CANDIFF_SM90_GEMV`); `doctor` runs both.
    static SM90_GEMV_FORM: std::cell::Cell<Option<Sm90GemvForm>> = const { std::cell::Cell::new(None) };
    /// The TMA form's cluster count for this thread (`None`: `CANDIFF_SM90_CLUSTERS`); `doctor`
    /// runs a few clusters through many units.
    static SM90_CLUSTERS: std::cell::Cell<Option<Sm90Clusters>> = const { std::cell::Cell::new(None) };
    /// The TMA form's 16-bit epilogue for this thread (`None`: `CANDIFF_SM90_STORE`).
    static SM90_STORE: std::cell::Cell<Option<Sm90Store>> = const { std::cell::Cell::new(None) };
    /// The wgmma GEMM's tokens per CTA for this thread (`None`: `CANDIFF_SM90_TOKENS`).
    static SM90_TOKENS: std::cell::Cell<Option<Sm90Tokens>> = const { std::cell::Cell::new(None) };
    /// The wgmma GEMM's last wave for this thread (`None`: `CANDIFF_SM90_TAIL`).
    static SM90_TAIL: std::cell::Cell<Option<Sm90Tail>> = const { std::cell::Cell::new(None) };
}

type ThreadSetting<T> = std::thread::LocalKey<std::cell::Cell<Option<T>>>;

/// A GEMM setting: this thread's override (`doctor` runs several), else environment variable
/// `var` parsed once per process (unset reads as ""); a bad value is an error at every use.
fn setting<T: Copy>(
    local: &'static ThreadSetting<T>,
    env: &'static OnceLock<std::result::Result<T, String>>,
    var: &str,
    parse: fn(&str) -> std::result::Result<T, String>,
) -> Result<T> {
    if let Some(v) = local.with(|c| c.get()) {
        return Ok(v);
    }
    let v = env.get_or_init(|| parse(std::env::var(var).as_deref().unwrap_or("")));
    Ok(v.clone().map_err(CandiffError::Unsupported)?)
}

/// Runs `f` with `local` overridden to `value` on this thread.
fn with_setting<T: Copy, R>(local: &'static ThreadSetting<T>, value: T, f: impl FnOnce() -> R) -> R {
    let before = local.with(|c| c.replace(Some(value)));
    let r = f();
    local.with(|c| c.set(before));
    r
}

/// How the TMA form writes 16-bit outputs (the same bits either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sm90Store {
    /// Through shared memory and a TMA store per warp and 128 tokens, where y's rows allow (N a
    /// multiple of 8, at least 16 features and 128 tokens); per element elsewhere.
    Tma,
    /// Per element from the accumulators (comparisons).
    Direct,
}

/// `CANDIFF_SM90_STORE` = `tma` (default) or `direct`; a thread's [`with_sm90_store`] overrides it.
fn sm90_store() -> Result<Sm90Store> {
    static ENV: OnceLock<std::result::Result<Sm90Store, String>> = OnceLock::new();
    setting(&SM90_STORE, &ENV, "CANDIFF_SM90_STORE", |v| match v {
        "" | "tma" => Ok(Sm90Store::Tma),
        "direct" => Ok(Sm90Store::Direct),
        other => Err(format!("CANDIFF_SM90_STORE={other}: expected tma or direct")),
    })
}

/// Runs `f` with the TMA form's 16-bit epilogue `store` on this thread (`doctor`).
pub fn with_sm90_store<R>(store: Sm90Store, f: impl FnOnce() -> R) -> R {
    with_setting(&SM90_STORE, store, f)
}

/// How many clusters the TMA form launches for `units` tile pairs (each cluster takes every
/// G-th unit; the same bits for any G).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sm90Clusters {
    /// As many as the GPU holds at once (the driver's occupancy answer): persistent clusters, the
    /// pipeline filled once per cluster.
    Fit,
    /// One per unit, the GPU scheduling them in waves (comparisons).
    PerUnit,
    /// At most this many (checks of the persistent loop).
    AtMost(usize),
}

impl Sm90Clusters {
    fn parse(v: &str) -> std::result::Result<Self, String> {
        match v {
            "" | "fit" => Ok(Self::Fit),
            "units" => Ok(Self::PerUnit),
            n => n
                .parse()
                .ok()
                .filter(|&n: &usize| n > 0)
                .map(Self::AtMost)
                .ok_or_else(|| format!("CANDIFF_SM90_CLUSTERS={v}: expected fit, units or a positive count")),
        }
    }
}

/// `CANDIFF_SM90_CLUSTERS` = `fit` (default), `units` or a count; a thread's
/// [`with_sm90_clusters`] overrides it.
fn sm90_clusters() -> Result<Sm90Clusters> {
    static ENV: OnceLock<std::result::Result<Sm90Clusters, String>> = OnceLock::new();
    setting(&SM90_CLUSTERS, &ENV, "CANDIFF_SM90_CLUSTERS", Sm90Clusters::parse)
}

/// Runs `f` with the TMA form launching `clusters` on this thread (`doctor`).
pub fn with_sm90_clusters<R>(clusters: Sm90Clusters, f: impl FnOnce() -> R) -> R {
    with_setting(&SM90_CLUSTERS, clusters, f)
}

/// Clusters of `function` (compiled for clusters of `ctas` CTAs, launched with `threads` per CTA
/// and `smem` bytes of dynamic shared memory) resident on the GPU at once, from the driver; asked
/// once per function and device.
fn resident_clusters(
    dev: &CudaDevice,
    function: &CudaFunction,
    name: &str,
    ctas: usize,
    threads: u32,
    smem: u32,
) -> Result<usize> {
    static CACHE: OnceLock<Mutex<HashMap<(DeviceId, String), usize>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(n) = cache.lock().expect("cluster cache poisoned").get(&(dev.id(), name.to_string())) {
        return Ok(*n);
    }
    let stream = dev.cuda_stream();
    // The kernel's compile-time cluster shape applies; the grid is one cluster.
    let config = sys::CUlaunchConfig {
        gridDimX: ctas as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: stream.cu_stream(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut n: std::ffi::c_int = 0;
    // SAFETY: `function` is a loaded kernel of this context; `config` and `n` outlive the call.
    let r = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, function.cu_function(), &config) };
    if r != sys::CUresult::CUDA_SUCCESS || n <= 0 {
        candle_core::bail!(
            "nvfp4 sm90 gemm: the driver found no room for a cluster of {name} ({r:?}, {n} clusters; {threads} threads and {smem} bytes of shared memory per CTA)"
        );
    }
    cache.lock().expect("cluster cache poisoned").insert((dev.id(), name.to_string()), n as usize);
    Ok(n as usize)
}

/// The two forms of the sm90 W4A16 GEMM (kernels/nvfp4_sm90.cu), which give the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sm90Form {
    /// TMA copies into CTA pairs that share the activation tile, where the product suits them
    /// (an even number of 128-feature blocks and of unsplit tiles, 16-byte aligned rows, inputs
    /// of at least one TMA box); the cp.async form elsewhere.
    Auto,
    /// Every thread's cp.async copies and a CTA barrier per K tile (comparisons).
    Pipe,
}

/// `CANDIFF_SM90_GEMM` = `auto` (default) or `pipe`; a thread's [`with_sm90_form`] overrides it.
fn sm90_form() -> Result<Sm90Form> {
    static ENV: OnceLock<std::result::Result<Sm90Form, String>> = OnceLock::new();
    setting(&SM90_FORM, &ENV, "CANDIFF_SM90_GEMM", |v| match v {
        "" | "auto" => Ok(Sm90Form::Auto),
        "pipe" => Ok(Sm90Form::Pipe),
        other => Err(format!("CANDIFF_SM90_GEMM={other}: expected auto or pipe")),
    })
}

/// `CANDIFF_SM90_TMA_STAGES` = 5 or 6: the TMA form's pipeline depth (measurements), read once.
fn sm90_tma_stages() -> Result<u32> {
    static STAGES: OnceLock<std::result::Result<u32, String>> = OnceLock::new();
    let stages = STAGES.get_or_init(|| match std::env::var("CANDIFF_SM90_TMA_STAGES").as_deref() {
        Err(_) | Ok("") => Ok(SM90_TMA_DEFAULT_STAGES),
        Ok(v) => v
            .parse()
            .ok()
            .filter(|s| SM90_TMA_STAGE_CHOICES.contains(s))
            .ok_or_else(|| format!("CANDIFF_SM90_TMA_STAGES={v}: expected one of {SM90_TMA_STAGE_CHOICES:?}")),
    });
    Ok(stages.clone().map_err(CandiffError::Unsupported)?)
}

/// Runs `f` with the wgmma GEMM in `form` on this thread (`doctor` compares the two forms).
pub fn with_sm90_form<R>(form: Sm90Form, f: impl FnOnce() -> R) -> R {
    with_setting(&SM90_FORM, form, f)
}

/// A TMA tensor map (the driver's opaque 128-byte descriptor), passed by value to the TMA form.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TensorMap(sys::CUtensorMap);

// SAFETY: plain bytes the kernel takes as a `__grid_constant__` parameter of the same size.
unsafe impl DeviceRepr for TensorMap {}

/// A 2-D row-major tensor (`rows` x `cols` elements of `elem_bytes`, rows `row_bytes` apart) read
/// in boxes of `box_cols` x `box_rows`; elements outside it arrive as zeros.
struct Tile2d {
    ptr: u64,
    dtype: sys::CUtensorMapDataType,
    elem_bytes: u64,
    cols: u64,
    rows: u64,
    row_bytes: u64,
    box_cols: u32,
    box_rows: u32,
    swizzle: sys::CUtensorMapSwizzle,
}

impl Tile2d {
    fn encode(&self) -> Result<TensorMap> {
        let dims = [self.cols, self.rows];
        let strides = [self.row_bytes];
        let boxes = [self.box_cols, self.box_rows];
        let element_strides = [1u32, 1];
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
        // SAFETY: every array has the rank's length (2, strides 1); the driver only writes `map`.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                self.dtype,
                2,
                self.ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                self.swizzle,
                // The next K tiles of the same rows come along into L2.
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            candle_core::bail!(
                "nvfp4 sm90 gemm: the driver refused a TMA descriptor ({r:?}) for {} x {} elements of {} bytes, rows {} bytes apart, boxes {} x {}, at {:#x}",
                self.rows,
                self.cols,
                self.elem_bytes,
                self.row_bytes,
                self.box_rows,
                self.box_cols,
                self.ptr
            );
        }
        // SAFETY: initialized by the successful call above.
        Ok(TensorMap(unsafe { map.assume_init() }))
    }

    /// What TMA needs of the global tensor: a 16-byte aligned start and row pitch.
    fn fits(ptr: u64, row_bytes: u64) -> bool {
        const TMA_ALIGN: u64 = 16;
        ptr.is_multiple_of(TMA_ALIGN) && row_bytes.is_multiple_of(TMA_ALIGN)
    }
}

/// Runs `f` with the wgmma GEMM planning for a GPU of `sms` multiprocessors (checks of the
/// split-tail path on small products).
pub fn with_sm90_policy_sms<R>(sms: usize, f: impl FnOnce() -> R) -> R {
    let before = SM90_POLICY_SMS.with(|c| c.replace(sms));
    let r = f();
    SM90_POLICY_SMS.with(|c| c.set(before));
    r
}

fn sm90_policy_sms(dev: &CudaDevice) -> Result<usize> {
    match SM90_POLICY_SMS.with(|c| c.get()) {
        0 => Ok(device_props(dev)?.sms.saturating_sub(comm_carve()).max(1)),
        n => Ok(n),
    }
}

/// Multiprocessors left to an exchange in flight (NCCL's kernels) by the GEMMs that run beside
/// it: `CANDIFF_COMM_SMS` (0: none), else this. The GEMMs on Hopper (cuBLAS's and the wgmma
/// W4A16 one) are persistent, one block per multiprocessor using all its registers: without a
/// carve-out the transfer's blocks wait for the whole GEMM. Measured for cuBLAS on 2 H200s,
/// FLUX.1 1024² bf16 step (docs/PERF.md, session 8): 0 -> 97.9 ms, 8 -> 96.3, 16 -> 94.4,
/// 32 -> 95.3.
const DEFAULT_COMM_SMS: usize = 16;

/// The multiprocessors a GEMM enqueued now leaves free: [`DEFAULT_COMM_SMS`] (or
/// `CANDIFF_COMM_SMS`) while this rank has an exchange in flight, else 0.
pub(crate) fn comm_carve() -> usize {
    static COMM_SMS: OnceLock<usize> = OnceLock::new();
    let carve = *COMM_SMS.get_or_init(|| {
        std::env::var("CANDIFF_COMM_SMS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_COMM_SMS)
    });
    if crate::parallel::transfers_in_flight() {
        carve
    } else {
        0
    }
}

/// A wgmma GEMM kernel allowed `smem` bytes of dynamic shared memory (more than the default
/// 48 KiB: raised once per function).
fn sm90_function(dev: &CudaDevice, name: &str, smem: u32) -> Result<CudaFunction> {
    let f = function_in(dev, Kernels::Sm90, name)?;
    static RAISED: OnceLock<Mutex<std::collections::HashSet<(DeviceId, String)>>> = OnceLock::new();
    let mut raised = RAISED.get_or_init(Default::default).lock().expect("sm90 attribute cache poisoned");
    if !raised.contains(&(dev.id(), name.to_string())) {
        f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(wrap("sm90 gemm shared memory"))?;
        raised.insert((dev.id(), name.to_string()));
    }
    Ok(f)
}

/// The TMA form's kernel-name infix (`tmast_s5_`: the TMA-store epilogue, 5 stages; `tma_sS_`:
/// per-element stores, the configured depth) and its dynamic shared memory at `bt` tokens per CTA:
/// the stages, the staging boxes of the TMA store, the mbarriers and the alignment slack.
fn sm90_tma_kernel(bt: u32, tma_store: bool, parts: usize) -> Result<(String, u32)> {
    let (kind, stages, staging) = if parts > 1 {
        (format!("tmak{parts}"), SM90_TMA_SPLIT_STAGES, 0)
    } else if tma_store {
        ("tmast".to_string(), SM90_TMA_STORE_STAGES, sm90_store_staging_bytes(bt))
    } else {
        ("tma".to_string(), sm90_tma_stages()?, 0)
    };
    let smem = stages * (bt * SM90_TILE_BYTES_PER_TOKEN + SM90_WEIGHT_TILE_BYTES)
        + staging
        + SM90_ALIGN_SLACK
        + 2 * stages * SM90_BARRIER_BYTES;
    Ok((format!("{kind}_s{stages}_"), smem))
}

/// The TMA form's bf16 kernels at the configured depth, and those with K parts in their clusters,
/// with the CTAs of their clusters and how many clusters the GPU holds at once (`doctor` prints
/// them: the persistent grid's size, the room [`tiling::sm90_plan`] splits tiles within).
pub fn sm90_tma_resident_clusters(device: &candle_core::Device) -> Result<Vec<(String, usize, usize)>> {
    let candle_core::Device::Cuda(dev) = device else {
        candle_core::bail!("the sm90 GEMM runs on a CUDA device; found {device:?}")
    };
    let tma_store = sm90_store()? == Sm90Store::Tma;
    let threads = SM90_THREADS + SM90_TMA_PRODUCER_THREADS;
    let mut rows = [128u32, 256]
        .into_iter()
        .map(|bt| {
            let (kernel, smem) = sm90_tma_kernel(bt, tma_store, 1)?;
            let name = format!("nvfp4_gemm_sm90_{kernel}bt{bt}_bf16");
            let f = sm90_function(dev, &name, smem)?;
            Ok((name.clone(), SM90_TMA_CTAS, resident_clusters(dev, &f, &name, SM90_TMA_CTAS, threads, smem)?))
        })
        .collect::<Result<Vec<_>>>()?;
    for parts in 2..=tiling::SM90_MAX_TAIL_SPLIT {
        let (name, clusters) = sm90_parts_room(dev, parts)?;
        rows.push((name, SM90_TMA_CTAS * parts, clusters));
    }
    Ok(rows)
}

/// The kernel with `parts` K parts in its clusters (256 tokens, bf16) and the clusters of it the
/// GPU holds at once; 0 where it cannot hold one at all (a small MIG slice): that split is not used.
fn sm90_parts_room(dev: &CudaDevice, parts: usize) -> Result<(String, usize)> {
    let (kernel, smem) = sm90_tma_kernel(256, false, parts)?;
    let name = format!("nvfp4_gemm_sm90_{kernel}bt256_bf16");
    let f = sm90_function(dev, &name, smem)?;
    let threads = SM90_THREADS + SM90_TMA_PRODUCER_THREADS;
    let clusters = resident_clusters(dev, &f, &name, SM90_TMA_CTAS * parts, threads, smem).unwrap_or(0);
    Ok((name, clusters))
}

/// Clusters of each K split's kernel the GPU holds at once (the 256-token kernels: one CTA per
/// multiprocessor whatever the tokens, so the same room for 128), less the carve-out's share while
/// an exchange is in flight. Both GEMM forms plan with it, so they split alike.
fn sm90_cluster_room(dev: &CudaDevice) -> Result<tiling::ClusterRoom> {
    // (Asked of the driver once per device: this runs before every GEMM.)
    static CACHE: OnceLock<Mutex<HashMap<DeviceId, tiling::ClusterRoom>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let cached = cache.lock().expect("cluster room cache poisoned").get(&dev.id()).copied();
    let mut room = match cached {
        Some(room) => room,
        None => {
            let mut room = tiling::ClusterRoom::default();
            for (parts, slot) in room.iter_mut().enumerate().skip(2) {
                *slot = sm90_parts_room(dev, parts)?.1;
            }
            cache.lock().expect("cluster room cache poisoned").insert(dev.id(), room);
            room
        }
    };
    for (parts, slot) in room.iter_mut().enumerate().skip(2) {
        *slot = slot.saturating_sub(comm_carve().div_ceil(SM90_TMA_CTAS * parts));
    }
    Ok(room)
}

/// The trtllm variant on Hopper: the weight dequantized in registers as wgmma's A operand; the
/// last wave split along K where it would run mostly empty ([`tiling::sm90_plan`]).
fn sm90_gemm(call: &GemmCall, epi: Option<&Epilogue>) -> Result<CudaStorage> {
    let whole = Parts { x2: call.x, ldx: call.op.k, ldx2: call.op.k, k_split: call.op.k };
    sm90_gemm_parts(call, epi, &whole)
}

fn sm90_gemm_parts(call: &GemmCall, epi: Option<&Epilogue>, input: &Parts) -> Result<CudaStorage> {
    check_sm90_weight(call, "nvfp4 sm90 gemm")?;
    let GemmCall { op, dev, m, .. } = *call;
    let tail_mode = sm90_tail()?;
    let split_tail = tail_mode != Sm90Tail::Whole;
    let room = if split_tail { sm90_cluster_room(dev)? } else { tiling::ClusterRoom::default() };
    let sms = sm90_policy_sms(dev)?;
    let form = sm90_form()?;
    let (forced, fill) = match sm90_tokens()? {
        Sm90Tokens::Plan => (None, form == Sm90Form::Auto),
        Sm90Tokens::NoFill => (None, false),
        Sm90Tokens::Forced(bt) => (Some(bt), false),
    };
    let plan_with =
        |forced: Option<usize>, fill: bool| tiling::sm90_plan(m, op.n, op.k, sms, forced, split_tail, fill, &room);
    let maps_for = |plan: &tiling::Sm90Plan| match form {
        Sm90Form::Auto => sm90_tma_maps(call, input, plan),
        Sm90Form::Pipe => Ok(None),
    };
    let mut plan = plan_with(forced, fill);
    let mut maps = maps_for(&plan)?;
    if maps.is_none() {
        // The fill widths are compiled for the TMA form only, and its K parts are added inside a
        // cluster; where it cannot run (odd feature blocks, unaligned rows, too few tokens for a
        // box) the base rule's plan does.
        let base = plan_with(forced.filter(|&bt| tiling::sm90_base_width(bt)), false);
        if base != plan {
            plan = base;
            maps = maps_for(&plan)?;
        }
    }
    let (tiles, tail, parts) = (plan.tiles, plan.tail, plan.parts);
    let bt = plan.tokens_per_cta as u32;
    let stream = dev.cuda_stream();
    let (mut y, suffix) = gemm_output(call)?;
    let store_map = match (&maps, sm90_store()?) {
        (Some(_), Sm90Store::Tma) => sm90_store_map(call, &y, bt)?,
        _ => None,
    };
    // The TMA form's split tiles add their parts' sums inside each cluster (one kernel, no
    // workspace); the cp.async form's through global memory and the tail-sum kernel.
    let sums_in_cluster = maps.is_some() && tail > 0 && tail_mode == Sm90Tail::Split;
    let (smem, threads, kernel) = match maps {
        Some(_) => {
            let (kernel, smem) = sm90_tma_kernel(bt, store_map.is_some(), 1)?;
            (smem, SM90_THREADS + SM90_TMA_PRODUCER_THREADS, kernel)
        }
        None => (
            SM90_STAGES * (bt * SM90_TILE_BYTES_PER_TOKEN + SM90_WEIGHT_TILE_BYTES) + SM90_ALIGN_SLACK,
            SM90_THREADS,
            String::new(),
        ),
    };
    let name = format!("nvfp4_gemm_sm90_{kernel}bt{bt}_{suffix}");
    let f = sm90_function(dev, &name, smem)?;
    let grid = |ctas: usize, smem: u32| LaunchConfig {
        grid_dim: (ctas as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    };
    // The weight holds ceil(N / 128) x 128 rows of whole 64-wide K tiles (checked above), as the
    // kernel reads them.
    let whole = tiles - tail;
    // The split tiles' partial sums (only when there are some: no allocation per unsplit call).
    // SAFETY: the split tiles write every element (zero sums for an empty K range).
    let part = (tail > 0 && !sums_in_cluster)
        .then(|| unsafe { stream.alloc::<f32>(tail * parts * SM90_ROWS as usize * bt as usize) })
        .transpose()
        .map_err(wrap("alloc"))?;
    let part_guard = part.as_ref().map(|p| p.device_ptr(&stream));
    let part_ptr: u64 = part_guard.as_ref().map_or(0, |g| g.0);
    let args = GemmArgs::of(call);
    let bias = epi.and_then(|e| e.bias).map(|(b, l)| BiasView::of(b, l, call.out_dtype)).transpose()?;
    let bias_len = bias.as_ref().map_or(0, BiasView::len) as i32;
    let gelu_from = gelu_from_arg(epi);
    let (ldx, ldx2, k_split) = (input.ldx as i32, input.ldx2 as i32, input.k_split as i32);
    let null = 0u64;
    // The kernel with K parts in its clusters, where the split tiles take it.
    let split_kernel = if sums_in_cluster {
        let (kernel, smem) = sm90_tma_kernel(bt, false, parts)?;
        let name = format!("nvfp4_gemm_sm90_{kernel}bt{bt}_{suffix}");
        Some((sm90_function(dev, &name, smem)?, smem))
    } else {
        None
    };
    for (tile0, ctas, splits) in [(0, whole, 1), (whole, tail * parts, parts)] {
        if ctas == 0 {
            continue;
        }
        let (tile0, splits) = (tile0 as i32, splits as i32);
        let (mut b, launch_smem) = match &split_kernel {
            Some((f, split_smem)) if splits > 1 => (stream.launch_builder(f), *split_smem),
            _ => (stream.launch_builder(&f), smem),
        };
        if let Some(maps) = &maps {
            // The inputs are read through the maps: their views stay borrowed for the launch.
            let (_x, _x2, _w) = (call.x.device_ptr(&stream), input.x2.device_ptr(&stream), call.w.device_ptr(&stream));
            // (The per-element kernels take the codes' map in the output map's place, unread.)
            b.arg(&maps.act)
                .arg(&maps.act2)
                .arg(&maps.codes)
                .arg(store_map.as_ref().unwrap_or(&maps.codes))
                .arg(call.sc);
            push_output(&mut b, &mut y)?;
            b.arg(&args.m).arg(&args.n).arg(&args.k).arg(&args.scale_cols).arg(&args.alpha);
            // A unit: a tile pair or pair part, `ctas` and `tile0` even (sm90_tma_maps).
            let units = ctas / SM90_TMA_CTAS;
            if splits > 1 && sums_in_cluster {
                // One cluster per tile pair, its `splits` CTA pairs each taking a part of K; all
                // launched (the kernel needs one unit per cluster), whatever the cluster setting.
                let pairs = units / splits as usize;
                let units = pairs as i32;
                b.arg(&tile0).arg(&splits).arg(&units).arg(&part_ptr);
                BiasView::push(&mut b, bias.as_ref(), &null);
                b.arg(&bias_len).arg(&gelu_from).arg(&k_split);
                // SAFETY: as the launch below; the kernel's cluster is `splits` CTA pairs
                // (`tmak{splits}`), one per tile pair, and writes every element of those tiles.
                unsafe { b.launch(grid(SM90_TMA_CTAS * splits as usize * pairs, launch_smem)) }
                    .map_err(wrap("nvfp4 sm90 gemm (tma, parts in the cluster)"))?;
                continue;
            }
            let clusters = match sm90_clusters()? {
                // Beside a transfer in flight, the carve-out's multiprocessors stay free for it.
                Sm90Clusters::Fit => units.min(
                    resident_clusters(dev, &f, &name, SM90_TMA_CTAS, threads, smem)?
                        .saturating_sub(comm_carve().div_ceil(SM90_TMA_CTAS))
                        .max(1),
                ),
                Sm90Clusters::PerUnit => units,
                Sm90Clusters::AtMost(n) => units.min(n),
            };
            let units = units as i32;
            b.arg(&tile0).arg(&splits).arg(&units).arg(&part_ptr);
            BiasView::push(&mut b, bias.as_ref(), &null);
            b.arg(&bias_len).arg(&gelu_from).arg(&k_split);
            // SAFETY: argument types match the kernel's signature; two CTAs per cluster, each
            // cluster taking whole units; the maps cover x, x2, y and the weight's padded rows
            // exactly, and the scale blocks read lie in whole 128x4 tiles.
            unsafe { b.launch(grid(SM90_TMA_CTAS * clusters, launch_smem)) }.map_err(wrap("nvfp4 sm90 gemm (tma)"))?;
            continue;
        }
        args.push(&mut b, call, &mut y)?;
        b.arg(&tile0).arg(&splits).arg(&part_ptr);
        BiasView::push(&mut b, bias.as_ref(), &null);
        b.arg(&bias_len).arg(&gelu_from);
        b.arg(input.x2).arg(&ldx).arg(&ldx2).arg(&k_split);
        // SAFETY: argument types match the kernel's signature; one CTA per tile or part; every
        // row the kernel reads lies in x (features < k_split, rows ldx apart) or x2 (rows ldx2
        // apart), whose views end at their last row's last feature.
        unsafe { b.launch(grid(ctas, launch_smem)) }.map_err(wrap("nvfp4 sm90 gemm"))?;
    }
    if tail > 0 && !sums_in_cluster {
        let f = function_in(dev, Kernels::Sm90, &format!("nvfp4_sm90_tail_sum_{suffix}"))?;
        let (bt_i, whole_i, tail_i, parts_i) = (bt as i32, whole as i32, tail as i32, parts as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(&part_ptr);
        push_output(&mut b, &mut y)?;
        b.arg(&args.m).arg(&args.n).arg(&bt_i).arg(&whole_i).arg(&tail_i).arg(&parts_i).arg(&args.alpha);
        BiasView::push(&mut b, bias.as_ref(), &null);
        b.arg(&bias_len).arg(&gelu_from);
        // SAFETY: argument types match; one thread per (tile, token, feature) of the split tiles.
        unsafe { b.launch(launch_1d(tail * bt as usize * SM90_ROWS as usize)) }.map_err(wrap("nvfp4 sm90 tail sum"))?;
    }
    Ok(CudaStorage { slice: y, device: dev.clone() })
}

/// The TMA form's descriptors: the input's first part, its second (the first again for one part)
/// and the weight codes.
struct Sm90Maps {
    act: TensorMap,
    act2: TensorMap,
    codes: TensorMap,
}

/// The TMA form's descriptors where it takes this product (see [`Sm90Form::Auto`]), else `None`
/// (the cp.async form runs). Its clusters pair neighbouring feature blocks, so the tile count and
/// the whole (unsplit) tiles must both be even.
fn sm90_tma_maps(call: &GemmCall, input: &Parts, plan: &tiling::Sm90Plan) -> Result<Option<Sm90Maps>> {
    let GemmCall { op, dev, m, .. } = *call;
    let stream = dev.cuda_stream();
    let pairs = op.n.div_ceil(SM90_ROWS as usize).is_multiple_of(SM90_TMA_CTAS)
        && (plan.tiles - plan.tail).is_multiple_of(SM90_TMA_CTAS);
    if !pairs {
        return Ok(None);
    }
    let x_ptr = call.x.device_ptr(&stream).0;
    let x2_ptr = input.x2.device_ptr(&stream).0;
    let w_ptr = call.w.device_ptr(&stream).0;
    let sc_ptr = call.sc.device_ptr(&stream).0;
    const BF16_BYTES: u64 = 2;
    let aligned = Tile2d::fits(x_ptr, input.ldx as u64 * BF16_BYTES)
        && Tile2d::fits(x2_ptr, input.ldx2 as u64 * BF16_BYTES)
        && Tile2d::fits(w_ptr, op.weight_row_bytes as u64)
        && Tile2d::fits(sc_ptr, 0);
    // Each CTA of a pair fetches half of the tile's tokens (and multicasts them to both). A box
    // may not exceed its tensor (the driver's rule), so small inputs keep the cp.async form.
    let box_rows = plan.tokens_per_cta / SM90_TMA_CTAS;
    let k_tile = tiling::SM90_K_TILE;
    let boxes_fit =
        m >= box_rows && input.k_split >= k_tile && (input.k_split == op.k || op.k - input.k_split >= k_tile);
    if !aligned || !boxes_fit {
        return Ok(None);
    }
    let box_rows = box_rows as u32;
    let bf16 = sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    let sw128 = sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B;
    let part = |ptr: u64, cols: usize, ld: usize| Tile2d {
        ptr,
        dtype: bf16,
        elem_bytes: BF16_BYTES,
        cols: cols as u64,
        rows: m as u64,
        row_bytes: ld as u64 * BF16_BYTES,
        box_cols: k_tile as u32,
        box_rows,
        swizzle: sw128,
    };
    let act = part(x_ptr, input.k_split, input.ldx).encode()?;
    let act2 = if input.k_split < op.k { part(x2_ptr, op.k - input.k_split, input.ldx2).encode()? } else { act };
    let rows = op.n.div_ceil(SM90_ROWS as usize) * SM90_ROWS as usize;
    let codes = Tile2d {
        ptr: w_ptr,
        dtype: sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        elem_bytes: 1,
        cols: op.weight_row_bytes as u64,
        rows: rows as u64,
        row_bytes: op.weight_row_bytes as u64,
        box_cols: (k_tile / 2) as u32,
        box_rows: SM90_ROWS,
        swizzle: sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
    }
    .encode()?;
    Ok(Some(Sm90Maps { act, act2, codes }))
}

/// The TMA-store epilogue's descriptor of y (`[m][N]`, 16-bit; boxes of 16 features x
/// [`sm90_store_box_tokens`] at `bt` tokens per CTA, the 32-byte swizzle of the kernel's staging
/// boxes), where y allows: 16-bit elements, rows a multiple of 16 bytes, at least one box of
/// features and tokens (a box may not exceed its tensor). `None`: the kernel stores per element.
fn sm90_store_map(call: &GemmCall, y: &CudaStorageSlice, bt: u32) -> Result<Option<TensorMap>> {
    let GemmCall { op, dev, m, .. } = *call;
    let stream = dev.cuda_stream();
    let (ptr, dtype) = match y {
        CudaStorageSlice::BF16(v) => {
            (v.device_ptr(&stream).0, sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16)
        }
        CudaStorageSlice::F16(v) => {
            (v.device_ptr(&stream).0, sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16)
        }
        _ => return Ok(None),
    };
    const ELEM_BYTES: u64 = 2;
    let row_bytes = op.n as u64 * ELEM_BYTES;
    if !Tile2d::fits(ptr, row_bytes)
        || op.n < SM90_TMA_STORE_BOX_FEATURES as usize
        || m < sm90_store_box_tokens(bt) as usize
    {
        return Ok(None);
    }
    Tile2d {
        ptr,
        dtype,
        elem_bytes: ELEM_BYTES,
        cols: op.n as u64,
        rows: m as u64,
        row_bytes,
        box_cols: SM90_TMA_STORE_BOX_FEATURES,
        box_rows: sm90_store_box_tokens(bt),
        swizzle: sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
    }
    .encode()
    .map(Some)
}

/// The output of a W4A16 GEMM, `m x N` elements of the call's output dtype (f32, f16, else bf16),
/// uninitialized, and the kernel-name suffix of that dtype.
fn gemm_output(call: &GemmCall) -> Result<(CudaStorageSlice, &'static str)> {
    let stream = call.dev.cuda_stream();
    let len = call.m * call.op.n;
    // SAFETY: every GEMM kernel (with the sm90 tail's sum pass) writes every element of y.
    Ok(unsafe {
        match call.out_dtype {
            DType::F32 => (CudaStorageSlice::F32(stream.alloc::<f32>(len).map_err(wrap("alloc"))?), "f32"),
            DType::F16 => (CudaStorageSlice::F16(stream.alloc::<f16>(len).map_err(wrap("alloc"))?), "f16"),
            _ => (CudaStorageSlice::BF16(stream.alloc::<bf16>(len).map_err(wrap("alloc"))?), "bf16"),
        }
    })
}

/// A GEMM output from [`gemm_output`] as the next kernel argument.
fn push_output<'a>(
    b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
    y: &'a mut CudaStorageSlice,
) -> Result<()> {
    match y {
        CudaStorageSlice::F32(v) => b.arg(v),
        CudaStorageSlice::F16(v) => b.arg(v),
        CudaStorageSlice::BF16(v) => b.arg(v),
        _ => candle_core::bail!("a GEMM output is f32, f16 or bf16"),
    };
    Ok(())
}

/// A bias in the GEMM output's dtype, as a kernel argument.
enum BiasView<'a> {
    F32(CudaView<'a, f32>),
    F16(CudaView<'a, f16>),
    BF16(CudaView<'a, bf16>),
}

impl<'a> BiasView<'a> {
    fn of(s: &'a CudaStorage, l: &Layout, out: DType) -> Result<Self> {
        if s.dtype() != out {
            candle_core::bail!(
                "nvfp4 linear: a {:?} bias for a {out:?} output (the epilogue reads it as the output's type)",
                s.dtype()
            );
        }
        Ok(match out {
            DType::F32 => Self::F32(view::<f32>(s, l, "bias")?),
            DType::F16 => Self::F16(view::<f16>(s, l, "bias")?),
            _ => Self::BF16(view::<bf16>(s, l, "bias")?),
        })
    }

    fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::BF16(v) => v.len(),
        }
    }

    /// The bias pointer argument: `null` (a zero address, which the kernels test) without one.
    fn push<'b>(
        b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'b>,
        bias: Option<&'b Self>,
        null: &'b u64,
    ) {
        match bias {
            Some(Self::F32(v)) => b.arg(v),
            Some(Self::F16(v)) => b.arg(v),
            Some(Self::BF16(v)) => b.arg(v),
            None => b.arg(null),
        };
    }
}

/// The scalar arguments every W4A16 GEMM kernel takes after y: `(M, N, K, row_bytes, scale_cols,
/// alpha)`.
struct GemmArgs {
    m: i32,
    n: i32,
    k: i32,
    row_bytes: i32,
    scale_cols: i32,
    alpha: f32,
}

impl GemmArgs {
    fn of(call: &GemmCall) -> Self {
        let op = call.op;
        Self {
            m: call.m as i32,
            n: op.n as i32,
            k: op.k as i32,
            row_bytes: op.weight_row_bytes as i32,
            scale_cols: op.scale_cols as i32,
            alpha: op.alpha(),
        }
    }

    /// The kernels' common leading arguments: `(x, w, scales, y, M, N, K, row_bytes, scale_cols,
    /// alpha)`.
    fn push<'a>(
        &'a self,
        b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
        call: &GemmCall<'a>,
        y: &'a mut CudaStorageSlice,
    ) -> Result<()> {
        b.arg(call.x).arg(call.w).arg(call.sc);
        push_output(b, y)?;
        b.arg(&self.m).arg(&self.n).arg(&self.k).arg(&self.row_bytes).arg(&self.scale_cols).arg(&self.alpha);
        Ok(())
    }
}

/// Allocates y and launches a W4A16 GEMM kernel; they all take `(x, w, scales, y, M, N, K,
/// row_bytes, scale_cols, alpha)` and write every element of y. `kernel(suffix)` gives the function
/// for the output dtype (`f32`, `f16` or `bf16`).
fn launch_gemm(
    call: &GemmCall,
    cfg: LaunchConfig,
    what: &str,
    kernel: impl Fn(&str) -> Result<CudaFunction>,
) -> Result<CudaStorage> {
    let stream = call.dev.cuda_stream();
    let (mut y, suffix) = gemm_output(call)?;
    let f = kernel(suffix)?;
    let args = GemmArgs::of(call);
    {
        let mut b = stream.launch_builder(&f);
        args.push(&mut b, call, &mut y)?;
        // SAFETY: argument types match the kernels' common signature.
        unsafe { b.launch(cfg) }.map_err(wrap(what))?;
    }
    Ok(CudaStorage { slice: y, device: call.dev.clone() })
}

/// The cutlass variant: CuTe TiledMMA kernel on the cutlass layout.
#[cfg(candiff_cutlass)]
fn cutlass_gemm(call: &GemmCall) -> Result<CudaStorage> {
    let GemmCall { op, dev, m, .. } = *call;
    debug_assert_eq!(op.kind, LayoutKind::Cutlass);
    let cfg = LaunchConfig {
        grid_dim: ((op.n as u32).div_ceil(GEMM_TILE_N), (m as u32).div_ceil(GEMM_TILE_M), 1),
        block_dim: (GEMM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch_gemm(call, cfg, "nvfp4 cute gemm", |suffix| {
        function_in(dev, Kernels::Cutlass, &format!("nvfp4_cute_gemm_{suffix}"))
    })
}
