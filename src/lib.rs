//! candiff: diffusion inference on Candle, in bf16 and NVFP4.

pub mod cli;
pub mod compare;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cuda_support;
pub mod doctor;
pub mod error;
pub mod hub;
pub mod inspect;
pub mod linear;
pub mod manifest;
pub mod models;
pub mod nvfp4;
pub mod parallel;
pub mod pipelines;
pub mod profile;
pub mod rng;
pub mod safetensors;
pub mod video;

pub use error::CandiffError;
