#![cfg_attr(not(feature = "cuda"), allow(unused_imports, dead_code))]

use clap::Args;

use crate::doctor::{check_backend, CheckResult, Problem, AGREEMENT_TOL};
use crate::nvfp4::Backend;

#[derive(Debug, Args)]
#[command(
    after_long_help = "Examples:\n  candiff doctor\n  candiff doctor --seed 7 --random-shapes 8 --json report.json"
)]
pub struct DoctorArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Seed of the random shapes and data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fresh random shapes on top of the fixed edge cases.
    #[arg(long, default_value_t = 4)]
    pub random_shapes: usize,
    /// Fixture root holding nvfp4/gemm_cases.* (checked when present).
    #[arg(long, env = "CANDIFF_FIXTURES", default_value = "tests/fixtures")]
    pub fixtures: std::path::PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Prints checks of a run in another configuration, each named with `label`, and keeps them; the
/// number that failed.
fn record_labelled(mut r: Vec<CheckResult>, label: &str, all: &mut Vec<CheckResult>) -> usize {
    for c in &mut r {
        c.what = format!("{} ({label})", c.what);
    }
    let failed = print_results(&r);
    all.extend(r);
    failed
}

fn print_results(results: &[CheckResult]) -> usize {
    let mut failed = 0;
    for r in results {
        if !r.pass {
            failed += 1;
        }
        println!(
            "  {:<4} {:<48} {:>10.3e} (limit {:.1e})",
            if r.pass { "ok" } else { "FAIL" },
            r.what,
            r.value,
            r.limit
        );
    }
    failed
}

pub fn run(args: &DoctorArgs) -> anyhow::Result<()> {
    println!(
        "candiff {} (features: cuda={}, cudnn={})",
        env!("CARGO_PKG_VERSION"),
        crate::cuda_support::HAVE_CUDA_KERNELS,
        crate::cuda_support::HAVE_CUDNN
    );
    #[cfg(not(feature = "cuda"))]
    {
        let _ = args;
        println!("This build has no CUDA support: NVFP4 runs on the CPU reference only.");
        println!("Build with `scripts/setup-cuda.sh && source .toolchain/cuda/env.sh && cargo build --release --features cuda`.");
        Ok(())
    }
    #[cfg(feature = "cuda")]
    {
        use candle_core::Device;
        let device = crate::cuda_support::cuda_device(args.gpu, false)?;
        let Device::Cuda(dev) = &device else { unreachable!() };
        let (name, driver, mem) = crate::cuda::device_info(dev)?;
        let cc = crate::cuda::compute_capability(dev)?;
        println!(
            "GPU {}: {name}, compute capability {}.{}, {:.1} GiB",
            args.gpu,
            cc.0,
            cc.1,
            mem as f64 / (1u64 << 30) as f64
        );
        println!(
            "driver CUDA version {}.{}, built with CUDA {}",
            driver / 1000,
            (driver % 1000) / 10,
            env!("CANDIFF_NVCC_VERSION")
        );
        #[cfg(feature = "cudnn")]
        println!("cuDNN {}", crate::cuda::cudnn::version_string(crate::cuda::cudnn::version()));
        #[cfg(not(feature = "cudnn"))]
        println!("cuDNN: not used by this build (build with --features cudnn for the cudnn variant)");
        println!(
            "FP4 tensor cores: {}",
            if cc.0 >= 10 { "yes (Blackwell)" } else { "no: NVFP4 runs through candiff's dequantizing kernels" }
        );
        let mut runnable = Vec::new();
        for b in Backend::ALL {
            match crate::cuda_support::check_backend(b, &device) {
                Ok(()) => {
                    println!("variant {b:<8} available");
                    runnable.push(b);
                }
                Err(e) => println!("variant {b:<8} unavailable: {e}"),
            }
        }
        let problems = Problem::standard_set(args.seed, args.random_shapes)?;
        let mut all = Vec::new();
        println!("activation quantizer vs CPU reference (bit-exact):");
        let r = crate::doctor::check_activation_quantizer(&device, &problems)?;
        let mut failed = print_results(&r);
        all.extend(r);
        let cases = match crate::doctor::fixture_cases(&args.fixtures) {
            Ok(c) => c,
            Err(e) => {
                println!("golden GEMM cases not checked: {e}");
                Vec::new()
            }
        };
        let mut outputs = Vec::new();
        for b in &runnable {
            if !cases.is_empty() {
                println!("{b} on the golden GEMM cases (max |diff| / max |y|):");
                let r = crate::doctor::check_fixtures(*b, &device, &cases)?;
                failed += print_results(&r);
                all.extend(r);
            }
            println!("{b} vs CPU reference (max |diff| / max |y|):");
            let (r, outs) = check_backend(*b, &device, &problems)?;
            failed += print_results(&r);
            all.extend(r);
            outputs.push((*b, outs));
        }
        if cc.0 == 9 && runnable.contains(&Backend::Trtllm) {
            // Hopper's wgmma GEMM splits a mostly empty last wave along K; planned as for a GPU of
            // 4 multiprocessors, the standard problems take that path too.
            println!("trtllm with the last wave split along K (planned for 4 SMs) vs CPU reference:");
            let (r, split_default) =
                crate::cuda::with_sm90_policy_sms(4, || check_backend(Backend::Trtllm, &device, &problems))?;
            failed += record_labelled(r, "tail split", &mut all);
            // The GEMM's two forms (TMA copies into CTA pairs where the feature blocks pair up,
            // cp.async copies elsewhere) run the same wgmmas in the same order: the very same bits,
            // whole and with the last wave split; so does the TMA form with a few persistent
            // clusters each taking many units (3: uneven shares).
            for (what, ctas, clusters) in crate::cuda::sm90_tma_resident_clusters(&device)? {
                println!("  {what}: {clusters} clusters of {ctas} CTAs resident at once");
            }
            println!(
                "trtllm's Hopper GEMM in other forms vs the default (TMA where it applies), max |diff| / max |y|:"
            );
            let default =
                outputs.iter().find(|(b, _)| *b == Backend::Trtllm).map(|(_, o)| o.clone()).unwrap_or_default();
            use crate::cuda::{
                with_sm90_clusters, with_sm90_form, with_sm90_gemv_form, with_sm90_store, with_sm90_tail,
                with_sm90_tokens, Sm90Clusters, Sm90Form, Sm90GemvForm, Sm90Store, Sm90Tail, Sm90Tokens,
            };
            const FEW_CLUSTERS: usize = 3;
            // (The GEMV's register form, M <= 16: the same mmas in the same order as its default
            // bulk-copy form.)
            // The tile widths between 128 and 256 tokens (TMA form, whole tiles: the plan never
            // splits them) add each token's sums in the same K order: the same bits as the
            // default with every tile whole (the default splits small products along K).
            println!("trtllm with every tile whole vs CPU reference:");
            let (r, whole_default) =
                with_sm90_tail(Sm90Tail::Whole, || check_backend(Backend::Trtllm, &device, &problems))?;
            failed += record_labelled(r, "every tile whole", &mut all);
            // The base plan (without the TMA form's rules: the fill widths, and 256 tokens split
            // along K where the base takes 128), as the cp.async form plans: that form's reference.
            println!("trtllm with the base plan vs CPU reference:");
            let (r, base_default) =
                with_sm90_tokens(Sm90Tokens::NoFill, || check_backend(Backend::Trtllm, &device, &problems))?;
            failed += record_labelled(r, "base plan", &mut all);
            // The same planned for 4 SMs: the cp.async form's reference with the last wave split
            // (the TMA form's default may keep a split last wave's tiles whole at a fill width
            // where that is estimated cheaper; different K sums, so not the same bits).
            println!("trtllm with the base plan, the last wave split (planned for 4 SMs) vs CPU reference:");
            let (r, split_base_default) = with_sm90_tokens(Sm90Tokens::NoFill, || {
                crate::cuda::with_sm90_policy_sms(4, || check_backend(Backend::Trtllm, &device, &problems))
            })?;
            failed += record_labelled(r, "base plan, tail split", &mut all);
            let (fit, tma, bulk, plan) = (Sm90Clusters::Fit, Sm90Store::Tma, Sm90GemvForm::Bulk, Sm90Tokens::Plan);
            let forms = [
                ("cp.async form", Sm90Form::Pipe, fit, tma, bulk, plan),
                ("TMA form in 3 clusters", Sm90Form::Auto, Sm90Clusters::AtMost(FEW_CLUSTERS), tma, bulk, plan),
                ("TMA form, per-element stores", Sm90Form::Auto, fit, Sm90Store::Direct, bulk, plan),
                ("GEMV register form", Sm90Form::Auto, fit, tma, Sm90GemvForm::Reg, plan),
                ("TMA form, 176 tokens per CTA", Sm90Form::Auto, fit, tma, bulk, Sm90Tokens::Forced(176)),
                ("TMA form, 208 tokens per CTA", Sm90Form::Auto, fit, tma, bulk, Sm90Tokens::Forced(208)),
                ("TMA form, 224 tokens per CTA", Sm90Form::Auto, fit, tma, bulk, Sm90Tokens::Forced(224)),
                (
                    "TMA form, 208 tokens per CTA in 3 clusters, per-element stores",
                    Sm90Form::Auto,
                    Sm90Clusters::AtMost(FEW_CLUSTERS),
                    Sm90Store::Direct,
                    bulk,
                    Sm90Tokens::Forced(208),
                ),
            ];
            let mut r = Vec::new();
            for (form, sm90_form, clusters, store, gemv, tokens) in forms {
                // (A forced fill width never splits; where it cannot run, the base width takes
                // over, kept whole too. The other forms plan as the default did.)
                let (labels, whole): (&[_], _) = match (tokens, sm90_form) {
                    (Sm90Tokens::Forced(_), _) => (&[("every tile whole", 0, &whole_default)], true),
                    (_, Sm90Form::Pipe) => {
                        (&[("base plan", 0, &base_default), ("tail split", 4, &split_base_default)], false)
                    }
                    _ => (&[("whole", 0, &default), ("tail split", 4, &split_default)], false),
                };
                for &(label, sms, reference) in labels {
                    let run = || {
                        with_sm90_form(sm90_form, || {
                            with_sm90_clusters(clusters, || {
                                with_sm90_store(store, || {
                                    with_sm90_gemv_form(gemv, || {
                                        with_sm90_tokens(tokens, || {
                                            crate::cuda::with_sm90_policy_sms(sms, || {
                                                check_backend(Backend::Trtllm, &device, &problems)
                                            })
                                        })
                                    })
                                })
                            })
                        })
                    };
                    let (mut checks, outs) = if whole { with_sm90_tail(Sm90Tail::Whole, run)? } else { run()? };
                    for c in &mut checks {
                        c.what = format!("{} ({form}, {label})", c.what);
                    }
                    // (Printed like every other check, so a failure shows in the log, not just the count.)
                    failed += print_results(&checks);
                    all.extend(checks);
                    // (check_backend's outputs: BACKEND_OUTPUTS for W4A16, then for W4A4, per problem.)
                    let cases = problems.iter().flat_map(|p| {
                        ["w4a16", "w4a4"]
                            .into_iter()
                            .flat_map(move |mode| crate::doctor::BACKEND_OUTPUTS.map(|out| (p, mode, out)))
                    });
                    for ((got, want), (p, mode, out)) in outs.iter().zip(reference).zip(cases) {
                        r.push(CheckResult::new(
                            format!("trtllm {mode} {out} {} {form} vs default ({label})", p.label),
                            crate::doctor::rel_max_err(got, want),
                            0.0,
                        ));
                    }
                }
            }
            failed += print_results(&r);
            all.extend(r);
        }
        if cc >= crate::cuda::fp8::MIN_FP8_CAPABILITY {
            println!("fp8 mode (cuBLASLt FP8) vs CPU reference:");
            let r = crate::doctor::check_fp8(&device, &problems)?;
            failed += print_results(&r);
            all.extend(r);
        } else {
            println!("fp8 mode: unavailable (no FP8 tensor cores on this GPU)");
        }
        if outputs.len() > 1 {
            println!("variants against each other (rel L2):");
            let mut r = Vec::new();
            for (b, outs) in &outputs[1..] {
                let worst =
                    // (The f32 outputs: the variants' bf16 roundings may fall apart where their f32 sums do.)
                    outs.iter()
                        .zip(&outputs[0].1)
                        .step_by(crate::doctor::BACKEND_OUTPUTS.len())
                        .map(|(a, o)| crate::doctor::rel_l2(a, o))
                        .fold(0f32, f32::max);
                r.push(CheckResult::new(format!("{b} vs {}", outputs[0].0), worst, AGREEMENT_TOL));
            }
            failed += print_results(&r);
            all.extend(r);
        }
        println!(
            "attention ({:?}; CANDIFF_ATTENTION selects) vs the f32 reference (max |diff| / max |y|):",
            if cfg!(feature = "cudnn") {
                crate::models::ops::attention_impl()
            } else {
                crate::models::ops::AttentionImpl::Reference
            }
        );
        let r = crate::doctor::check_attention(&device)?;
        failed += print_results(&r);
        all.extend(r);
        #[cfg(feature = "cudnn")]
        if let candle_core::Device::Cuda(dev) = &device {
            if crate::cuda::compute_capability(dev)? >= (9, 0) {
                println!("fp8 attention (--attention fp8) vs its CPU emulation and exact attention:");
                let r = crate::doctor::check_attention_fp8(&device)?;
                failed += print_results(&r);
                all.extend(r);
            } else {
                println!("fp8 attention: unavailable (cuDNN's FP8 attention needs compute capability 9.0 or newer)");
            }
        }
        println!("fused element-wise kernels vs their CPU reference (max |diff| / max |y|):");
        let r = crate::doctor::check_fused(&device)?;
        failed += print_results(&r);
        all.extend(r);
        println!("sequence-parallel exchange kernels vs the CPU composition (ranks sharing the GPU; exact):");
        let r = crate::doctor::check_exchange(&device)?;
        failed += print_results(&r);
        all.extend(r);
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_string_pretty(&all)?)?;
        }
        println!("{} passed, {} failed", all.len() - failed, failed);
        if failed > 0 {
            anyhow::bail!("{failed} GPU checks failed");
        }
        Ok(())
    }
}
