//! FLUX.1's VAE decoder (diffusers `AutoencoderKL`, no quant convs) through candle-transformers'
//! implementation, with FLUX's latent scaling and shift.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;

/// `AutoencoderKL`'s `config.json`, the fields the decoder needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl Default for VaeConfig {
    /// FLUX.1's VAE.
    fn default() -> Self {
        Self {
            in_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            use_quant_conv: false,
            use_post_quant_conv: false,
            scaling_factor: 0.3611,
            shift_factor: 0.1159,
        }
    }
}

impl VaeConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        Ok(crate::error::read_json_config(path, "AutoencoderKL config.json")?)
    }

    /// Pixels per latent along each side.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

pub struct FluxVae {
    cfg: VaeConfig,
    inner: AutoEncoderKL,
}

impl FluxVae {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let c = AutoEncoderKLConfig {
            block_out_channels: cfg.block_out_channels.clone(),
            layers_per_block: cfg.layers_per_block,
            latent_channels: cfg.latent_channels,
            norm_num_groups: cfg.norm_num_groups,
            use_quant_conv: cfg.use_quant_conv,
            use_post_quant_conv: cfg.use_post_quant_conv,
        };
        Ok(Self { cfg: cfg.clone(), inner: AutoEncoderKL::new(vb, cfg.in_channels, cfg.in_channels, c)? })
    }

    /// The dtype the decoder runs in: `dtype`, except bf16/f16 on the CPU, where Candle's
    /// convolutions lack half-precision matmuls and f32 is used instead.
    pub fn dtype_on(device: &candle_core::Device, dtype: DType) -> DType {
        if device.is_cpu() {
            DType::F32
        } else {
            dtype
        }
    }

    /// Sampler latents `[B, C, h, w]` to what the decoder takes: `x / scaling + shift`.
    pub fn denormalize(&self, latents: &Tensor) -> Result<Tensor> {
        (latents / self.cfg.scaling_factor)? + self.cfg.shift_factor
    }

    /// Decoder output in [-1, 1] (unclamped), `[B, 3, H, W]`, from denormalized latents.
    pub fn decode(&self, z: &Tensor, dtype: DType) -> Result<Tensor> {
        self.inner.decode(&z.to_dtype(dtype)?)?.to_dtype(DType::F32)
    }
}

/// Decoder output `[B, 3, H, W]` to images `[B, H, W, 3]` in [0, 1].
pub fn to_unit_images(decoded: &Tensor) -> Result<Tensor> {
    ((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?.permute((0, 2, 3, 1))
}
