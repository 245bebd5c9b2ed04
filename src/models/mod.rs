//! Model bodies. Each is one struct tree named after its checkpoint's keys, built through
//! [`crate::linear::WeightBuilder`], so bf16 and NVFP4 share the same code.

pub mod attn_fp8;
pub mod conv3d;
pub mod flux;
pub mod flux2;
pub mod fused;
pub mod ops;
pub mod text;
pub mod wan;
