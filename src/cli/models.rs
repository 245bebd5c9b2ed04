use clap::Args;

use crate::manifest::{Family, Manifest};

#[derive(Debug, Args)]
pub struct ModelsArgs {}

pub fn run(_: &ModelsArgs) -> anyhow::Result<()> {
    for m in Manifest::all()? {
        let d = &m.defaults;
        println!("{:<22} {}", m.name, m.description);
        let tr = m.transformer.as_ref().map(|t| format!(", transformer from {}", t.repo)).unwrap_or_default();
        let cmd = match m.family {
            Family::Flux1 | Family::Flux2 => "t2i",
            Family::Wan22 => "t2v",
        };
        let video = match (d.frames, d.fps) {
            (Some(f), Some(fps)) => format!(", {f} frames at {fps} fps"),
            _ => String::new(),
        };
        let g2 = d
            .guidance_2
            .map(|g| format!(" / {g} (low noise, boundary {})", d.boundary.unwrap_or(0.0)))
            .unwrap_or_default();
        println!(
            "{:<22} candiff {cmd}; repo {}{tr}; defaults {}x{}{video}, {} steps, guidance {}{g2}, {} text tokens",
            "", m.repo, d.width, d.height, d.steps, d.guidance, d.max_sequence_length
        );
    }
    Ok(())
}
