use serde::Deserialize;

/// `FluxTransformer2DModel`'s `config.json` (diffusers), the fields the model needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct FluxConfig {
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    pub guidance_embeds: bool,
    pub axes_dims_rope: Vec<usize>,
}

impl Default for FluxConfig {
    /// FLUX.1-dev.
    fn default() -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
        }
    }
}

impl FluxConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Reads a `config.json`.
    pub fn from_file(path: &std::path::Path) -> candle_core::Result<Self> {
        Ok(crate::error::read_json_config(path, "FLUX transformer config.json")?)
    }
}
