//! Text encoders, wrapping candle-transformers' implementations where they match the references.

pub mod clip;
pub mod llm;
pub mod t5;
pub mod umt5;
