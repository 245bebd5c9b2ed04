//! What this build and device can run. Checked when a layer is created, so an unusable variant is
//! an error at load time, not at the first forward.

use candle_core::{Device, Result};

use crate::nvfp4::{Backend, LayoutKind};

/// True when the crate was built with our CUDA kernels.
pub const HAVE_CUDA_KERNELS: bool = cfg!(feature = "cuda");
/// True when the cuDNN variant was compiled in.
pub const HAVE_CUDNN: bool = cfg!(feature = "cudnn");

/// Errors (with what to do) if a layer of `n` x `k` cannot run with `backend` on `device`: the
/// device-level checks plus, for cuDNN, building the layer's graph once.
pub fn check_layer(backend: Backend, device: &Device, n: usize, k: usize) -> Result<()> {
    check_backend(backend, device)?;
    #[cfg(feature = "cudnn")]
    if let (Backend::Cudnn, Device::Cuda(d)) = (backend, device) {
        let linear = crate::cuda::layout_for(backend, d)? == LayoutKind::CutlassLinearScales;
        crate::cuda::cudnn::prepare(d, 1, n, k, linear, candle_core::DType::BF16)?;
    }
    let _ = (n, k);
    Ok(())
}

/// The layout `backend` prepares weights in on `device` (the CPU reference reads every layout, and
/// uses each variant's own).
pub fn layout_for(backend: Backend, device: &Device) -> Result<LayoutKind> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::layout_for(backend, d),
        _ => Ok(backend.layout()),
    }
}

/// Errors (with what to do) if `backend` cannot run on `device`.
pub fn check_backend(backend: Backend, device: &Device) -> Result<()> {
    match device {
        // The CPU reference reads every backend's layout.
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => crate::cuda::check_backend(backend, d),
        other => candle_core::bail!(
            "the NVFP4 {backend} variant has no kernel for {other:?}; run on the CPU or build with --features cuda"
        ),
    }
}

/// GPU `ordinal` with Candle's stream (`own_stream`: a stream of its own rather than the
/// per-thread default one, for ranks whose NCCL calls order with it). cudarc's cross-stream
/// event tracking is switched off: everything candiff runs on a device uses that one stream, and
/// with tracking on every allocation creates two CUDA events and, once a context holds a second
/// stream, every kernel argument adds an event wait and an event record on the host.
pub fn cuda_device(ordinal: usize, own_stream: bool) -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        let d = if own_stream {
            candle_core::CudaDevice::new_with_stream(ordinal)?
        } else {
            use candle_core::backend::BackendDevice;
            candle_core::CudaDevice::new(ordinal)?
        };
        // SAFETY: one stream per device (see above), so no buffer is used on a stream other than
        // the one that allocated and frees it.
        unsafe { d.disable_event_tracking() };
        Ok(Device::Cuda(d))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (ordinal, own_stream);
        Err(candle_core::Error::Msg("this build has no CUDA support (rebuild with --features cuda)".into()))
    }
}
