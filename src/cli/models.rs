use clap::Args;

use crate::manifest::Manifest;

#[derive(Debug, Args)]
pub struct ModelsArgs {}

pub fn run(_: &ModelsArgs) -> anyhow::Result<()> {
    for m in Manifest::all()? {
        let d = &m.defaults;
        println!("{:<18} {}", m.name, m.description);
        let tr = m.transformer.as_ref().map(|t| format!(", transformer from {}", t.repo)).unwrap_or_default();
        println!(
            "{:<18} repo {}{tr}; defaults {}x{}, {} steps, guidance {}, {} text tokens",
            "", m.repo, d.width, d.height, d.steps, d.guidance, d.max_sequence_length
        );
    }
    Ok(())
}
