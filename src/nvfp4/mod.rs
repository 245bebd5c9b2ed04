//! NVFP4: 4-bit E2M1 values with one E4M3 scale per 16 elements and a per-tensor f32 scale.

pub mod checkpoint;
pub mod config;
pub mod format;
pub mod fp8;
pub mod layout;
pub mod linear;
pub mod phases;
pub mod quant;
pub mod tiling;

pub use checkpoint::Checkpoint;
pub use config::{Nvfp4Plan, Overrides, ScaleLayout};
pub use format::NibbleOrder;
pub use layout::{LayoutKind, Nvfp4Weight, PreparedLayout};
pub use linear::{ActMode, Backend, Nvfp4Linear};
