//! Wan2.x configs, read from the checkpoint's own `config.json` files (diffusers layout).

use serde::Deserialize;

/// `WanTransformer3DModel`'s `config.json`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct WanConfig {
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    #[serde(default = "yes")]
    pub cross_attn_norm: bool,
    #[serde(default)]
    pub qk_norm: Option<String>,
    #[serde(default = "eps")]
    pub eps: f64,
    /// Image conditioning (Wan I2V); not supported by the text-to-video models.
    #[serde(default)]
    pub image_dim: Option<usize>,
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
}

fn yes() -> bool {
    true
}
fn eps() -> f64 {
    1e-6
}

impl WanConfig {
    pub fn from_file(path: &std::path::Path) -> candle_core::Result<Self> {
        Ok(crate::error::read_json_config(path, "Wan transformer config.json")?)
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// RoPE sub-dimensions of the (frame, height, width) axes: h = w = 2*(hd/6), t gets the rest.
    pub fn rope_axes(&self) -> [usize; 3] {
        let hd = self.attention_head_dim;
        let hw = 2 * (hd / 6);
        [hd - 2 * hw, hw, hw]
    }

    /// Full-size configs for benchmarks with random weights (the released checkpoints' values).
    pub fn a14b() -> Self {
        Self {
            patch_size: [1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: Some(16),
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some("rms_norm_across_heads".into()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
        }
    }

    pub fn ti2v_5b() -> Self {
        Self {
            num_attention_heads: 24,
            in_channels: 48,
            out_channels: Some(48),
            ffn_dim: 14336,
            num_layers: 30,
            ..Self::a14b()
        }
    }
}

/// `AutoencoderKLWan`'s `config.json`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct WanVaeConfig {
    pub base_dim: usize,
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    #[serde(default)]
    pub is_residual: bool,
    /// Encoder input / decoder output channels, after patchifying (12 for Wan2.2's 3 x 2 x 2).
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
    #[serde(default = "four")]
    pub scale_factor_temporal: usize,
    #[serde(default = "eight")]
    pub scale_factor_spatial: usize,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn eight() -> usize {
    8
}

impl WanVaeConfig {
    pub fn from_file(path: &std::path::Path) -> candle_core::Result<Self> {
        Ok(crate::error::read_json_config(path, "Wan VAE config.json")?)
    }

    pub fn patch(&self) -> usize {
        self.patch_size.unwrap_or(1).max(1)
    }

    /// Pixels per latent along height/width.
    pub fn spatial_factor(&self) -> usize {
        self.scale_factor_spatial
    }

    /// Frames per latent frame (after the first).
    pub fn temporal_factor(&self) -> usize {
        self.scale_factor_temporal
    }

    /// The Wan2.1 VAE of T2V-A14B (z 16, 8x spatial), for benchmarks.
    pub fn wan21() -> Self {
        Self {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            latents_mean: vec![0.0; 16],
            latents_std: vec![1.0; 16],
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
            scale_factor_temporal: 4,
            scale_factor_spatial: 8,
        }
    }

    /// The Wan2.2 VAE of TI2V-5B (z 48, patchified, 16x spatial), for benchmarks.
    pub fn wan22() -> Self {
        Self {
            base_dim: 160,
            decoder_base_dim: Some(256),
            z_dim: 48,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            latents_mean: vec![0.0; 48],
            latents_std: vec![1.0; 48],
            is_residual: true,
            in_channels: 12,
            out_channels: 12,
            patch_size: Some(2),
            scale_factor_temporal: 4,
            scale_factor_spatial: 16,
        }
    }
}
