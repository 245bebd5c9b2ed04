//! FLUX.2's VAE (`AutoencoderKLFlux2`): an `AutoencoderKL` with quant convs and 32 latent
//! channels (candle-transformers' implementation) whose 2x2-patchified latents are normalized by
//! batch-norm running statistics instead of FLUX.1's scale and shift.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;

use super::sampling::unpatchify;

/// `AutoencoderKLFlux2`'s `config.json`, the fields the decoder needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct Flux2VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub batch_norm_eps: f64,
    pub patch_size: Vec<usize>,
}

impl Default for Flux2VaeConfig {
    /// FLUX.2's VAE.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 32,
            norm_num_groups: 32,
            use_quant_conv: true,
            use_post_quant_conv: true,
            batch_norm_eps: 1e-4,
            patch_size: vec![2, 2],
        }
    }
}

impl Flux2VaeConfig {
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        Ok(crate::error::read_json_config(path, "AutoencoderKLFlux2 config.json")?)
    }

    /// Pixels per latent along each side (before the 2x2 patchify).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Pixels per transformer token along each side.
    pub fn token_size(&self) -> usize {
        self.downscale() * 2
    }
}

pub struct Flux2Vae {
    inner: AutoEncoderKL,
    /// `bn.running_mean` / `sqrt(bn.running_var + eps)`, `[1, 4C, 1, 1]` f32.
    bn_mean: Tensor,
    bn_std: Tensor,
}

impl Flux2Vae {
    pub fn new(cfg: &Flux2VaeConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.patch_size != [2, 2] {
            candle_core::bail!("FLUX.2 VAE: patch_size {:?} is not supported (expected [2, 2])", cfg.patch_size);
        }
        let c = AutoEncoderKLConfig {
            block_out_channels: cfg.block_out_channels.clone(),
            layers_per_block: cfg.layers_per_block,
            latent_channels: cfg.latent_channels,
            norm_num_groups: cfg.norm_num_groups,
            use_quant_conv: cfg.use_quant_conv,
            use_post_quant_conv: cfg.use_post_quant_conv,
        };
        let n = 4 * cfg.latent_channels;
        let bn = vb.pp("bn");
        let stat = |name: &str| -> Result<Tensor> { bn.get(n, name)?.to_dtype(DType::F32)?.reshape((1, n, 1, 1)) };
        let bn_mean = stat("running_mean")?;
        let bn_std = (stat("running_var")? + cfg.batch_norm_eps)?.sqrt()?;
        Ok(Self { inner: AutoEncoderKL::new(vb, cfg.in_channels, cfg.out_channels, c)?, bn_mean, bn_std })
    }

    /// Decoder output in [-1, 1] (unclamped) `[B, 3, H, W]` from patchified, normalized latents
    /// `[B, 4C, h, w]` (what the sampler produces, unpacked), running in `dtype`.
    pub fn decode(&self, latents: &Tensor, dtype: DType) -> Result<Tensor> {
        let x = latents.to_dtype(DType::F32)?.broadcast_mul(&self.bn_std)?.broadcast_add(&self.bn_mean)?;
        let z = unpatchify(&x)?;
        self.inner.decode(&z.to_dtype(dtype)?)?.to_dtype(DType::F32)
    }
}
