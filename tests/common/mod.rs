//! Shared test helpers: the fixture root and raw tensor access.
#![allow(dead_code)]

use std::path::PathBuf;

use candiff::safetensors::{Dtype, MappedFile};

/// `CANDIFF_FIXTURES` when set (other generated sets), else the copy in `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    match std::env::var("CANDIFF_FIXTURES") {
        Ok(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

pub fn open(rel: &str) -> MappedFile {
    let p = fixtures().join(rel);
    MappedFile::open(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

pub fn raw(f: &MappedFile, name: &str) -> Vec<u8> {
    f.bytes(name).unwrap_or_else(|| panic!("{}: no tensor {name}", f.name())).to_vec()
}

pub fn shape(f: &MappedFile, name: &str) -> Vec<usize> {
    f.info(name).unwrap_or_else(|| panic!("{}: no tensor {name}", f.name())).shape.clone()
}

pub fn f32s(f: &MappedFile, name: &str) -> Vec<f32> {
    let info = f.info(name).unwrap_or_else(|| panic!("{}: no tensor {name}", f.name()));
    assert_eq!(info.dtype, Dtype::F32, "{name}");
    raw(f, name).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

pub fn scalar(f: &MappedFile, name: &str) -> f32 {
    f32s(f, name)[0]
}

pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// max |a - b|.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// First index where two byte buffers differ, for readable failures.
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: byte {i} is {:#04x}, expected {:#04x}", got[i], want[i]);
    }
}

/// A `wan22_tiny/{name}.safetensors` pipeline fixture: the request diffusers ran (prompt embeddings
/// and initial latents are in the tensors), the tensors, and its metadata.
pub fn wan_fixture(
    name: &str,
) -> (candiff::pipelines::wan::T2vRequest, std::collections::HashMap<String, candle_core::Tensor>, serde_json::Value) {
    let r = candle_core::safetensors::load(
        fixtures().join(format!("wan22_tiny/{name}.safetensors")),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&open(&format!("wan22_tiny/{name}.safetensors")).header.metadata["wan22_tiny"]).unwrap();
    let num = |k: &str| meta[k].as_f64().unwrap_or_else(|| panic!("metadata {k}"));
    let req = candiff::pipelines::wan::T2vRequest {
        prompt: String::new(),
        negative_prompt: String::new(),
        width: num("width") as usize,
        height: num("height") as usize,
        frames: num("num_frames") as usize,
        steps: num("num_inference_steps") as usize,
        guidance: num("guidance_scale"),
        guidance_2: meta.get("guidance_scale_2").and_then(|v| v.as_f64()),
        boundary: None,
        flow_shift: None,
        seed: 0,
        max_sequence_length: r["prompt_embeds"].dim(1).unwrap(),
    };
    (req, r, meta)
}
