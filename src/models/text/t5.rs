//! T5 encoder (`T5EncoderModel`), candle-transformers' implementation. No attention mask, as FLUX
//! feeds the padding; run it in bf16 or f32 (f16 overflows in T5-XXL's feed-forward).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
pub use candle_transformers::models::t5::Config as T5Config;
use candle_transformers::models::t5::T5EncoderModel;

pub struct T5Encoder {
    model: T5EncoderModel,
}

impl T5Encoder {
    pub fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        if vb.dtype() == DType::F16 {
            candle_core::bail!("T5 overflows in f16: load the text encoder in bf16 or f32");
        }
        Ok(Self { model: T5EncoderModel::load(vb, cfg)? })
    }

    /// `input_ids` `[B, S]` -> last hidden state `[B, S, d_model]`.
    pub fn forward(&mut self, input_ids: &Tensor) -> Result<Tensor> {
        self.model.forward(input_ids)
    }
}
