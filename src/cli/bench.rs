use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// NVFP4 GEMM variants next to cuBLAS bf16 at FLUX / Wan shapes, measured in the same run.
    Gemm(GemmArgs),
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
    /// Minimum measured time per entry, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub min_ms: u64,
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.what {
        BenchWhat::Gemm(g) => gemm(g),
    }
}

#[cfg(not(feature = "cuda"))]
fn gemm(_: &GemmArgs) -> anyhow::Result<()> {
    anyhow::bail!("`bench gemm` measures GPU kernels: build with --features cuda (see README)")
}

#[cfg(feature = "cuda")]
fn gemm(args: &GemmArgs) -> anyhow::Result<()> {
    use std::time::Instant;

    use candle_core::{DType, Device, Module, Tensor};

    use crate::doctor::Problem;
    use crate::nvfp4::{ActMode, Backend};

    let device = Device::new_cuda(args.gpu)?;
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
    let backends: Vec<Backend> =
        Backend::ALL.into_iter().filter(|b| crate::cuda_support::check_backend(*b, &device).is_ok()).collect();
    println!("GPU: {name}");
    println!(
        "| M | K x N | cuBLAS bf16 ms (TFLOP/s) | {} |",
        backends
            .iter()
            .flat_map(|b| [format!("{b} w4a16 ms (x bf16)"), format!("{b} w4a4 ms (x bf16)")])
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|---|{}", "---|".repeat(2 * backends.len()));
    let mut rows = Vec::new();
    for shape in &args.shapes {
        let (k, n) = shape.split_once('x').ok_or_else(|| anyhow::anyhow!("shape `{shape}` must be KxN"))?;
        let (k, n): (usize, usize) = (k.parse()?, n.parse()?);
        for &m in &args.m {
            let p = Problem::random(m, k, n, (m * 31 + k * 7 + n) as u64)?;
            let x = Tensor::from_vec(p.x.clone(), (m, k), &Device::Cpu)?.to_dtype(DType::BF16)?.to_device(&device)?;
            let w =
                Tensor::from_vec(p.w.dequantize(), (n, k), &Device::Cpu)?.to_dtype(DType::BF16)?.to_device(&device)?;
            let flops = 2.0 * (m * n * k) as f64;
            let t_ref = time(&mut || x.matmul(&w.t()?).map(|_| ()))?;
            let mut cells = vec![format!("{:.3} ({:.0})", t_ref * 1e3, flops / t_ref / 1e12)];
            let mut entry = serde_json::json!({"m": m, "k": k, "n": n, "cublas_bf16_s": t_ref});
            for b in &backends {
                for mode in [ActMode::W4A16, ActMode::W4A4] {
                    let measured = p
                        .layer(*b, mode, &device)
                        .map_err(anyhow::Error::from)
                        .and_then(|l| time(&mut || l.forward(&x).map(|_| ())));
                    match measured {
                        Ok(t) => {
                            cells.push(format!("{:.3} ({:.2}x)", t * 1e3, t_ref / t));
                            entry[format!("{b}_{mode}_s")] = serde_json::json!(t);
                        }
                        Err(e) => {
                            // A variant that cannot run this shape is reported, and the table goes on.
                            let first = e.to_string().lines().next().unwrap_or_default().to_string();
                            eprintln!("{b} {mode} at M={m} {k}x{n}: {e}");
                            cells.push("unsupported".into());
                            entry[format!("{b}_{mode}_error")] = serde_json::json!(first);
                        }
                    }
                }
            }
            println!("| {m} | {k}x{n} | {} |", cells.join(" | "));
            rows.push(entry);
        }
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&serde_json::json!({"gpu": name, "rows": rows}))?)?;
    }
    Ok(())
}
