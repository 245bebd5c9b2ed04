//! FLUX.2 (dev and klein): the transformer (`Flux2Transformer2DModel`), its VAE
//! (`AutoencoderKLFlux2`), the empirical schedule, and latent packing.

pub mod config;
pub mod sampling;
pub mod transformer;
pub mod vae;

pub use config::Flux2Config;
pub use transformer::Flux2Transformer;
