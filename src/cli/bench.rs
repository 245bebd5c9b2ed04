use candle_core::Device;
use clap::{Args, Subcommand};

use crate::parallel::{Group, Plan};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// NVFP4 GEMM variants next to cuBLAS bf16 at FLUX / Wan shapes, measured in the same run.
    Gemm(GemmArgs),
    /// One denoising step of a full-size FLUX.1-dev transformer with random weights.
    FluxStep(FluxStepArgs),
    /// One transformer call of a full-size Wan2.2 model (A14B expert or TI2V-5B), random weights.
    WanStep(WanStepArgs),
    /// A full-size Wan VAE decode with random weights (time and peak memory).
    WanDecode(WanDecodeArgs),
    /// Attention (`ops::attention`: cuDNN's fused kernel where it applies) at FLUX / Wan sizes.
    Attention(AttentionArgs),
    /// Each non-GEMM op of a FLUX block alone at full size (where a step's time goes besides the
    /// GEMMs and attention), with the count per step.
    Ops(OpsArgs),
    /// All-to-all bandwidth between GPUs over NCCL (what the sequence-parallel exchanges get),
    /// for each GPU count and piece size; NCCL's environment variables apply.
    Exchange(ExchangeArgs),
}

#[derive(Debug, Args)]
pub struct ExchangeArgs {
    /// GPU counts.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    pub gpus: Vec<usize>,
    /// Bytes sent to each peer per all-to-all, in MiB (FLUX.1 1024² on 2 GPUs sends ~20).
    #[arg(long, value_delimiter = ',', default_value = "4,20,64")]
    pub mib: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Also time exchanges whose bytes per peer go in this many pieces (a FLUX q/k/v exchange
    /// sends 6 per peer: q, k, v x text, image), with and without the rank's own piece (which
    /// NCCL copies like a peer's): what each transfer and each piece cost beyond the bytes.
    #[arg(long, value_delimiter = ',')]
    pub pieces: Vec<usize>,
}

#[derive(Debug, Args)]
pub struct OpsArgs {
    /// Image + text tokens (FLUX 1024²: 4096 + 512).
    #[arg(long, default_value_t = 4608)]
    pub tokens: usize,
    #[arg(long, default_value_t = 24)]
    pub heads: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
#[command(after_long_help = "Example:\n  candiff bench attention --shapes 24x4608,24x27280,40x32760")]
pub struct AttentionArgs {
    /// HEADSxTOKENS (batch 1, head dim --head-dim, self-attention).
    #[arg(long, value_delimiter = ',', default_value = "24x4608,24x27280,40x32760")]
    pub shapes: Vec<String>,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Also time FP8 attention (`--attention fp8`: the quantization passes included) and its
    /// error against the bf16 kernel.
    #[arg(long)]
    pub fp8: bool,
    /// Hold every timed call's output until the loop ends, so no tensor is freed between the
    /// kernels. Candle frees a dropped output with `cuMemFreeAsync` on the stream, which costs an
    /// H200 ~1.3 us of GPU time between short kernels and 5-8 us after a 400 us attention kernel
    /// (docs/PERF.md, session 36). A diagnostic: models free as they go.
    #[arg(long)]
    pub keep_outputs: bool,
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
#[command(after_long_help = "Examples:
  candiff bench wan-step --model a14b --width 832 --height 480 --frames 81
  candiff bench wan-step --model ti2v-5b --width 1280 --height 704 --frames 121 --variants bf16,nvfp4:trtllm:w4a16")]
pub struct WanStepArgs {
    /// `a14b` (one expert) or `ti2v-5b`.
    #[arg(long, default_value = "ti2v-5b")]
    pub model: String,
    /// `bf16` or `nvfp4:<backend>:<mode>` (every linear of the blocks NVFP4).
    #[arg(long, value_delimiter = ',', default_value = "bf16,nvfp4:trtllm:w4a16")]
    pub variants: Vec<String>,
    #[arg(long, default_value_t = 1280)]
    pub width: usize,
    #[arg(long, default_value_t = 704)]
    pub height: usize,
    #[arg(long, default_value_t = 121)]
    pub frames: usize,
    /// UMT5 tokens.
    #[arg(long, default_value_t = 512)]
    pub txt_tokens: usize,
    #[arg(long, default_value_t = 2)]
    pub iters: usize,
    /// GPU counts to run a guided step (conditional + unconditional call) on, e.g. `1,2,4`:
    /// step time, scaling and the output's distance from the 1-GPU one (needs `nccl`).
    #[arg(long, value_delimiter = ',')]
    pub gpus: Vec<usize>,
    /// With --gpus: run the ranks on GPU 0 together (in-process exchange) instead of one per
    /// GPU: checks the sharded outputs where fewer GPUs exist; the times are not a scaling measure.
    /// All ranks enqueue to one stream, so with --baseline-row-split N the outputs must equal the
    /// baseline's exactly.
    #[arg(long)]
    pub shared: bool,
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// One GPU: write each variant's output (f32, little-endian) to DIR/<variant>.f32, for
    /// comparing runs under different settings (`--against`).
    #[arg(long, value_name = "DIR")]
    pub save: Option<std::path::PathBuf>,
    /// One GPU: the rel. L2 distance of each variant's output from DIR/<variant>.f32 (written by
    /// `--save` in an earlier run with the same shapes).
    #[arg(long, value_name = "DIR")]
    pub against: Option<std::path::PathBuf>,
    /// Mark the timed calls as the range a profiler started with `--profile-from-start off`
    /// collects (e.g. `ncu --profile-from-start off --metrics gpu__time_duration.sum`; summed per
    /// kernel by scripts/ncu_kernel_table.py).
    #[arg(long)]
    pub profiler_range: bool,
}

#[derive(Debug, Args)]
#[command(after_long_help = "Example:\n  candiff bench wan-decode --vae wan22 --width 1280 --height 704 --frames 121")]
pub struct WanDecodeArgs {
    /// `wan22` (TI2V-5B's, z 48, 16x) or `wan21` (A14B's, z 16, 8x).
    #[arg(long, default_value = "wan22")]
    pub vae: String,
    #[arg(long, default_value_t = 1280)]
    pub width: usize,
    #[arg(long, default_value_t = 704)]
    pub height: usize,
    #[arg(long, default_value_t = 121)]
    pub frames: usize,
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    after_long_help = "Examples:\n  candiff bench flux-step --variants bf16,nvfp4:trtllm:w4a16 --width 1024 --height 1024\n  candiff bench flux-step --model flux.2-dev --variants nvfp4:trtllm:w4a16"
)]
pub struct FluxStepArgs {
    /// `flux.1-dev`, `flux.2-dev`, `flux.2-klein-4b` or `flux.2-klein-9b` (full-size configs,
    /// random weights).
    #[arg(long, default_value = "flux.1-dev")]
    pub model: String,
    /// `bf16` or `nvfp4:<backend>:<mode>` (every linear of the blocks NVFP4, as in the ModelOpt exports).
    #[arg(long, value_delimiter = ',', default_value = "bf16,nvfp4:trtllm:w4a16")]
    pub variants: Vec<String>,
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Text tokens (512 for FLUX.1-dev's T5 and FLUX.2's encoders).
    #[arg(long, default_value_t = 512)]
    pub txt_tokens: usize,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// GPU counts to run the step on, e.g. `1,2,4`: step time, scaling and the
    /// output's distance from the 1-GPU one (needs `nccl`).
    #[arg(long, value_delimiter = ',')]
    pub gpus: Vec<usize>,
    /// With --gpus: the 1-GPU baseline runs every dense linear on this many token blocks
    /// separately (the GEMM shapes the ranks of that many GPUs see), so the distance to the
    /// sharded output shows what the exchange adds beyond shape-dependent GEMM rounding.
    #[arg(long, default_value_t = 1)]
    pub baseline_row_split: usize,
    /// With --gpus: run the ranks on GPU 0 together (in-process exchange) instead of one per
    /// GPU: checks the sharded outputs where fewer GPUs exist; the times are not a scaling measure.
    /// All ranks enqueue to one stream, so with --baseline-row-split N the outputs must equal the
    /// baseline's exactly.
    #[arg(long)]
    pub shared: bool,
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// One GPU: write each variant's output (f32, little-endian) to DIR/<variant>.f32, for
    /// comparing runs under different settings (`--against`).
    #[arg(long, value_name = "DIR")]
    pub save: Option<std::path::PathBuf>,
    /// One GPU: the rel. L2 distance of each variant's output from DIR/<variant>.f32 (written by
    /// `--save` in an earlier run with the same shapes).
    #[arg(long, value_name = "DIR")]
    pub against: Option<std::path::PathBuf>,
    /// Mark the timed calls as the range a profiler started with `--profile-from-start off`
    /// collects (e.g. `ncu --profile-from-start off --metrics gpu__time_duration.sum`; summed per
    /// kernel by scripts/ncu_kernel_table.py).
    #[arg(long)]
    pub profiler_range: bool,
    /// One GPU: also time the step replayed as a CUDA graph (captured once), next to the plain
    /// one: what launching each kernel from the host costs the step.
    #[arg(long)]
    pub graph: bool,
}

#[derive(Debug, Args)]
#[command(
    after_long_help = "Example:\n  candiff bench gemm --m 1,16,256,4608 --shapes 3072x3072,3072x12288 --out gemm.json"
)]
pub struct GemmArgs {
    /// Rows of the activation (tokens).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256,4608")]
    pub m: Vec<usize>,
    /// Weight shapes as KxN.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "3072x3072,3072x12288,12288x3072,3072x21504,15360x3072,5120x13824"
    )]
    pub shapes: Vec<String>,
    /// Minimum measured time per entry, in milliseconds. From ~1000 the card runs at its power
    /// limit as in a model's run (on an H200 cuBLAS bf16 takes ~20% longer there, docs/PERF.md
    /// session 35); short entries measure a burst.
    #[arg(long, default_value_t = 200)]
    pub min_ms: u64,
    /// NVFP4 runs next to cuBLAS as `<backend>:<mode>` (`trtllm:w4a16`, `cutlass:w4a4`,
    /// `trtllm:fp8`, ...); every backend of this build in both modes, and fp8, when not given.
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Time calls in a chain instead, as a model's projections run with the host ahead of the
    /// GPU: per call of a CUDA graph of back-to-back calls on distinct copies of the layer
    /// (together larger than the L2 cache), GPU time between two events. Small products are
    /// measured there without the host's launch cost, and without a profiler.
    #[arg(long)]
    pub chain: bool,
    /// Where the Hopper W4A16 GEMM's time goes, per product: the phase marks of one launch (set-up,
    /// fill, main loop, sums or store, waits on the copies, SMs idle at the end). Profiling builds
    /// only (`--features sm90-phases`), `trtllm:w4a16` only; the marks cost the kernel a few
    /// instructions per K tile, so no times against cuBLAS are printed.
    #[arg(long)]
    pub phases: bool,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.what {
        BenchWhat::Gemm(g) => gemm(g),
        BenchWhat::FluxStep(f) => flux_step(f),
        BenchWhat::WanStep(w) => wan_step(w),
        BenchWhat::WanDecode(w) => wan_decode(w),
        BenchWhat::Attention(a) => attention(a),
        BenchWhat::Ops(o) => ops(o),
        BenchWhat::Exchange(e) => exchange(e),
    }
}

/// Parses `bf16` / `nvfp4:<backend>:<mode>` (fp8 optionally `+fastacc`) into (NVFP4 module
/// paths, options).
fn variant(v: &str, nvfp4_paths: &str) -> anyhow::Result<(Vec<String>, crate::linear::Nvfp4Options)> {
    use crate::compare::run::{Variant, VariantKind};
    let parsed = Variant::parse(v)?;
    anyhow::ensure!(
        !parsed.fp8_attention,
        "variant `{v}`: the step benches take FP8 attention from CANDIFF_ATTENTION=fp8, not +fp8attn"
    );
    let paths = match parsed.kind {
        VariantKind::Bf16 => Vec::new(),
        VariantKind::Nvfp4 { .. } => vec![nvfp4_paths.to_string()],
    };
    Ok((paths, parsed.nvfp4_options()))
}

/// Guidance of the benchmarked Wan step (any value > 1: both branches run).
const WAN_BENCH_GUIDANCE: f64 = 5.0;

/// One step of a benchmarked model, built on a rank.
type Step = Box<dyn Fn() -> candle_core::Result<candle_core::Tensor>>;

/// Bytes of each all-to-all piece of the bandwidth probe.
const PROBE_BYTES: usize = 64 << 20;
const PROBE_ITERS: usize = 5;

fn exchange(a: &ExchangeArgs) -> anyhow::Result<()> {
    use crate::parallel::{launch, Placement, DEFAULT_TIMEOUT};
    for &n in &a.gpus {
        anyhow::ensure!(n >= 2, "--gpus counts must be at least 2 (an exchange needs peers)");
        let rates = launch(&Placement::Gpus(n), DEFAULT_TIMEOUT, |rank| {
            a.mib
                .iter()
                .map(|&m| probe(&rank.world, &rank.device, m << 20, a.iters))
                .collect::<candle_core::Result<Vec<_>>>()
        })?;
        for (i, m) in a.mib.iter().enumerate() {
            let worst = rates.iter().map(|r| r[i]).fold(f64::INFINITY, f64::min);
            println!("{n} GPUs, all-to-all of {m} MiB pieces: {:.1} GB/s sent per rank (slowest rank)", worst / 1e9);
        }
        if a.pieces.is_empty() {
            continue;
        }
        let cases: Vec<(usize, usize, bool)> =
            a.mib.iter().flat_map(|&m| a.pieces.iter().flat_map(move |&k| [(m, k, true), (m, k, false)])).collect();
        let times = launch(&Placement::Gpus(n), DEFAULT_TIMEOUT, |rank| {
            cases
                .iter()
                .map(|&(m, k, own)| probe_pieces(&rank.world, &rank.device, m << 20, k, own, a.iters))
                .collect::<candle_core::Result<Vec<_>>>()
        })?;
        for (i, (m, k, own)) in cases.iter().enumerate() {
            let worst = times.iter().map(|t| t[i]).fold(0f64, f64::max);
            println!(
                "{n} GPUs, {m} MiB per peer in {k} piece(s), own piece {}: {:.1} us per exchange ({:.1} GB/s sent per rank, slowest rank)",
                if *own { "copied" } else { "skipped" },
                worst * 1e6,
                ((m << 20) * (n - 1)) as f64 / worst / 1e9
            );
        }
    }
    Ok(())
}

/// Seconds per exchange of `bytes` per peer, each peer's bytes in `pieces` sends and receives,
/// the rank's own bytes copied through the transport too or not (`own`), started and waited for
/// one after another as a step's attentions do.
fn probe_pieces(
    world: &crate::parallel::Group,
    device: &candle_core::Device,
    bytes: usize,
    pieces: usize,
    own: bool,
    iters: usize,
) -> candle_core::Result<f64> {
    let (n, me, iters, pieces) = (world.size(), world.index(), iters.max(1), pieces.max(1));
    let per = bytes / 2 / pieces;
    let elems = per * pieces;
    let send = candle_core::Tensor::zeros(n * elems, candle_core::DType::BF16, device)?;
    let peers: Vec<usize> = (0..n).filter(|&m| own || m != me).collect();
    let run = |base: usize, on: bool| -> Vec<crate::parallel::Span> {
        if on {
            (0..pieces).map(|k| (base + k * per, per)).collect()
        } else {
            Vec::new()
        }
    };
    let sends: Vec<_> = (0..n).map(|m| run(m * elems, own || m != me)).collect();
    let recvs: Vec<_> = (0..n)
        .map(|p| match peers.iter().position(|&q| q == p) {
            Some(j) => run(j * elems, true),
            None => Vec::new(),
        })
        .collect();
    let recv_len = peers.len() * elems;
    let once = || -> candle_core::Result<()> {
        let (_, pending) = world.exchange_start(&send, &sends, recv_len, &recvs)?;
        pending.wait()
    };
    once()?;
    world.fence()?;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        once()?;
    }
    world.fence()?;
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

/// Bytes each rank sends per second in an all-to-all of `PROBE_BYTES` pieces (what the
/// sequence-parallel exchanges can expect on this machine's GPU links).
fn probe_bandwidth(world: &crate::parallel::Group, device: &candle_core::Device) -> candle_core::Result<f64> {
    probe(world, device, PROBE_BYTES, PROBE_ITERS)
}

/// Bytes each rank sends per second in all-to-alls of `bytes` per peer: the exchange alone, one
/// send buffer made beforehand (as the q/k/v writers fill it in a step).
fn probe(
    world: &crate::parallel::Group,
    device: &candle_core::Device,
    bytes: usize,
    iters: usize,
) -> candle_core::Result<f64> {
    let iters = iters.max(1);
    let n = world.size();
    let elems = bytes / 2;
    let send = candle_core::Tensor::zeros(n * elems, candle_core::DType::BF16, device)?;
    let counts = vec![elems; n];
    world.all_to_all_flat(&send, &counts, &counts)?;
    world.fence()?;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        world.all_to_all_flat(&send, &counts, &counts)?;
    }
    world.fence()?;
    Ok((elems * 2 * (n - 1) * iters) as f64 / t0.elapsed().as_secs_f64())
}

/// Normal(0, 1) data drawn on the host from `seed` (the same on every device).
fn host_randn(
    shape: &[usize],
    seed: u64,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> candle_core::Result<candle_core::Tensor> {
    let mut rng = crate::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?.to_dtype(dtype)?.to_device(device)
}

/// A step on 1, 2, ... GPUs (`make` builds it on a rank: the same weights and inputs everywhere):
/// time per step, speed-up and efficiency against 1 GPU, and the output's relative L2 distance
/// from the 1-GPU output. The first entry of `gpus` is the baseline (normally 1).
#[allow(clippy::too_many_arguments)]
fn scaling(
    what: &str,
    variant: &str,
    gpus: &[usize],
    shared: bool,
    iters: usize,
    baseline_row_split: usize,
    make: impl Fn(&candle_core::Device, Option<&crate::parallel::Group>) -> candle_core::Result<Step> + Sync,
) -> anyhow::Result<Vec<serde_json::Value>> {
    use std::time::Instant;

    use crate::parallel::{launch, Placement, DEFAULT_TIMEOUT};

    let time = |step: &Step,
                fence: &dyn Fn() -> candle_core::Result<()>,
                rank: usize,
                device: &candle_core::Device|
     -> candle_core::Result<(f64, Vec<f32>)> {
        let t0 = Instant::now();
        let out = step()?;
        fence()?;
        log::info!("first step (warm-up) in {:.1}s", t0.elapsed().as_secs_f64());
        let out: Vec<f32> = out.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        // Warm-up excluded from the breakdown (CANDIFF_PROFILE=1).
        let _ = crate::profile::take(device)?;
        let (ms, host_ms) = timed(device, iters.max(1), false, || step().map(|_| ()), fence)?;
        log::info!("host enqueue {host_ms:.1} ms/step of {ms:.1}");
        if let Some(prof) = crate::profile::take(device)? {
            let per: Vec<f64> = prof.parts.iter().map(|x| x / iters.max(1) as f64).collect();
            println!(
                "  rank {rank}: per step {ms:.1} ms on the GPU stream: linear {:.1}, attention {:.1}, exchange kernels {:.1}, exchange waits {:.1} (q/k/v in {:.1}, output back {:.1}), rest {:.1} (CANDIFF_PROFILE)",
                per[0],
                per[1],
                per[2],
                per[3] + per[4],
                per[3],
                per[4],
                ms - per.iter().sum::<f64>()
            );
            for (label, count, total) in &prof.transfers {
                let it = iters.max(1) as f64;
                println!(
                    "  rank {rank}: transfers '{label}' {:.0} per step, {:.1} ms per step on the communication stream ({:.3} ms each, a late peer included)",
                    *count as f64 / it,
                    total / it,
                    total / *count as f64
                );
            }
            if let Some(path) = crate::profile::write_timeline(rank)? {
                println!("  rank {rank}: timeline of the {iters} measured steps in {path}");
            }
        }
        Ok((ms, out))
    };
    let mut base: Option<(usize, f64, Vec<f32>)> = None;
    let mut rows = Vec::new();
    for &n in gpus {
        let mut bandwidth: Option<f64> = None;
        anyhow::ensure!(n >= 1, "--gpus counts must be at least 1");
        let (ms, out) = if n == 1 {
            let device = crate::cuda_support::cuda_device(0, false)?;
            let step = make(&device, None)?;
            if baseline_row_split > 1 {
                println!("  1-GPU baseline: dense linears on {baseline_row_split} token blocks each");
            }
            crate::linear::with_gemm_row_split(baseline_row_split, || {
                time(&step, &|| device.synchronize(), 0, &device)
            })?
        } else if n == 0 {
            anyhow::bail!("--gpus counts must be at least 1")
        } else {
            let placement = if shared {
                Placement::Shared(n, crate::cuda_support::cuda_device(0, false)?)
            } else {
                Placement::Gpus(n)
            };
            let mut all = launch(&placement, DEFAULT_TIMEOUT, |rank| {
                let t0 = Instant::now();
                let step = make(&rank.device, Some(&rank.world))?;
                log::info!("rank {} of {n}: built in {:.1}s", rank.index(), t0.elapsed().as_secs_f64());
                let bw = probe_bandwidth(&rank.world, &rank.device)?;
                // The exchange's fence covers communication; ranks sharing a GPU in one process
                // (in-process hand-over) also need the device's queue drained to time a step.
                let fence = || {
                    rank.world.fence()?;
                    rank.device.synchronize()
                };
                let (ms, out) = time(&step, &fence, rank.index(), &rank.device)?;
                log::debug!("rank {} of {n}: timed", rank.index());
                Ok((ms, out, bw))
            })?;
            log::debug!("all {n} ranks returned");
            let (ms, out, bw) = all.swap_remove(0);
            println!("  {n} ranks: all-to-all of {} MiB pieces, {:.1} GB/s sent per rank", PROBE_BYTES >> 20, bw / 1e9);
            bandwidth = Some(bw);
            (ms, out)
        };
        let (speedup, eff, rel) = match &base {
            Some((n0, ms0, out0)) => {
                let s = ms0 / ms;
                (Some(s), Some(s * *n0 as f64 / n as f64), Some(crate::doctor::rel_l2(&out, out0)))
            }
            None => (None, None, None),
        };
        let unit = match (n, shared) {
            (1, _) => "1 GPU ".to_string(),
            (_, true) => format!("{n} ranks on 1 GPU"),
            _ => format!("{n} GPUs"),
        };
        println!(
            "{what} {variant:<22} {unit} {ms:>9.1} ms/step{}",
            match (speedup, eff, rel) {
                (Some(s), Some(e), Some(r)) => format!(
                    "  speed-up {s:.2}x, efficiency {:.0}%, rel. L2 vs {} GPU {r:.2e}",
                    e * 100.0,
                    base.as_ref().map(|b| b.0).unwrap_or(1)
                ),
                _ => String::new(),
            }
        );
        rows.push(serde_json::json!({"what": what, "variant": variant, "ranks": n, "shared_gpu": shared && n > 1, "ms_per_step": ms,
            "speedup": speedup, "efficiency": eff, "rel_l2_vs_base": rel, "all_to_all_bytes_per_s": bandwidth}));
        if base.is_none() {
            base = Some((n, ms, out));
        }
    }
    Ok(rows)
}

/// The full-size FLUX.2 config behind a `--model` name.
fn flux2_config(name: &str) -> anyhow::Result<crate::models::flux2::Flux2Config> {
    use crate::models::flux2::Flux2Config;
    Ok(match name {
        "flux.2-dev" => Flux2Config::default(),
        "flux.2-klein-4b" => Flux2Config::klein_4b(),
        "flux.2-klein-9b" => Flux2Config::klein_9b(),
        other => anyhow::bail!("unknown --model {other} (flux.1-dev, flux.2-dev, flux.2-klein-4b, flux.2-klein-9b)"),
    })
}

fn gib(b: Option<usize>) -> String {
    b.map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_else(|| "n/a".into())
}

/// Milliseconds per run of `iters` back-to-back runs of `run` (queued without waiting, then one
/// `fence`), and the host's time per run to queue them: near the first, the GPU waits on the host.
/// With `profiler_range`, the runs are the range `ncu --profile-from-start off` collects.
fn timed(
    device: &Device,
    iters: usize,
    profiler_range: bool,
    run: impl Fn() -> candle_core::Result<()>,
    fence: &dyn Fn() -> candle_core::Result<()>,
) -> candle_core::Result<(f64, f64)> {
    let t = std::time::Instant::now();
    let _range = crate::profile::profiler_range(profiler_range, device)?;
    for _ in 0..iters {
        run()?;
    }
    let queued_ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
    fence()?;
    Ok((t.elapsed().as_secs_f64() * 1e3 / iters as f64, queued_ms))
}

/// Milliseconds per step replayed as a CUDA graph (at least `iters` replays), and the rel. L2
/// distance of the last replay's output (copied by the graph into a buffer of its own) from a
/// plain step's.
#[cfg(feature = "cuda")]
fn step_graph_ms(
    device: &Device,
    iters: usize,
    step: &dyn Fn() -> candle_core::Result<candle_core::Tensor>,
) -> anyhow::Result<(f64, f32)> {
    let want = step()?;
    let out = want.zeros_like()?;
    let body = || out.slice_set(&step()?.contiguous()?, 0, 0);
    let ms = graph_seconds(device, 0, iters, &body)? * 1e3;
    let host = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>();
    Ok((ms, crate::doctor::rel_l2(&host(&out)?, &host(&want)?)))
}

#[cfg(not(feature = "cuda"))]
fn step_graph_ms(
    _: &Device,
    _: usize,
    _: &dyn Fn() -> candle_core::Result<candle_core::Tensor>,
) -> anyhow::Result<(f64, f32)> {
    anyhow::bail!("--graph times CUDA graphs: build with --features cuda (see README)")
}

fn wan_step(a: &WanStepArgs) -> anyhow::Result<()> {
    use std::time::Instant;

    use candle_core::{DType, Tensor};

    use crate::linear::WeightBuilder;
    use crate::models::wan::{WanConfig, WanTransformer};

    let (cfg, spatial) = match a.model.as_str() {
        "a14b" => (WanConfig::a14b(), 8),
        "ti2v-5b" => (WanConfig::ti2v_5b(), 16),
        o => anyhow::bail!("unknown --model `{o}` (a14b or ti2v-5b)"),
    };
    anyhow::ensure!((a.frames - 1).is_multiple_of(4), "--frames must be 4k+1");
    let (f, h, w) = ((a.frames - 1) / 4 + 1, a.height / spatial, a.width / spatial);
    if !a.gpus.is_empty() {
        let what = format!("wan {} {}x{}x{} guided step", a.model, a.width, a.height, a.frames);
        let mut rows = Vec::new();
        for v in &a.variants {
            let (paths, opts) = variant(v, "blocks.")?;
            let make = |device: &Device, world: Option<&Group>| -> candle_core::Result<Step> {
                let wb = WeightBuilder::synthetic(DType::BF16, device, paths.clone(), opts);
                let model = WanTransformer::new(&cfg, &wb)?;
                let x = host_randn(&[1, cfg.in_channels, f, h, w], 1, device, DType::F32)?;
                let cond = host_randn(&[1, a.txt_tokens, cfg.text_dim], 2, device, DType::BF16)?;
                let uncond = host_randn(&[1, a.txt_tokens, cfg.text_dim], 3, device, DType::BF16)?;
                let t = Tensor::new(&[900f32], device)?;
                let plan = Plan::of(world, cfg.num_attention_heads, true)?;
                Ok(Box::new(move || {
                    let (c, u) = plan.guided(true, |b| {
                        model.forward_sharded(
                            &x,
                            &t,
                            if b == 0 { &cond } else { &uncond },
                            DType::BF16,
                            plan.sp.as_ref(),
                        )
                    })?;
                    let u = u.expect("guided");
                    &u + ((c - &u)? * WAN_BENCH_GUIDANCE)?
                }))
            };
            rows.extend(scaling(&what, v, &a.gpus, a.shared, a.iters, 1, make)?);
        }
        if let Some(out) = &a.out {
            std::fs::write(out, serde_json::to_string_pretty(&rows)?)?;
        }
        return Ok(());
    }
    let device = super::t2i::parse_device(Some(&a.device))?;
    let x = Tensor::randn(0f32, 1.0, (1, cfg.in_channels, f, h, w), &device)?;
    let ctx = Tensor::randn(0f32, 1.0, (1, a.txt_tokens, cfg.text_dim), &device)?.to_dtype(DType::BF16)?;
    let t = Tensor::new(&[900f32], &device)?;
    let tokens = f * (h / 2) * (w / 2);
    let mut rows = Vec::new();
    let mut outputs = StepOutputs::new(&a.variants, a.save.as_deref(), a.against.as_deref());
    for v in &a.variants {
        let (paths, opts) = variant(v, "blocks.")?;
        let t0 = Instant::now();
        let wb = WeightBuilder::synthetic(DType::BF16, &device, paths, opts);
        let model = WanTransformer::new(&cfg, &wb)?;
        device.synchronize()?;
        let build_s = t0.elapsed().as_secs_f64();
        let step = || model.forward(&x, &t, &ctx, DType::BF16);
        step()?;
        device.synchronize()?;
        // Warm-up excluded from the breakdown (CANDIFF_PROFILE=1).
        let _ = crate::profile::take(&device)?;
        let (ms, queued_ms) =
            timed(&device, a.iters, a.profiler_range, || step().map(|_| ()), &|| device.synchronize())?;
        let mem = crate::pipelines::gpu_used(&device);
        println!(
            "wan {} {v:<22} {ms:>9.1} ms/call  ({}x{}x{} frames = {tokens} tokens, {} txt; built in {build_s:.1}s; GPU in use {})",
            a.model, a.width, a.height, a.frames, a.txt_tokens, gib(mem)
        );
        if let Some(prof) = crate::profile::take(&device)? {
            let per: Vec<f64> = prof.parts.iter().map(|x| x / a.iters as f64).collect();
            println!(
                "  per call on the GPU stream: linear {:.1}, attention {:.1}, rest {:.1} ms (CANDIFF_PROFILE); host queued a call in {queued_ms:.1} ms",
                per[0],
                per[1],
                ms - per.iter().sum::<f64>()
            );
        }
        let mut row = serde_json::json!({"model": a.model, "variant": v, "ms_per_call": ms, "width": a.width,
            "height": a.height, "frames": a.frames, "tokens": tokens, "txt_tokens": a.txt_tokens});
        outputs.record(v, &mut row, step)?;
        rows.push(row);
        drop(model);
    }
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

/// What the one-GPU step benches do with each variant's output: `--save DIR` writes it to
/// `DIR/<variant>.f32` (f32, little-endian), `--against DIR` prints its rel. L2 distance from that
/// file, and every later variant of the first one's weight kind is compared with the first.
/// Synthetic NVFP4 layers draw their own codes (not the bf16 weights quantized), so only variants
/// of one kind compare: NVFP4 against NVFP4 (e.g. fp8 against fp8+fastacc), bf16 against bf16.
struct StepOutputs<'a> {
    save: Option<&'a std::path::Path>,
    against: Option<&'a std::path::Path>,
    compare_first: bool,
    first: Option<(String, Vec<f32>)>,
}

impl<'a> StepOutputs<'a> {
    fn new(variants: &[String], save: Option<&'a std::path::Path>, against: Option<&'a std::path::Path>) -> Self {
        let compare_first = variants.iter().skip(1).any(|v| is_nvfp4(v) == is_nvfp4(&variants[0]));
        Self { save, against, compare_first, first: None }
    }

    /// Runs `step` once more for its output when anything needs it; results go into `row`.
    fn record(
        &mut self,
        variant: &str,
        row: &mut serde_json::Value,
        step: impl Fn() -> candle_core::Result<candle_core::Tensor>,
    ) -> anyhow::Result<()> {
        if self.save.is_none() && self.against.is_none() && !self.compare_first {
            return Ok(());
        }
        let out: Vec<f32> = step()?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let file = format!("{}.f32", variant.replace(':', "-"));
        if let Some(dir) = self.save {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(&file), out.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
        }
        if let Some(dir) = self.against {
            let path = dir.join(&file);
            let bytes =
                std::fs::read(&path).map_err(|e| anyhow::anyhow!("--against: reading {}: {e}", path.display()))?;
            let other: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            anyhow::ensure!(
                other.len() == out.len(),
                "{}: {} values, this run {} (same shapes expected)",
                path.display(),
                other.len(),
                out.len()
            );
            let d = crate::doctor::rel_l2(&out, &other);
            println!("  rel. L2 vs {}: {d:.3e}", path.display());
            row["rel_l2_vs_saved"] = serde_json::json!(d);
        }
        match &self.first {
            Some((name, base)) if is_nvfp4(name) == is_nvfp4(variant) => {
                let d = crate::doctor::rel_l2(&out, base);
                println!("  rel. L2 vs {name}: {d:.3e}");
                row["rel_l2_vs_first"] = serde_json::json!(d);
            }
            Some(_) => {}
            None if self.compare_first => self.first = Some((variant.to_string(), out)),
            None => {}
        }
        Ok(())
    }
}

fn is_nvfp4(variant: &str) -> bool {
    variant.starts_with("nvfp4")
}

fn wan_decode(a: &WanDecodeArgs) -> anyhow::Result<()> {
    use std::time::Instant;

    use candle_core::{DType, Tensor};

    use crate::models::wan::vae::WanVae;
    use crate::models::wan::WanVaeConfig;

    let device = super::t2i::parse_device(Some(&a.device))?;
    let dtype = super::t2i::parse_dtype(Some(&a.dtype), &device)?;
    let cfg = match a.vae.as_str() {
        "wan22" => WanVaeConfig::wan22(),
        "wan21" => WanVaeConfig::wan21(),
        o => anyhow::bail!("unknown --vae `{o}` (wan22 or wan21)"),
    };
    anyhow::ensure!((a.frames - 1).is_multiple_of(4), "--frames must be 4k+1");
    let s = cfg.spatial_factor();
    let (f, h, w) = ((a.frames - 1) / 4 + 1, a.height / s, a.width / s);
    let vb = crate::linear::random_var_builder(dtype, &device);
    let vae = WanVae::new(&cfg, vb, false)?;
    let z = Tensor::randn(0f32, 1.0, (1, cfg.z_dim, f, h, w), &device)?.to_dtype(dtype)?;
    let before = crate::pipelines::gpu_used(&device);
    let mut peak = before;
    let t0 = Instant::now();
    let video = vae.decode(&z, |_, _| {
        if let (Some(p), Some(now)) = (peak.as_mut(), crate::pipelines::gpu_used(&device)) {
            *p = (*p).max(now);
        }
    })?;
    device.synchronize()?;
    let secs = t0.elapsed().as_secs_f64();
    let dims = video.dims().to_vec();
    anyhow::ensure!(dims[2] == a.frames && dims[3] == a.height && dims[4] == a.width, "decoded {dims:?}");
    let finite = video.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()?.is_finite();
    println!(
        "wan decode {} {:?}: {}x{}x{} frames in {secs:.1}s; GPU in use before {}, peak sampled after each latent frame {}; output finite: {finite}",
        a.vae, dtype, a.width, a.height, a.frames, gib(before), gib(peak)
    );
    if let Some(out) = &a.out {
        let row = serde_json::json!({"vae": a.vae, "dtype": format!("{dtype:?}"), "width": a.width, "height": a.height,
            "frames": a.frames, "seconds": secs, "gpu_before_bytes": before, "gpu_peak_sampled_bytes": peak});
        std::fs::write(out, serde_json::to_string_pretty(&row)?)?;
    }
    Ok(())
}

fn flux_step(a: &FluxStepArgs) -> anyhow::Result<()> {
    use std::time::Instant;

    use candle_core::{DType, Tensor};

    use crate::linear::WeightBuilder;
    use crate::models::flux::Naming;

    // Both families pack 16x16 pixels into one token at full size.
    let (lh, lw) = (a.height / 16, a.width / 16);
    anyhow::ensure!(lh * 16 == a.height && lw * 16 == a.width, "--width and --height must be multiples of 16");
    anyhow::ensure!(
        !a.graph || a.gpus.is_empty(),
        "--graph times the step on one GPU; run it without --gpus {:?}",
        a.gpus
    );
    if !a.gpus.is_empty() {
        if a.model != "flux.1-dev" {
            flux2_config(&a.model)?;
        }
        let what = format!("{} {}x{} step", a.model, a.width, a.height);
        let mut rows = Vec::new();
        for v in &a.variants {
            let (paths, opts) = variant(v, "transformer_blocks.")?;
            let make = |device: &Device, world: Option<&Group>| -> candle_core::Result<Step> {
                let wb = WeightBuilder::synthetic(DType::BF16, device, paths.clone(), opts);
                let t = Tensor::new(&[0.5f32], device)?;
                let g = Tensor::new(&[3.5f32], device)?;
                if a.model == "flux.1-dev" {
                    let cfg = crate::models::flux::FluxConfig::default();
                    let model = crate::models::flux::FluxTransformer::new(&cfg, &wb, Naming::Diffusers)?;
                    let img = host_randn(&[1, lh * lw, cfg.in_channels], 1, device, DType::BF16)?;
                    let txt = host_randn(&[1, a.txt_tokens, cfg.joint_attention_dim], 2, device, DType::BF16)?;
                    let pooled = host_randn(&[1, cfg.pooled_projection_dim], 3, device, DType::BF16)?;
                    let ids = crate::models::flux::sampling::image_ids(lh * 2, lw * 2, device)?;
                    let txt_ids = Tensor::zeros((a.txt_tokens, 3), DType::F32, device)?;
                    let plan = Plan::of(world, cfg.num_attention_heads, false)?;
                    return Ok(Box::new(move || {
                        let sp = plan.sp.as_ref();
                        model.forward_sharded(&img, &txt, &pooled, &t, Some(&g), &ids, &txt_ids, DType::BF16, sp)
                    }));
                }
                let cfg = flux2_config(&a.model).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let model = crate::models::flux2::Flux2Transformer::new(&cfg, &wb, Naming::Diffusers)?;
                let img = host_randn(&[1, lh * lw, cfg.in_channels], 1, device, DType::BF16)?;
                let txt = host_randn(&[1, a.txt_tokens, cfg.joint_attention_dim], 2, device, DType::BF16)?;
                let ids = crate::models::flux2::sampling::image_ids(lh, lw, device)?;
                let txt_ids = crate::models::flux2::sampling::text_ids(a.txt_tokens, device)?;
                let g = cfg.guidance_embeds.then_some(g);
                let plan = Plan::of(world, cfg.num_attention_heads, false)?;
                Ok(Box::new(move || {
                    let sp = plan.sp.as_ref();
                    model.forward_sharded(&img, &txt, &t, g.as_ref(), &ids, &txt_ids, DType::BF16, sp)
                }))
            };
            rows.extend(scaling(&what, v, &a.gpus, a.shared, a.iters, a.baseline_row_split, make)?);
        }
        if let Some(out) = &a.out {
            std::fs::write(out, serde_json::to_string_pretty(&rows)?)?;
        }
        return Ok(());
    }
    let mut device = super::t2i::parse_device(Some(&a.device))?;
    if a.graph {
        // Graph capture on a stream of the device's own.
        let candle_core::DeviceLocation::Cuda { gpu_id } = device.location() else {
            anyhow::bail!("--graph needs a CUDA device, found --device {}", a.device)
        };
        device = crate::cuda_support::cuda_device(gpu_id, true)?;
    }
    let t = Tensor::new(&[0.5f32], &device)?;
    let g = Tensor::new(&[3.5f32], &device)?;
    // Seeded on the host: the same inputs in every run, for --save / --against.
    let randn = |shape: (usize, usize, usize), seed: u64| -> candle_core::Result<Tensor> {
        host_randn(&[shape.0, shape.1, shape.2], seed, &device, DType::BF16)
    };
    // One boxed step per model family.
    type Step<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;
    let build = |wb: &WeightBuilder| -> anyhow::Result<Step> {
        Ok(match a.model.as_str() {
            "flux.1-dev" => {
                let cfg = crate::models::flux::FluxConfig::default();
                let model = crate::models::flux::FluxTransformer::new(&cfg, wb, Naming::Diffusers)?;
                let img = randn((1, lh * lw, cfg.in_channels), 1)?;
                let txt = randn((1, a.txt_tokens, cfg.joint_attention_dim), 2)?;
                let pooled = host_randn(&[1, cfg.pooled_projection_dim], 3, &device, DType::BF16)?;
                let ids = crate::models::flux::sampling::image_ids(lh * 2, lw * 2, &device)?;
                let txt_ids = Tensor::zeros((a.txt_tokens, 3), DType::F32, &device)?;
                let (t, g) = (t.clone(), g.clone());
                Box::new(move || model.forward(&img, &txt, &pooled, &t, Some(&g), &ids, &txt_ids, DType::BF16))
            }
            name => {
                let cfg = flux2_config(name)?;
                let model = crate::models::flux2::Flux2Transformer::new(&cfg, wb, Naming::Diffusers)?;
                let img = randn((1, lh * lw, cfg.in_channels), 1)?;
                let txt = randn((1, a.txt_tokens, cfg.joint_attention_dim), 2)?;
                let ids = crate::models::flux2::sampling::image_ids(lh, lw, &device)?;
                let txt_ids = crate::models::flux2::sampling::text_ids(a.txt_tokens, &device)?;
                let g = cfg.guidance_embeds.then(|| g.clone());
                let t = t.clone();
                Box::new(move || model.forward(&img, &txt, &t, g.as_ref(), &ids, &txt_ids, DType::BF16))
            }
        })
    };
    let mut rows = Vec::new();
    let mut outputs = StepOutputs::new(&a.variants, a.save.as_deref(), a.against.as_deref());
    for v in &a.variants {
        let (paths, opts) = variant(v, "transformer_blocks.")?;
        let t0 = Instant::now();
        let wb = WeightBuilder::synthetic(DType::BF16, &device, paths, opts);
        let step = build(&wb)?;
        device.synchronize()?;
        let build_s = t0.elapsed().as_secs_f64();
        step()?;
        device.synchronize()?;
        let peak = crate::pipelines::gpu_used(&device);
        let (ms, queued_ms) =
            timed(&device, a.iters, a.profiler_range, || step().map(|_| ()), &|| device.synchronize())?;
        println!(
            "{} {v:<24} {:>9.1} ms/step  ({}x{}, {} txt tokens; built in {build_s:.1}s{}; host queued a step in {queued_ms:.1} ms)",
            a.model,
            ms,
            a.width,
            a.height,
            a.txt_tokens,
            peak.map(|b| format!(", GPU memory in use {:.1} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_default()
        );
        let mut row = serde_json::json!({"model": a.model, "variant": v, "ms_per_step": ms, "width": a.width,
            "height": a.height, "txt_tokens": a.txt_tokens, "gpu_used_bytes": peak});
        if a.graph {
            let (graph_ms, dist) = step_graph_ms(&device, a.iters, &step)?;
            println!(
                "{} {v:<24} {graph_ms:>9.1} ms/step as a CUDA graph ({:.3}x the plain step; its output's rel. L2 vs the plain step's: {dist:.3e})",
                a.model,
                graph_ms / ms
            );
            row["graph_ms_per_step"] = serde_json::json!(graph_ms);
            row["graph_output_rel_l2"] = serde_json::json!(dist);
        }
        outputs.record(v, &mut row, &step)?;
        rows.push(row);
        drop(step);
    }
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn gemm(_: &GemmArgs) -> anyhow::Result<()> {
    anyhow::bail!("`bench gemm` measures GPU kernels: build with --features cuda (see README)")
}

/// `bench gemm`'s NVFP4 runs, `(backend, mode, fast FP8 accumulation)`: those `variants` name
/// (`<backend>:<mode>`, fp8 with an optional fast-accumulation suffix), else every backend of this
/// build in both modes, and fp8.
#[cfg(feature = "cuda")]
fn gemm_runs(
    variants: &[String],
    device: &candle_core::Device,
) -> anyhow::Result<Vec<(crate::nvfp4::Backend, crate::nvfp4::ActMode, bool)>> {
    use crate::nvfp4::{ActMode, Backend};
    let backends: Vec<Backend> =
        Backend::ALL.into_iter().filter(|b| crate::cuda_support::check_backend(*b, device).is_ok()).collect();
    // FP8 mode runs one cuBLASLt path whatever the backend: one column.
    let all: Vec<(Backend, ActMode)> = backends
        .iter()
        .flat_map(|b| [(*b, ActMode::W4A16), (*b, ActMode::W4A4)])
        .chain(std::iter::once((Backend::Trtllm, ActMode::Fp8)))
        .collect();
    if variants.is_empty() {
        return Ok(all.iter().map(|&(b, mode)| (b, mode, false)).collect());
    }
    let mut runs = Vec::new();
    for v in variants {
        let (base, fast) = match v.strip_suffix(crate::compare::run::FAST_ACCUM_SUFFIX) {
            Some(b) => (b, true),
            None => (v.as_str(), false),
        };
        let (b, mode) = base.split_once(':').ok_or_else(|| anyhow::anyhow!("variant `{v}`: use <backend>:<mode>"))?;
        let b = Backend::from_name(b).ok_or_else(|| anyhow::anyhow!("variant `{v}`: unknown backend `{b}`"))?;
        let mode: ActMode = mode.parse().map_err(|e: String| anyhow::anyhow!("variant `{v}`: {e}"))?;
        anyhow::ensure!(!fast || mode == ActMode::Fp8, "variant `{v}`: +fastacc applies to fp8 mode only");
        let mode_run = if mode == ActMode::Fp8 { (Backend::Trtllm, mode) } else { (b, mode) };
        if !all.contains(&mode_run) {
            anyhow::bail!("variant `{v}` is not available in this build or on this GPU");
        }
        runs.push((mode_run.0, mode_run.1, fast));
    }
    Ok(runs)
}

/// A `bench gemm` weight shape, `KxN`.
#[cfg(feature = "cuda")]
fn gemm_shape(shape: &str) -> anyhow::Result<(usize, usize)> {
    let (k, n) = shape.split_once('x').ok_or_else(|| anyhow::anyhow!("shape `{shape}` must be KxN"))?;
    Ok((k.parse()?, n.parse()?))
}

/// `bench gemm`'s random problem of `m` tokens and a `k` x `n` weight (seeded by its shape), and its
/// input in bf16 on `device`.
#[cfg(feature = "cuda")]
fn gemm_problem(
    m: usize,
    k: usize,
    n: usize,
    device: &candle_core::Device,
) -> anyhow::Result<(crate::doctor::Problem, candle_core::Tensor)> {
    use candle_core::{DType, Device, Tensor};
    let p = crate::doctor::Problem::random(m, k, n, (m * 31 + k * 7 + n) as u64)?;
    let x = Tensor::from_vec(p.x.clone(), (m, k), &Device::Cpu)?.to_dtype(DType::BF16)?.to_device(device)?;
    Ok((p, x))
}

/// A `bench gemm` run's column label.
#[cfg(feature = "cuda")]
fn gemm_label(b: crate::nvfp4::Backend, mode: crate::nvfp4::ActMode, fast: bool) -> String {
    use crate::nvfp4::ActMode;
    match (mode, fast) {
        (ActMode::Fp8, false) => "fp8".to_string(),
        (ActMode::Fp8, true) => "fp8 fastacc".to_string(),
        _ => format!("{b} {mode}"),
    }
}

#[cfg(feature = "cuda")]
fn gemm(args: &GemmArgs) -> anyhow::Result<()> {
    if args.phases {
        return gemm_phases(args);
    }
    if args.chain {
        return gemm_chain(args);
    }
    use std::time::Instant;

    use candle_core::{DType, Device, Module, Tensor};

    use crate::nvfp4::fp8::Fp8Accum;
    use crate::nvfp4::ActMode;

    let device = crate::cuda_support::cuda_device(args.gpu, false)?;
    let Device::Cuda(dev) = &device else { unreachable!() };
    let (name, _, _) = crate::cuda::device_info(dev)?;
    let time = |f: &mut dyn FnMut() -> candle_core::Result<()>| -> anyhow::Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        device.synchronize()?;
        let (mut iters, start) = (0u32, Instant::now());
        while start.elapsed().as_millis() < args.min_ms as u128 || iters < 5 {
            f()?;
            iters += 1;
            if iters % 8 == 0 {
                device.synchronize()?;
            }
        }
        device.synchronize()?;
        Ok(start.elapsed().as_secs_f64() / iters as f64)
    };
    let runs = gemm_runs(&args.variants, &device)?;
    // fp8 runs get a second column: the GEMM alone, its input quantized beforehand, as the models'
    // fused producers (LayerNorm-modulation, attention output) hand it over.
    let headers: Vec<String> = runs
        .iter()
        .flat_map(|&(b, mode, fast)| {
            let l = gemm_label(b, mode, fast);
            let alone = (mode == ActMode::Fp8).then(|| format!("{l} GEMM alone ms (x bf16)"));
            std::iter::once(format!("{l} ms (x bf16)")).chain(alone)
        })
        .collect();
    println!("GPU: {name}");
    println!("| M | K x N | cuBLAS bf16 ms (TFLOP/s) | {} |", headers.join(" | "));
    println!("|---|---|---|{}", "---|".repeat(headers.len()));
    let mut rows = Vec::new();
    for shape in &args.shapes {
        let (k, n) = gemm_shape(shape)?;
        for &m in &args.m {
            let (p, x) = gemm_problem(m, k, n, &device)?;
            let w =
                Tensor::from_vec(p.w.dequantize(), (n, k), &Device::Cpu)?.to_dtype(DType::BF16)?.to_device(&device)?;
            let flops = 2.0 * (m * n * k) as f64;
            let t_ref = time(&mut || x.matmul(&w.t()?).map(|_| ()))?;
            let mut cells = vec![format!("{:.3} ({:.0})", t_ref * 1e3, flops / t_ref / 1e12)];
            let mut entry = serde_json::json!({"m": m, "k": k, "n": n, "cublas_bf16_s": t_ref});
            for &(b, mode, fast) in &runs {
                let b = &b;
                {
                    let accum = if fast { Fp8Accum::Fast } else { Fp8Accum::F32 };
                    let measured = p.layer(*b, mode, &device).map_err(anyhow::Error::from).and_then(|l| {
                        let l = l.with_fp8_accum(accum);
                        let whole = time(&mut || l.forward(&x).map(|_| ()))?;
                        // Its own result: a layer that cannot take a quantized input still has its
                        // whole time reported.
                        let alone = (mode == ActMode::Fp8).then(|| {
                            let a = crate::cuda::fp8::Fp8Act::quantize(&x)?;
                            time(&mut || l.forward_fp8_act(&a, false).map(|_| ()))
                        });
                        Ok((whole, alone))
                    });
                    let key = gemm_label(*b, mode, fast).replace(' ', "_");
                    match measured {
                        Ok((t, alone)) => {
                            cells.push(format!("{:.3} ({:.2}x)", t * 1e3, t_ref / t));
                            entry[format!("{key}_s")] = serde_json::json!(t);
                            match alone {
                                Some(Ok(t)) => {
                                    cells.push(format!("{:.3} ({:.2}x)", t * 1e3, t_ref / t));
                                    entry[format!("{key}_gemm_only_s")] = serde_json::json!(t);
                                }
                                Some(Err(e)) => {
                                    eprintln!("{b} {mode} GEMM alone at M={m} {k}x{n}: {e}");
                                    cells.push("unsupported".into());
                                }
                                None => {}
                            }
                        }
                        Err(e) => {
                            // A variant that cannot run this shape is reported, and the table goes on.
                            let first = e.to_string().lines().next().unwrap_or_default().to_string();
                            eprintln!("{b} {mode} at M={m} {k}x{n}: {e}");
                            cells.push("unsupported".into());
                            if mode == ActMode::Fp8 {
                                cells.push("unsupported".into());
                            }
                            entry[format!("{key}_error")] = serde_json::json!(first);
                        }
                    }
                }
            }
            println!("| {m} | {k}x{n} | {} |", cells.join(" | "));
            rows.push(entry);
        }
    }
    if let Some(out) = &args.out {
        // (min_ms tells a burst from the card at its power limit: docs/PERF.md session 35.)
        let v = serde_json::json!({"gpu": name, "min_ms": args.min_ms, "rows": rows});
        std::fs::write(out, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

#[cfg(all(feature = "cuda", not(feature = "sm90-phases")))]
fn gemm_phases(_: &GemmArgs) -> anyhow::Result<()> {
    anyhow::bail!(
        "`bench gemm --phases` reads marks only a profiling build writes: build with --features sm90-phases \
         (e.g. CANDIFF_GPU_DIR=.gpu/phases scripts/gpu-build.sh cudnn,nccl,sm90-phases, beside the \
         normal binary), and time nothing else with that binary"
    )
}

/// `bench gemm --phases`: for each product, one launch of the trtllm W4A16 layer (after three to
/// warm up) and its phase marks summed up ([`crate::nvfp4::phases`]).
#[cfg(feature = "sm90-phases")]
fn gemm_phases(args: &GemmArgs) -> anyhow::Result<()> {
    use candle_core::{Device, Module};

    use crate::nvfp4::{phases, ActMode, Backend};

    let device = crate::cuda_support::cuda_device(args.gpu, false)?;
    let Device::Cuda(dev) = &device else { unreachable!() };
    let (name, _, _) = crate::cuda::device_info(dev)?;
    let cc = crate::cuda::compute_capability(dev)?;
    anyhow::ensure!(
        cc == (9, 0),
        "the phase marks are in the Hopper GEMM (sm_90a) only; {name} is compute capability {}.{}",
        cc.0,
        cc.1
    );
    println!("GPU: {name}; phase marks of one launch per product (a profiling build: not for speed)");
    println!(
        "| M | K x N | tokens/CTA, K parts, stages | CTAs (SMs) | kernel us | GHz | set-up | fill | main loop | \
         sums/store | other | cycles per K tile | waiting for copies | producer waiting | first fill cycles | \
         sums/store cycles | SMs idle at the end |"
    );
    println!("|{}", "---|".repeat(17));
    let pct = |s: phases::Spread| format!("{:.1}% (max {:.1}%)", 100.0 * s.median, 100.0 * s.max);
    let cyc = |s: phases::Spread| format!("{:.0} (max {:.0})", s.median, s.max);
    let mut rows = Vec::new();
    for shape in &args.shapes {
        let (k, n) = gemm_shape(shape)?;
        for &m in &args.m {
            let (p, x) = gemm_problem(m, k, n, &device)?;
            let l = p.layer(Backend::Trtllm, ActMode::W4A16, &device)?;
            for _ in 0..3 {
                l.forward(&x)?;
            }
            device.synchronize()?;
            crate::cuda::sm90_phases_take(dev)?; // zeroes the log
            l.forward(&x)?;
            device.synchronize()?;
            let words = crate::cuda::sm90_phases_take(dev)?;
            match phases::parse(&words) {
                Ok(ctas) => {
                    let mut launches = Vec::new();
                    for launch in phases::by_launch(&ctas) {
                        let s = phases::summarize(&launch);
                        let what =
                            if s.first_tile == 0 { String::new() } else { format!(", from tile {}", s.first_tile) };
                        let trunc = if s.truncated > 0 {
                            format!(" ({} CTAs ran more units than recorded)", s.truncated)
                        } else {
                            String::new()
                        };
                        println!(
                            "| {m} | {k}x{n} | {}, {}, {}{what} | {} ({}) | {:.1} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}%{trunc} |",
                            s.tokens,
                            s.k_parts,
                            s.stages,
                            s.ctas,
                            s.sms,
                            s.kernel_ns as f64 / 1e3,
                            s.clock_ghz.median,
                            pct(s.set_up),
                            pct(s.fill),
                            pct(s.main),
                            pct(s.store),
                            pct(s.other),
                            cyc(s.per_k_tile),
                            pct(s.full_wait),
                            pct(s.empty_wait),
                            cyc(s.first_fill_cycles),
                            cyc(s.store_cycles),
                            100.0 * s.idle_at_end
                        );
                        launches.push(serde_json::json!({"summary": s, "ctas": launch}));
                    }
                    rows.push(serde_json::json!({"m": m, "k": k, "n": n, "launches": launches}));
                }
                Err(e) => {
                    println!("| {m} | {k}x{n} | {e} |");
                    rows.push(serde_json::json!({"m": m, "k": k, "n": n, "error": e.to_string()}));
                }
            }
        }
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&serde_json::json!({"gpu": name, "rows": rows}))?)?;
    }
    Ok(())
}

/// NVFP4 weight bytes a `--chain` run spreads its calls over: five times an H200's 50 MiB L2, so
/// that, as with a model's layers, no call finds its weights left in the cache by the graph's
/// previous launch.
#[cfg(feature = "cuda")]
const CHAIN_WEIGHT_BYTES: usize = 256 << 20;

/// Seconds per run of `body` captured once as a CUDA graph on `device`'s stream (a stream of its
/// own: see [`crate::cuda_support::cuda_device`]): `body` runs once outside the capture (kernels
/// load, libraries pick their algorithms, the memory pool grows), one graph launch sizes the run,
/// then back-to-back launches, at least `min_launches` and `min_ms`, between two events.
/// Candle's strided kernels copy their dims and strides from the host at each call, which a graph
/// would replay from a freed host buffer (session 28: `bmul_f32` read out of bounds): its cache of
/// those uploads is on from the first run through the capture, so the capture reuses the device
/// copies made by the first run (and fails, rather than copy, if it finds one missing).
#[cfg(feature = "cuda")]
fn graph_seconds(
    device: &candle_core::Device,
    min_ms: u64,
    min_launches: usize,
    body: &dyn Fn() -> candle_core::Result<()>,
) -> anyhow::Result<f64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let candle_core::Device::Cuda(dev) = device else {
        anyhow::bail!("CUDA graph timing needs a CUDA device, found {device:?}")
    };
    let stream = dev.cuda_stream();
    let event = || stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
    let _uploads = dev.enable_cuda_graph_htod_cache();
    body()?;
    device.synchronize()?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
    let captured = body();
    // The capture ends whatever happened inside it.
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    captured?;
    let graph = graph?.ok_or_else(|| anyhow::anyhow!("the CUDA graph capture recorded nothing"))?;
    let before = event()?;
    graph.launch()?;
    let after = event()?;
    after.synchronize()?;
    let once_ms = f64::from(before.elapsed_ms(&after)?).max(1e-3);
    let launches = ((min_ms as f64 / once_ms).ceil() as usize).max(min_launches);
    let t = std::time::Instant::now();
    let start = event()?;
    for _ in 0..launches {
        graph.launch()?;
    }
    let end = event()?;
    end.synchronize()?;
    let (host_s, gpu_s) = (t.elapsed().as_secs_f64(), f64::from(start.elapsed_ms(&end)?) * 1e-3);
    // The host only queues launches here; if that took longer, the events timed the host.
    anyhow::ensure!(
        host_s < 2.0 * gpu_s + 0.05,
        "the graph launches took {host_s:.3} s on the host for {gpu_s:.3} s on the GPU: not a GPU time"
    );
    Ok(gpu_s / launches as f64)
}

/// `bench gemm --chain`: see [`GemmArgs::chain`].
#[cfg(feature = "cuda")]
fn gemm_chain(args: &GemmArgs) -> anyhow::Result<()> {
    use candle_core::{DType, Device, Module, Tensor};

    use crate::doctor::Problem;
    use crate::nvfp4::fp8::Fp8Accum;

    // Captured on a stream of the device's own ([`graph_seconds`]).
    let device = crate::cuda_support::cuda_device(args.gpu, true)?;
    let Device::Cuda(dev) = &device else { unreachable!() };
    let (name, _, _) = crate::cuda::device_info(dev)?;
    let runs = gemm_runs(&args.variants, &device)?;
    // Seconds per call of the calls `f(0..calls)` captured as one graph.
    let graph_time = |calls: usize, f: &dyn Fn(usize) -> candle_core::Result<()>| -> anyhow::Result<f64> {
        const MIN_LAUNCHES: usize = 3;
        let body = || (0..calls).try_for_each(f);
        Ok(graph_seconds(&device, args.min_ms, MIN_LAUNCHES, &body)? / calls as f64)
    };
    let labels: Vec<String> = runs.iter().map(|&(b, mode, fast)| gemm_label(b, mode, fast)).collect();
    println!("GPU: {name}");
    println!("Per call, in a CUDA graph of back-to-back calls over L copies of the layer (GPU time):");
    println!(
        "| M | K x N | L | cuBLAS bf16 us | {} |",
        labels.iter().map(|l| format!("{l} us")).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|---|---|---|{}", "---|".repeat(runs.len()));
    let mut rows = Vec::new();
    for shape in &args.shapes {
        let (k, n) = gemm_shape(shape)?;
        let p = Problem::random(1, k, n, (k * 7 + n) as u64)?;
        // As many copies as keep the NVFP4 weights out of the L2 cache between two of a copy's calls.
        let copies = CHAIN_WEIGHT_BYTES.div_ceil(p.w.packed.len() + p.w.scales.len()).max(2);
        let w = Tensor::from_vec(p.w.dequantize(), (n, k), &Device::Cpu)?.to_dtype(DType::BF16)?.to_device(&device)?;
        let dense = (0..copies).map(|_| w.copy()).collect::<candle_core::Result<Vec<_>>>()?;
        drop(w);
        let layers = runs
            .iter()
            .map(|&(b, mode, fast)| {
                let accum = if fast { Fp8Accum::Fast } else { Fp8Accum::F32 };
                (0..copies)
                    .map(|_| p.layer(b, mode, &device).map(|l| l.with_fp8_accum(accum)))
                    .collect::<candle_core::Result<Vec<_>>>()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        for &m in &args.m {
            let mut rng = crate::rng::Rng::new((m * 31 + k) as u64);
            let x = Tensor::from_vec(rng.normal_bf16_values(m * k, 1.0), (m, k), &Device::Cpu)?
                .to_dtype(DType::BF16)?
                .to_device(&device)?;
            let t_ref = graph_time(copies, &|i| x.matmul(&dense[i].t()?).map(|_| ()))?;
            let mut cells = Vec::new();
            let mut entry = serde_json::json!({"m": m, "k": k, "n": n, "copies": copies, "cublas_bf16_s": t_ref});
            for (label, copies_of_run) in labels.iter().zip(&layers) {
                let t = graph_time(copies, &|i| copies_of_run[i].forward(&x).map(|_| ()))?;
                cells.push(format!("{:.2} ({:.2}x)", t * 1e6, t_ref / t));
                entry[format!("{}_s", label.replace(' ', "_"))] = serde_json::json!(t);
            }
            println!("| {m} | {k}x{n} | {copies} | {:.2} | {} |", t_ref * 1e6, cells.join(" | "));
            rows.push(entry);
        }
    }
    if let Some(out) = &args.out {
        let v = serde_json::json!({"gpu": name, "timing": "per call, CUDA graph over distinct copies of each layer",
            "min_ms": args.min_ms, "rows": rows});
        std::fs::write(out, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

fn attention(a: &AttentionArgs) -> anyhow::Result<()> {
    use std::time::Instant;

    use candle_core::{DType, Tensor};

    let device = super::t2i::parse_device(Some(&a.device))?;
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> anyhow::Result<f64> {
        f()?;
        device.synchronize()?;
        let mut kept = Vec::with_capacity(if a.keep_outputs { a.iters } else { 0 });
        let t0 = Instant::now();
        for _ in 0..a.iters {
            let out = f()?;
            if a.keep_outputs {
                kept.push(out);
            }
        }
        device.synchronize()?;
        // `kept` drops after the elapsed time is read.
        Ok(t0.elapsed().as_secs_f64() * 1e3 / a.iters as f64)
    };
    let mut rows = Vec::new();
    for shape in &a.shapes {
        let (h, s) = shape
            .split_once('x')
            .and_then(|(h, s)| Some((h.parse::<usize>().ok()?, s.parse::<usize>().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("shape `{shape}`: use HEADSxTOKENS"))?;
        // [B, S, H, D] buffers viewed as [B, H, S, D], as the models pass them.
        let mk = || -> candle_core::Result<Tensor> {
            Tensor::randn(0f32, 1.0, (1, s, h, a.head_dim), &device)?.to_dtype(DType::BF16)?.transpose(1, 2)
        };
        let (q, k, v) = (mk()?, mk()?, mk()?);
        let flops = 4.0 * (h * s * s * a.head_dim) as f64;
        let ms = time(&|| crate::models::ops::attention_half(&q, &k, &v))?;
        let tflops = flops / (ms * 1e-3) / 1e12;
        let imp = crate::models::ops::attention_impl();
        let imp =
            if imp == crate::models::ops::AttentionImpl::Fp8 { crate::models::ops::AttentionImpl::Cudnn } else { imp };
        let kept = if a.keep_outputs { ", outputs kept" } else { "" };
        println!(
            "attention {h} heads x {s} tokens x {} ({imp:?}{kept}): {ms:8.3} ms  {tflops:6.1} TFLOP/s",
            a.head_dim
        );
        #[cfg_attr(not(feature = "cudnn"), allow(unused_mut))]
        let mut row = serde_json::json!({"heads": h, "tokens": s, "head_dim": a.head_dim, "ms": ms, "tflops": tflops,
            "impl": format!("{imp:?}"), "keep_outputs": a.keep_outputs});
        #[cfg(feature = "cudnn")]
        if a.fp8 {
            use crate::cuda::attn_fp8;
            let fp8 = time(&|| attn_fp8::attention(&q, &k, &v)).and_then(|ms| {
                let quant = time(&|| attn_fp8::quantize(&q, &k, &v).map(|_| q.clone()))?;
                let exact = crate::models::ops::attention_half(&q, &k, &v)?.to_dtype(DType::F32)?;
                let got = attn_fp8::attention(&q, &k, &v)?.transpose(1, 2)?.to_dtype(DType::F32)?;
                let err = crate::doctor::rel_l2(&got.flatten_all()?.to_vec1()?, &exact.flatten_all()?.to_vec1()?);
                Ok((ms, quant, err))
            });
            match fp8 {
                Ok((fms, quant, err)) => {
                    println!(
                        "  fp8: {fms:8.3} ms ({:.2}x bf16), {:6.1} TFLOP/s; of it quantizing q, k, v {quant:.3} ms; rel. L2 vs bf16 {err:.2e}",
                        ms / fms,
                        flops / (fms * 1e-3) / 1e12
                    );
                    row["fp8_ms"] = serde_json::json!(fms);
                    row["fp8_quantize_ms"] = serde_json::json!(quant);
                    row["fp8_rel_l2_vs_bf16"] = serde_json::json!(err);
                }
                Err(e) => {
                    println!("  fp8: unavailable: {e}");
                    row["fp8_error"] = serde_json::json!(e.to_string());
                }
            }
        }
        rows.push(row);
    }
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

/// Times the element-wise and data-movement ops of a FLUX.1 block one by one (bf16, batch 1).
fn ops(a: &OpsArgs) -> anyhow::Result<()> {
    use std::time::Instant;

    use candle_core::{DType, Module, Tensor, D};

    use crate::models::ops::{apply_rope, gelu_tanh, heads, merge_heads, rope_tables, RmsNorm};

    let device = super::t2i::parse_device(Some(&a.device))?;
    let (s, h, d) = (a.tokens, a.heads, 128usize);
    let c = h * d;
    let bf = |t: Tensor| t.to_dtype(DType::BF16);
    let x = bf(Tensor::randn(0f32, 1.0, (1, s, c), &device)?)?;
    let x3 = bf(Tensor::randn(0f32, 1.0, (1, s, 3 * c), &device)?)?;
    let mlp = bf(Tensor::randn(0f32, 1.0, (1, s, 4 * c), &device)?)?;
    let w = bf(Tensor::randn(0f32, 0.02, (c, c), &device)?)?;
    let bias = bf(Tensor::randn(0f32, 0.02, c, &device)?)?;
    let bias4 = bf(Tensor::randn(0f32, 0.02, 4 * c, &device)?)?;
    let lin = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
    let lin_nb = candle_nn::Linear::new(w.clone(), None);
    let shift = Tensor::randn(0f32, 1.0, (1, c), &device)?;
    let norm = RmsNorm::new(Tensor::ones(d, DType::BF16, &device)?, 1e-6);
    let ids = Tensor::zeros((s, 3), DType::F32, &device)?;
    let (cos, sin) = rope_tables(&ids, &[16, 56, 56], 10_000.0, &device)?;
    let qh = heads(&x, h)?;
    let qn = norm.forward(&qh)?;
    let part = x3.narrow(D::Minus1, 0, c)?;
    let half = x.narrow(1, 0, s / 2)?;
    // (name, count per FLUX.1-dev step of 19 double + 38 single blocks, op)
    type Op<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;
    let cases: Vec<(&str, usize, Op)> = vec![
        ("linear 3072x3072 + bias (3D input)", 19 * 8 + 38 * 3, Box::new(|| lin.forward(&x))),
        ("linear 3072x3072, no bias", 0, Box::new(|| lin_nb.forward(&x))),
        ("matmul 2D 3072x3072 (reference)", 0, Box::new(|| x.squeeze(0)?.matmul(&w.t()?))),
        ("heads (reshape+transpose view) + RmsNorm", 19 * 4 + 38 * 2, Box::new(|| norm.forward(&heads(&x, h)?))),
        ("heads of a narrowed qkv slice + RmsNorm", 38 * 2, Box::new(|| norm.forward(&heads(&part, h)?))),
        ("apply_rope (f32 round trip)", 19 * 2 + 38 * 2, Box::new(|| apply_rope(&qn, &cos, &sin))),
        ("cat [txt, img] along seq (3 per double)", 19 * 3, Box::new(|| Tensor::cat(&[&half, &half], 1))),
        ("merge_heads (transpose + reshape copy)", 57, Box::new(|| merge_heads(&qh))),
        ("gelu_tanh on [S, 4C]", 19 * 2 + 38, Box::new(|| gelu_tanh(&mlp))),
        ("cat [attn, mlp] (single block)", 38, Box::new(|| Tensor::cat(&[&x, &mlp], D::Minus1))),
        ("ln_modulate", 19 * 4 + 38, Box::new(|| crate::models::fused::ln_modulate(&x, &shift, &shift, 1e-6))),
        ("gated_add", 19 * 4 + 38, Box::new(|| crate::models::fused::gated_add(&x, &x, &shift))),
        ("bias broadcast_add alone", 0, Box::new(|| x.broadcast_add(&bias))),
        ("contiguous copy of a [B,S,H,D]->[B,H,S,D] view", 0, Box::new(|| qh.contiguous())),
        (
            "fused qk_norm_rope (replaces heads+norm+rope)",
            19 * 4 + 38 * 2,
            Box::new(|| norm.norm_rope(&part, h, &cos, &sin)),
        ),
        (
            "fused bias_act (replaces the bias add)",
            19 * 8 + 38 * 3,
            Box::new(|| crate::models::fused::bias_act(&x, &bias, false)),
        ),
        ("fused bias_act + gelu on [S, 4C]", 19 * 2, Box::new(|| crate::models::fused::bias_act(&mlp, &bias4, true))),
        (
            "fused cat_act (replaces gelu + cat in single blocks)",
            38,
            Box::new(|| crate::models::fused::cat_act(Some(&x), &mlp, crate::models::fused::MlpAct::GeluTanh)),
        ),
    ];
    let mut rows = Vec::new();
    let mut total = 0.0;
    println!("{:<48} {:>10} {:>8} {:>12}", "op (bf16)", "ms", "count", "ms per step");
    for (name, count, op) in &cases {
        op()?;
        device.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..a.iters {
            op()?;
        }
        device.synchronize()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3 / a.iters as f64;
        let per_step = ms * *count as f64;
        if *count > 0 && !name.starts_with("linear") && !name.starts_with("fused") {
            total += per_step;
        }
        println!("{name:<48} {ms:>10.3} {count:>8} {per_step:>12.1}");
        rows.push(serde_json::json!({"op": name, "ms": ms, "count_per_step": count, "ms_per_step": per_step}));
    }
    println!("non-GEMM ops listed above: {total:.1} ms per FLUX.1-dev step (excluding linears and attention)");
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
