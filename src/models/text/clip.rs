//! CLIP-L text encoder (`CLIPTextModel`): last hidden state and the pooled output at the first EOS.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig, ClipTextTransformer};
use serde::Deserialize;

/// `CLIPTextModel`'s `config.json` (transformers names).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub projection_dim: usize,
    pub eos_token_id: i64,
}

fn default_act() -> String {
    "quick_gelu".into()
}

pub struct ClipText {
    model: ClipTextTransformer,
    eos: i64,
}

impl ClipText {
    /// `vb` at the root of `model.safetensors`; the tensors may live under `text_model.` (older
    /// transformers exports, as in the FLUX.1 repositories) or at the root (transformers 5).
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let vb =
            if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        let activation = match cfg.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            other => candle_core::bail!("CLIP hidden_act `{other}` is not supported (CLIP-L uses quick_gelu)"),
        };
        let c = ClipTextConfig {
            vocab_size: cfg.vocab_size,
            embed_dim: cfg.hidden_size,
            activation,
            intermediate_size: cfg.intermediate_size,
            max_position_embeddings: cfg.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            projection_dim: cfg.projection_dim,
        };
        Ok(Self { model: ClipTextTransformer::new(vb, &c)?, eos: cfg.eos_token_id })
    }

    /// `input_ids` `[B, S]` -> (last hidden state `[B, S, D]`, pooled `[B, D]` at each row's first EOS).
    pub fn forward(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let hidden = self.model.forward_with_mask(input_ids, usize::MAX)?;
        let ids: Vec<Vec<i64>> = input_ids.to_dtype(DType::I64)?.to_device(&Device::Cpu)?.to_vec2()?;
        let mut pooled = Vec::with_capacity(ids.len());
        for (b, row) in ids.iter().enumerate() {
            let pos = row.iter().position(|&t| t == self.eos).unwrap_or(row.len() - 1);
            pooled.push(hidden.i((b, pos))?.unsqueeze(0)?);
        }
        Ok((hidden, Tensor::cat(&pooled, 0)?))
    }
}
