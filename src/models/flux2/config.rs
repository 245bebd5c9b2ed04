use serde::Deserialize;

/// `Flux2Transformer2DModel`'s `config.json` (diffusers). FLUX.2-dev and klein share the class;
/// klein differs only in sizes and `guidance_embeds: false`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct Flux2Config {
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub timestep_guidance_channels: usize,
    pub mlp_ratio: f64,
    pub axes_dims_rope: Vec<usize>,
    pub rope_theta: f64,
    pub eps: f64,
    pub guidance_embeds: bool,
}

impl Default for Flux2Config {
    /// FLUX.2-dev.
    fn default() -> Self {
        Self {
            patch_size: 1,
            in_channels: 128,
            out_channels: None,
            num_layers: 8,
            num_single_layers: 48,
            attention_head_dim: 128,
            num_attention_heads: 48,
            joint_attention_dim: 15360,
            timestep_guidance_channels: 256,
            mlp_ratio: 3.0,
            axes_dims_rope: vec![32, 32, 32, 32],
            rope_theta: 2000.0,
            eps: 1e-6,
            guidance_embeds: true,
        }
    }
}

impl Flux2Config {
    /// FLUX.2-klein 4B (Qwen3-4B conditioning: 3 x 2560 features).
    pub fn klein_4b() -> Self {
        Self {
            num_layers: 5,
            num_single_layers: 20,
            num_attention_heads: 24,
            joint_attention_dim: 7680,
            guidance_embeds: false,
            ..Self::default()
        }
    }

    /// FLUX.2-klein 9B (Qwen3-8B conditioning: 3 x 4096 features).
    pub fn klein_9b() -> Self {
        Self {
            num_layers: 8,
            num_single_layers: 24,
            num_attention_heads: 32,
            joint_attention_dim: 12288,
            guidance_embeds: false,
            ..Self::default()
        }
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Width of the SwiGLU hidden layer (`int(dim * mlp_ratio)` as diffusers computes it).
    pub fn mlp_hidden(&self) -> usize {
        (self.inner_dim() as f64 * self.mlp_ratio) as usize
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn from_file(path: &std::path::Path) -> candle_core::Result<Self> {
        Ok(crate::error::read_json_config(path, "FLUX.2 transformer config.json")?)
    }
}
