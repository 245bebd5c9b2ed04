//! The `cudnn` variant: cuDNN graph API through the C++ shim in kernels/cudnn_nvfp4.cpp.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::{DType, Result};
use half::{bf16, f16};

use super::{ffi_message, wrap, GemmCall};
use crate::error::CandiffError;
use crate::nvfp4::layout::{ceil_to, LayoutKind, CUTLASS_ALIGN};

/// Oldest cuDNN with general block-scale dequantize + matmul graphs (9.11.0).
pub const MIN_CUDNN_VERSION: usize = 91100;
const ERR_LEN: usize = 2048;

/// Calls a C++ shim, which returns nonzero on failure after writing its message into the buffer
/// it is given (`ERR_LEN` bytes): that message becomes the error.
fn shim(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut err = vec![0u8; ERR_LEN];
    if call(err.as_mut_ptr() as *mut c_char, ERR_LEN) != 0 {
        return Err(CandiffError::Unsupported(ffi_message(&err)).into());
    }
    Ok(())
}

extern "C" {
    fn candiff_cudnn_version() -> usize;
    fn candiff_cudnn_nvfp4_prepare(
        device: c_int,
        stream: *mut c_void,
        m: i64,
        n: i64,
        k: i64,
        row_elems: i64,
        linear_scales: c_int,
        out: c_int,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
    fn candiff_cudnn_nvfp4_matmul(
        device: c_int,
        stream: *mut c_void,
        m: i64,
        n: i64,
        k: i64,
        row_elems: i64,
        linear_scales: c_int,
        out: c_int,
        x: *const c_void,
        w: *const c_void,
        w_scale: *const c_void,
        alpha: *const c_void,
        y: *mut c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// The loaded cuDNN's version as `major * 10000 + minor * 100 + patch`.
pub fn version() -> usize {
    // SAFETY: no arguments; cuDNN returns its compile-time constant.
    unsafe { candiff_cudnn_version() }
}

pub fn version_string(v: usize) -> String {
    format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
}

pub fn check_version() -> Result<()> {
    let v = version();
    if v < MIN_CUDNN_VERSION {
        return Err(CandiffError::Unsupported(format!(
            "the NVFP4 cudnn variant needs cuDNN {} or newer for block-scale dequantize graphs, found {}",
            version_string(MIN_CUDNN_VERSION),
            version_string(v)
        ))
        .into());
    }
    Ok(())
}

fn out_code(dtype: DType) -> c_int {
    match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        _ => 2,
    }
}

/// Builds the graph for a layer's shape now, so an unsupported GPU or cuDNN fails at load time.
pub fn prepare(dev: &CudaDevice, m: usize, n: usize, k: usize, linear_scales: bool, dtype: DType) -> Result<()> {
    let stream = dev.cuda_stream();
    // SAFETY: plain values and an error buffer of the stated length.
    shim(|err, len| unsafe {
        candiff_cudnn_nvfp4_prepare(
            stream.context().ordinal() as c_int,
            stream.cu_stream() as *mut c_void,
            m as i64,
            n as i64,
            k as i64,
            ceil_to(k, CUTLASS_ALIGN) as i64,
            linear_scales as c_int,
            out_code(dtype),
            err,
            len,
        )
    })
}

/// Each distinct alpha lives once on each device (cuDNN reads it as a device scalar).
fn alpha_on_device(dev: &CudaDevice, alpha: f32) -> Result<CudaSlice<f32>> {
    type Cache = Mutex<HashMap<(DeviceId, u32), CudaSlice<f32>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut c = CACHE.get_or_init(Default::default).lock().expect("alpha cache poisoned");
    if let Some(s) = c.get(&(dev.id(), alpha.to_bits())) {
        return Ok(s.clone());
    }
    let s = dev.cuda_stream().clone_htod(&[alpha]).map_err(wrap("alpha upload"))?;
    c.insert((dev.id(), alpha.to_bits()), s.clone());
    Ok(s)
}

pub(crate) fn matmul(call: &GemmCall) -> Result<CudaStorage> {
    let GemmCall { op, dev, x, w, sc, m, out_dtype } = *call;
    let stream = dev.cuda_stream();
    let alpha = alpha_on_device(dev, op.alpha())?;
    let n = m * op.n;
    // SAFETY: the graph writes every output element.
    let y = unsafe {
        match out_dtype {
            DType::F32 => CudaStorageSlice::F32(stream.alloc::<f32>(n).map_err(wrap("alloc"))?),
            DType::F16 => CudaStorageSlice::F16(stream.alloc::<f16>(n).map_err(wrap("alloc"))?),
            _ => CudaStorageSlice::BF16(stream.alloc::<bf16>(n).map_err(wrap("alloc"))?),
        }
    };
    {
        let (xp, _gx) = x.device_ptr(&stream);
        let (wp, _gw) = w.device_ptr(&stream);
        let (sp, _gs) = sc.device_ptr(&stream);
        let (ap, _ga) = alpha.device_ptr(&stream);
        let (yp, _gy) = match &y {
            CudaStorageSlice::F32(s) => s.device_ptr(&stream),
            CudaStorageSlice::F16(s) => s.device_ptr(&stream),
            CudaStorageSlice::BF16(s) => s.device_ptr(&stream),
            _ => unreachable!("allocated above"),
        };
        // SAFETY: every pointer is a live device buffer of the size the graph's shapes imply
        // (prepared layout shapes were checked when the layer was built); the shim runs on `stream`.
        shim(|err, len| unsafe {
            candiff_cudnn_nvfp4_matmul(
                stream.context().ordinal() as c_int,
                stream.cu_stream() as *mut c_void,
                m as i64,
                op.n as i64,
                op.k as i64,
                ceil_to(op.k, CUTLASS_ALIGN) as i64,
                (op.kind == LayoutKind::CutlassLinearScales) as c_int,
                out_code(out_dtype),
                xp as *const c_void,
                wp as *const c_void,
                sp as *const c_void,
                ap as *const c_void,
                yp as *mut c_void,
                err,
                len,
            )
        })?;
    }
    Ok(CudaStorage { slice: y, device: dev.clone() })
}

extern "C" {
    fn candiff_cudnn_sdpa(
        device: c_int,
        stream: *mut c_void,
        b: i64,
        h: i64,
        sq: i64,
        sk: i64,
        d: i64,
        strides: *const i64,
        half: c_int,
        scale: f32,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *mut c_void,
        scalars: *mut f32,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// The element type of a fused attention's q, k, v and o.
#[derive(Debug, Clone, Copy)]
pub enum SdpaIo {
    Bf16,
    F16,
    /// E4M3, with the FP8 scalar buffer (`attn_fp8::SLOT_FLOATS` apart: descales, scales, amaxes).
    Fp8 {
        scalars: candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr,
    },
}

/// Runs cuDNN's fused attention on `stream`: dims (B, H, Sq, Sk, D), strides of q, k, v, o (four
/// each, elements), pointers to q, k, v, o.
pub fn run_sdpa(
    stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    (b, h, sq, sk, d): (usize, usize, usize, usize, usize),
    strides: &[i64],
    io: SdpaIo,
    scale: f32,
    ptrs: [candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr; 4],
) -> Result<()> {
    assert_eq!(strides.len(), 16, "four strides for each of q, k, v, o");
    let (code, scalars) = match io {
        SdpaIo::Bf16 => (0, std::ptr::null_mut()),
        SdpaIo::F16 => (1, std::ptr::null_mut()),
        SdpaIo::Fp8 { scalars } => (2, scalars as *mut f32),
    };
    // SAFETY: the pointers address live device buffers laid out as `strides` say (the callers'
    // contract), `scalars` the FP8 scalar buffer when `code` is 2; the shim runs on `stream`.
    shim(|err, len| unsafe {
        candiff_cudnn_sdpa(
            stream.context().ordinal() as c_int,
            stream.cu_stream() as *mut c_void,
            b as i64,
            h as i64,
            sq as i64,
            sk as i64,
            d as i64,
            strides.as_ptr(),
            code,
            scale,
            ptrs[0] as *const c_void,
            ptrs[1] as *const c_void,
            ptrs[2] as *const c_void,
            ptrs[3] as *mut c_void,
            scalars,
            err,
            len,
        )
    })
}

/// Largest head dimension of cuDNN's fused attention engines.
pub const SDPA_MAX_HEAD_DIM: usize = 256;
/// Head dimensions must be a multiple of this (16-byte rows of bf16/f16).
pub const SDPA_HEAD_DIM_ALIGN: usize = 8;

/// Fused attention: `q` `[B, H, Sq, D]`, `k`/`v` `[B, H, Sk, D]` (any strides with a unit last
/// stride, bf16 or f16) -> `[B, Sq, H, D]` contiguous, so merging heads needs no copy.
pub struct Sdpa {
    pub scale: f32,
}

fn half_slice(
    s: &CudaStorage,
    l: &candle_core::Layout,
    what: &str,
) -> Result<(candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr, Vec<i64>, DType)> {
    let stream = s.device.cuda_stream();
    let (ptr, dtype, elem) = match &s.slice {
        CudaStorageSlice::BF16(x) => (x.device_ptr(&stream).0, DType::BF16, 2u64),
        CudaStorageSlice::F16(x) => (x.device_ptr(&stream).0, DType::F16, 2u64),
        _ => candle_core::bail!(
            "fused attention takes bf16 or f16 {what}, found {:?}",
            candle_core::backend::BackendStorage::dtype(s)
        ),
    };
    let st = l.stride();
    if l.dims().len() != 4 || st[3] != 1 {
        candle_core::bail!(
            "fused attention: {what} must be [B, H, S, D] with unit stride on D, found {:?} / {st:?}",
            l.dims()
        );
    }
    Ok((ptr + l.start_offset() as u64 * elem, st.iter().map(|v| *v as i64).collect(), dtype))
}

impl candle_core::CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "cudnn-sdpa"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("cuDNN attention runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &candle_core::Layout,
        k: &CudaStorage,
        kl: &candle_core::Layout,
        v: &CudaStorage,
        vl: &candle_core::Layout,
    ) -> Result<(CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let (qp, qs, dtype) = half_slice(q, ql, "q")?;
        let (kp, ks, kd) = half_slice(k, kl, "k")?;
        let (vp, vs, vd) = half_slice(v, vl, "v")?;
        if kd != dtype || vd != dtype {
            candle_core::bail!("fused attention: q, k, v must share a dtype");
        }
        let (b, h, sq, d) = ql.shape().dims4()?;
        let sk = kl.dims()[2];
        if kl.dims() != [b, h, sk, d] || vl.dims() != [b, h, sk, d] {
            candle_core::bail!("fused attention: k {:?} / v {:?} do not match q {:?}", kl.dims(), vl.dims(), ql.dims());
        }
        let dev = q.device().clone();
        let stream = dev.cuda_stream();
        let n = b * sq * h * d;
        // SAFETY: the graph writes every output element.
        let o = unsafe {
            match dtype {
                DType::F16 => CudaStorageSlice::F16(stream.alloc::<f16>(n).map_err(wrap("alloc"))?),
                _ => CudaStorageSlice::BF16(stream.alloc::<bf16>(n).map_err(wrap("alloc"))?),
            }
        };
        // Output [B, Sq, H, D] seen as [B, H, Sq, D].
        let os = [(sq * h * d) as i64, d as i64, (h * d) as i64, 1];
        let strides: Vec<i64> = [qs, ks, vs, os.to_vec()].concat();
        {
            let (op, _g) = match &o {
                CudaStorageSlice::F16(s) => s.device_ptr(&stream),
                CudaStorageSlice::BF16(s) => s.device_ptr(&stream),
                _ => unreachable!("allocated above"),
            };
            let io = if dtype == DType::F16 { SdpaIo::F16 } else { SdpaIo::Bf16 };
            // q/k/v point into live device buffers laid out as their layouts say (checked above),
            // `o` holds B*Sq*H*D elements.
            run_sdpa(&stream, (b, h, sq, sk, d), &strides, io, self.scale, [qp, kp, vp, op])?;
        }
        Ok((CudaStorage { slice: o, device: dev }, candle_core::Shape::from((b, sq, h, d))))
    }
}
