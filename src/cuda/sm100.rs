//! The cutlass variant's w4a4 path on sm_100 (Blackwell datacenter): CUTLASS's block-scaled NVFP4 GEMM
//! on FP4 tensor cores (kernels/nvfp4_sm100.cu). UNTESTED: compiled here, never run on a Blackwell GPU.

use std::ffi::{c_char, c_int, c_void};

use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
use candle_core::{DType, Result};
use half::bf16;

use super::{ffi_message, function, quantize_activations_padded, wrap, GemmCall};
use crate::error::CandiffError;
use crate::nvfp4::layout::{ceil_to, CUTLASS_ALIGN};

/// The only compute capability the sm_100a cubin runs on.
pub const SM100: (i32, i32) = (10, 0);
const ERR_LEN: usize = 1024;

extern "C" {
    fn candiff_sm100_nvfp4_gemm(
        a: *const c_void,
        sfa: *const c_void,
        b: *const c_void,
        sfb: *const c_void,
        d: *mut c_void,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        out_f32: c_int,
        stream: *mut c_void,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

pub(crate) fn fp4_gemm(call: &GemmCall) -> Result<CudaStorage> {
    let GemmCall { op, dev, x, w, sc, m, out_dtype } = *call;
    let stream = dev.cuda_stream();
    let (elem, out_f32) = match out_dtype {
        DType::F32 => (4usize, true),
        DType::BF16 => (2, false),
        d => {
            return Err(CandiffError::Unsupported(format!(
                "the sm_100 FP4 GEMM writes bf16 or f32, not {d:?}; run the model in bf16"
            ))
            .into())
        }
    };
    // The weight's K is padded to 32 with zero codes; the activation codes get the same padding.
    let k_pad = ceil_to(op.k, CUTLASS_ALIGN);
    let (codes, _) = quantize_activations_padded(dev, x, m, op.k, k_pad, op.input_scale, true, false)?;
    let (packed, scales) = codes.expect("codes requested");
    // D rows must be 16-byte aligned; the weight has zero rows up to a multiple of 32.
    let n_pad = ceil_to(op.n, 16 / elem);
    macro_rules! run {
        ($t:ty, $variant:ident) => {{
            let d = stream.alloc_zeros::<$t>(m * n_pad).map_err(wrap("alloc"))?;
            let mut err = vec![0u8; ERR_LEN];
            let rc = {
                let (ap, _g1) = packed.device_ptr(&stream);
                let (sap, _g2) = scales.device_ptr(&stream);
                let (bp, _g3) = w.device_ptr(&stream);
                let (sbp, _g4) = sc.device_ptr(&stream);
                let (dp, _g5) = d.device_ptr(&stream);
                // SAFETY: buffers sized for (m, n_pad, k_pad) as laid out above; runs on `stream`.
                unsafe {
                    candiff_sm100_nvfp4_gemm(
                        ap as *const c_void,
                        sap as *const c_void,
                        bp as *const c_void,
                        sbp as *const c_void,
                        dp as *mut c_void,
                        m as c_int,
                        n_pad as c_int,
                        k_pad as c_int,
                        op.alpha(),
                        out_f32 as c_int,
                        stream.cu_stream() as *mut c_void,
                        err.as_mut_ptr() as *mut c_char,
                        ERR_LEN,
                    )
                }
            };
            if rc != 0 {
                return Err(CandiffError::Unsupported(ffi_message(&err)).into());
            }
            let d = if n_pad == op.n {
                d
            } else {
                let f = function(dev, "crop_cols")?;
                let mut out = stream.alloc_zeros::<$t>(m * op.n).map_err(wrap("alloc"))?;
                let (r, sc_, dc, eb) = (m as i32, n_pad as i32, op.n as i32, elem as i32);
                let total = m * op.n;
                let mut b = stream.launch_builder(&f);
                b.arg(&d).arg(&mut out).arg(&r).arg(&sc_).arg(&dc).arg(&eb);
                let cfg = LaunchConfig {
                    grid_dim: ((total as u32).div_ceil(256), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: argument types match the kernel; `total` bounds every access.
                unsafe { b.launch(cfg) }.map_err(wrap("crop_cols"))?;
                out
            };
            CudaStorage { slice: CudaStorageSlice::$variant(d), device: dev.clone() }
        }};
    }
    Ok(if out_f32 { run!(f32, F32) } else { run!(bf16, BF16) })
}
