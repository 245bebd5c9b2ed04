use clap::Args;

use super::Nvfp4ReadArgs;
use crate::inspect::{checkpoints_under, inspect, report, resolve_target, HeaderSet, Target};

#[derive(Debug, Args)]
#[command(
    after_long_help = "Examples:\n  candiff inspect ./flux1-dev-nvfp4/transformer\n  candiff inspect flux2-dev-nvfp4.safetensors\n  candiff inspect black-forest-labs/FLUX.1-dev   (from the local Hugging Face cache)"
)]
pub struct InspectArgs {
    /// A .safetensors file, a model folder, a diffusers repository folder, or a Hub repository
    /// `org/name[/subfolder]` (from the local cache if present, else only headers and configs are
    /// fetched, with HF_TOKEN if set).
    pub target: String,
    /// Revision (branch, tag or commit) of a Hub repository.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub nvfp4: Nvfp4ReadArgs,
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let overrides = args.nvfp4.overrides();
    let mut reports = Vec::new();
    match resolve_target(&args.target, &args.revision)? {
        Target::Local(root) => {
            for p in checkpoints_under(&root)? {
                reports.push(inspect(&p, &overrides)?);
            }
        }
        Target::Remote { repo, subfolder, revision } => {
            for set in HeaderSet::remote(&repo, &subfolder, &revision)? {
                reports.push(report(&set, &overrides)?);
            }
        }
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
