//! CLIP and T5 against `flux1_tiny/text_encoders.safetensors` (transformers, f32 from bf16 weights).

mod common;

use candiff::models::text::clip::{ClipConfig, ClipText};
use candiff::models::text::t5::{T5Config, T5Encoder};
use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_diff};

fn v(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn vb(dir: &str) -> candle_nn::VarBuilder<'static> {
    let p = fixtures().join("flux1_tiny").join(dir).join("model.safetensors");
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[p], DType::F32, &Device::Cpu).unwrap() }
}

fn config<T: serde::de::DeserializeOwned>(dir: &str) -> T {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("flux1_tiny").join(dir).join("config.json")).unwrap())
        .unwrap()
}

#[test]
fn clip_hidden_state_and_pooled() {
    let io =
        candle_core::safetensors::load(fixtures().join("flux1_tiny/text_encoders.safetensors"), &Device::Cpu).unwrap();
    let clip = ClipText::new(&config::<ClipConfig>("text_encoder"), vb("text_encoder")).unwrap();
    let (hidden, pooled) = clip.forward(&io["clip_input_ids"]).unwrap();
    let d = max_diff(&v(&hidden), &v(&io["clip_last_hidden_state"]));
    assert!(d <= 1e-5, "last_hidden_state: {d}");
    let d = max_diff(&v(&pooled), &v(&io["clip_pooled"]));
    assert!(d <= 1e-5, "pooled: {d}");
}

#[test]
fn t5_hidden_state() {
    let io =
        candle_core::safetensors::load(fixtures().join("flux1_tiny/text_encoders.safetensors"), &Device::Cpu).unwrap();
    let mut t5 = T5Encoder::new(&config::<T5Config>("text_encoder_2"), vb("text_encoder_2")).unwrap();
    let out = t5.forward(&io["t5_input_ids"]).unwrap();
    let d = max_diff(&v(&out), &v(&io["t5_last_hidden_state"]));
    assert!(d <= 1e-5, "t5: {d}");
}
