//! Wan2.2 text-to-video: transformer (A14B experts, TI2V-5B), causal 3D VAEs, schedulers.

pub mod config;
pub mod scheduler;
pub mod transformer;
pub mod vae;

pub use config::{WanConfig, WanVaeConfig};
pub use transformer::{WanTrace, WanTransformer};
