//! Model-quality comparison runs (`candiff compare`).

pub mod learned;
pub mod metrics;
pub mod report;
pub mod run;
