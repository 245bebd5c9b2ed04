//! End-to-end pipelines: text encoders, transformer, sampler, VAE.

pub mod flux;
