use clap::Args;

use super::Nvfp4ReadArgs;
use crate::inspect::{checkpoints_under, inspect, resolve_target};

#[derive(Debug, Args)]
#[command(
    after_long_help = "Examples:\n  candiff inspect ./flux1-dev-nvfp4/transformer\n  candiff inspect flux2-dev-nvfp4.safetensors\n  candiff inspect black-forest-labs/FLUX.1-dev   (from the local Hugging Face cache)"
)]
pub struct InspectArgs {
    /// A .safetensors file, a model folder, a diffusers repository folder, or `org/name[/subfolder]`
    /// in the local Hugging Face cache.
    pub target: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nvfp4: Nvfp4ReadArgs,
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let root = resolve_target(&args.target)?;
    let mut reports = Vec::new();
    for p in checkpoints_under(&root)? {
        reports.push(inspect(&p, &args.nvfp4.overrides())?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print!("{r}");
        }
    }
    Ok(())
}
