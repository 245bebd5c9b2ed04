//! FLUX.1: the MMDiT transformer (`FluxTransformer2DModel`), its config, RoPE and sampling helpers.

pub mod config;
pub mod model;
pub mod sampling;
pub mod vae;

pub use config::FluxConfig;
pub use model::{FluxTransformer, Naming};
