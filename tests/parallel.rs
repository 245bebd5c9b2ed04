//! Several ranks (in-process exchange on the CPU, the same sharding and token orders as NCCL on
//! several GPUs): the exchange primitives, Ulysses attention, the sharded FLUX.1 and Wan
//! transformers against diffusers' outputs and the single-rank ones, both Wan pipelines with CFG
//! and sequence parallelism step by step, failures and bad rank counts.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use candiff::linear::{Nvfp4Options, WeightBuilder};
use candiff::models::flux::{FluxConfig, FluxTransformer, Naming};
use candiff::nvfp4::{Checkpoint, Overrides};
use candiff::parallel::pack::{QkvPack, Slot};
use candiff::parallel::{attend, launch, split_sizes, Placement, Plan, SeqParallel, DEFAULT_TIMEOUT};
use candiff::pipelines::wan::{RunStats, WanFiles, WanRun};
use candiff::pipelines::RunOptions;
use candle_core::{DType, Device, Tensor};
use common::fixtures;

fn cpu(n: usize) -> Placement {
    Placement::Shared(n, Device::Cpu)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Deterministic test data (no RNG state shared between tests).
fn data(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = candiff::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
}

#[test]
fn shares_are_contiguous_and_cover_everything() {
    assert_eq!(split_sizes(10, 4), vec![3, 3, 2, 2]);
    assert_eq!(split_sizes(2, 4), vec![1, 1, 0, 0]);
    assert_eq!(split_sizes(8, 2), vec![4, 4]);
}

#[test]
fn exchanges_deliver_every_rank_its_pieces() {
    let n = 3;
    let out = launch(&cpu(n), DEFAULT_TIMEOUT, |rank| {
        let r = rank.index();
        // Uneven gather: rank r holds r + 1 rows of value r.
        let mine = Tensor::full(r as f32, (1, r + 1, 2), &Device::Cpu)?;
        let gathered = rank.world.all_gather(&mine, 1, &[1, 2, 3])?;
        // all-to-all: rank r sends 10 r + j to rank j.
        let pieces: Vec<Tensor> =
            (0..n).map(|j| Tensor::full((10 * r + j) as f32, j + 1, &Device::Cpu)).collect::<Result<_, _>>()?;
        let shapes: Vec<Vec<usize>> = (0..n).map(|_| vec![r + 1]).collect();
        let got = rank.world.all_to_all(&pieces, &shapes)?;
        let root = rank.world.broadcast(&Tensor::full(r as f32 + 7.0, 4, &Device::Cpu)?, 1)?;
        Ok((gathered, got, root))
    })
    .unwrap();
    for (r, (gathered, got, root)) in out.iter().enumerate() {
        assert_eq!(flat(gathered), vec![0., 0., 1., 1., 1., 1., 2., 2., 2., 2., 2., 2.], "rank {r} gather");
        for (i, g) in got.iter().enumerate() {
            assert_eq!(flat(g), vec![(10 * i + r) as f32; r + 1], "rank {r} from {i}");
        }
        assert_eq!(flat(root), vec![8.0; 4], "rank {r} broadcast from 1");
    }
}

/// The full-sequence attention (q, k, v `[B, H, S, D]`) against every rank's share of it, the
/// heads exchanged and attended over in `chunks` parts.
fn ulysses_matches(n: usize, heads: usize, segments: &[usize], chunks: usize) {
    let s: usize = segments.iter().sum();
    let (q, k, v) = (data(&[1, heads, s, 8], 1), data(&[1, heads, s, 8], 2), data(&[1, heads, s, 8], 3));
    let want = candiff::models::ops::attention(&q, &k, &v).unwrap();
    let shards = launch(&cpu(n), DEFAULT_TIMEOUT, |rank| {
        let sp = SeqParallel::new(rank.world.clone(), segments).with_head_chunks(chunks);
        // This rank's rows: its share of each segment, segments in order.
        let mine = |t: &Tensor| -> candle_core::Result<Tensor> {
            let mut parts = Vec::new();
            let mut start = 0;
            for (i, &len) in segments.iter().enumerate() {
                let (o, l) = sp.local(i);
                parts.push(t.narrow(2, start + o, l)?);
                start += len;
            }
            Tensor::cat(&parts, 2)
        };
        let o = attend(Some(&sp), &mine(&q)?, &mine(&k)?, &mine(&v)?, candiff::models::ops::attention)?;
        let idx: Vec<u32> = {
            let mut idx = Vec::new();
            let mut start = 0;
            for (i, &len) in segments.iter().enumerate() {
                let (o, l) = sp.local(i);
                idx.extend((start + o..start + o + l).map(|x| x as u32));
                start += len;
            }
            idx
        };
        Ok((o, idx))
    })
    .unwrap();
    for (r, (o, idx)) in shards.iter().enumerate() {
        let want_rows = want.index_select(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(), 2).unwrap();
        assert_eq!(o.dims(), want_rows.dims());
        // Same keys in the same order per head: the very same sums.
        assert_eq!(flat(o), flat(&want_rows), "{n} ranks, {chunks} head chunks, rank {r}");
    }
}

/// The GPU writers' placement of q, k, v rows (`QkvPack::placement`, the output formula of
/// kernels/fused.cu `qk_norm_rope`) puts every row where the CPU composition of the pack puts it,
/// for runs of tokens written one after another (FLUX's text then image rows).
fn pack_placement_matches_the_composition(n: usize, heads: usize, runs: &[usize], b: usize, chunks: usize) {
    let d = 4;
    let s_loc: usize = runs.iter().sum();
    let outs = launch(&cpu(n), DEFAULT_TIMEOUT, |rank| {
        let sp = SeqParallel::new(rank.world.clone(), &[s_loc * n]).with_head_chunks(chunks);
        let like = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        let mut pack = QkvPack::new(Some(&sp), &like, s_loc, b, heads, d)?;
        let mut formula = vec![f32::NAN; 3 * s_loc * b * heads * d];
        let mut seed = 100 * rank.index() as u64;
        for slot in [Slot::Q, Slot::K, Slot::V] {
            let mut s0 = 0;
            for &len in runs {
                seed += 1;
                let x = data(&[b, len, heads * d], seed);
                let at = pack.placement(slot, s0);
                let xv = flat(&x);
                for bb in 0..b {
                    for s in 0..len {
                        for h in 0..heads {
                            for i in 0..d {
                                formula[at.row(bb, s, h, d) + i] = xv[(bb * len + s) * heads * d + h * d + i];
                            }
                        }
                    }
                }
                pack.put(slot, s0, &x, None, None)?;
                s0 += len;
            }
        }
        Ok((formula, flat(&pack.finish()?)))
    })
    .unwrap();
    for (r, (formula, composed)) in outs.iter().enumerate() {
        assert_eq!(formula, composed, "{n} ranks, {chunks} head chunks, rank {r}");
    }
}

#[test]
fn pack_placement_formula_matches_the_composition() {
    pack_placement_matches_the_composition(2, 4, &[5, 12], 1, 1);
    pack_placement_matches_the_composition(3, 6, &[4, 7], 2, 1);
    pack_placement_matches_the_composition(4, 8, &[3, 10], 1, 1);
    pack_placement_matches_the_composition(1, 2, &[9], 2, 1);
    // Head chunks: piece c*n + j holds chunk c's heads of member j.
    pack_placement_matches_the_composition(2, 12, &[5, 12], 1, 3);
    pack_placement_matches_the_composition(4, 16, &[3, 10], 2, 2);
}

/// Head chunk counts that do not divide a rank's heads are refused with the ones that do.
#[test]
fn head_chunks_that_do_not_divide_are_refused() {
    let errs = launch(&cpu(2), DEFAULT_TIMEOUT, |rank| {
        let sp = SeqParallel::new(rank.world.clone(), &[8]).with_head_chunks(4);
        let like = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        Ok(QkvPack::new(Some(&sp), &like, 4, 1, 12, 4).err().map(|e| e.to_string()))
    })
    .unwrap();
    for e in errs {
        let e = e.expect("4 chunks of 6 heads refused");
        assert!(e.contains("must divide the 6 heads") && e.contains("use one of: 1, 2, 3, 6"), "{e}");
    }
}

/// A pack missing tokens (or with tokens written twice) is refused instead of sending
/// uninitialized rows.
#[test]
fn incomplete_pack_is_refused() {
    let like = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let mut pack = QkvPack::new(None, &like, 6, 1, 2, 4).unwrap();
    for slot in [Slot::Q, Slot::K, Slot::V] {
        pack.put(slot, 0, &data(&[1, 4, 8], 1), None, None).unwrap();
    }
    let e = pack.finish().unwrap_err().to_string();
    assert!(e.contains("slot 0 holds 4 of 6 tokens"), "{e}");
    let mut pack = QkvPack::new(None, &like, 4, 1, 2, 4).unwrap();
    pack.put(Slot::Q, 0, &data(&[1, 4, 8], 1), None, None).unwrap();
    pack.put(Slot::Q, 2, &data(&[1, 2, 8], 1), None, None).unwrap();
    let e = pack.finish().unwrap_err().to_string();
    assert!(e.contains("written twice"), "{e}");
}

/// kernels/fused.cu `sp_unpack_out`'s index formula, run here as a loop over each head chunk's
/// received outputs, against the Candle composition it replaces: every member's heads of every
/// chunk for the local tokens into one row per token (chunk c, member j: heads (c*n + j)*h ..).
#[test]
fn unpack_out_formula_matches_the_composition() {
    for (n, s_loc, b, h, d, chunks) in [(2, 5, 1, 3, 4, 1), (4, 3, 2, 2, 2, 1), (3, 7, 1, 1, 8, 1), (2, 5, 2, 3, 4, 3)]
    {
        let recvs: Vec<Tensor> = (0..chunks).map(|c| data(&[n, s_loc, b, h, d], 7 + c as u64)).collect();
        let ht = chunks * n * h;
        let mut formula = vec![f32::NAN; chunks * n * s_loc * b * h * d];
        for (c, recv) in recvs.iter().enumerate() {
            let rv = flat(recv);
            for i in 0..n * s_loc * b * h * d {
                let (x, r) = (i % d, i / d);
                let (hh, r) = (r % h, r / h);
                let (j, r) = (r % n, r / n);
                let (s, bb) = (r % s_loc, r / s_loc);
                formula[((bb * s_loc + s) * ht + c * n * h + j * h + hh) * d + x] =
                    rv[(((j * s_loc + s) * b + bb) * h + hh) * d + x];
            }
        }
        let composed = Tensor::cat(&recvs, 0).unwrap().permute((2, 1, 0, 3, 4)).unwrap().contiguous().unwrap();
        assert_eq!(formula, flat(&composed), "n {n} s {s_loc} b {b} h {h} d {d} chunks {chunks}");
    }
}

#[test]
fn ulysses_attention_equals_the_full_attention() {
    ulysses_matches(2, 4, &[5, 12], 1);
    ulysses_matches(4, 4, &[3, 10], 1);
    ulysses_matches(2, 2, &[9], 1);
    ulysses_matches(2, 12, &[5, 12], 3);
    ulysses_matches(4, 16, &[3, 10], 2);
}

fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(rel), &Device::Cpu).unwrap()
}

#[test]
fn sharded_flux_transformer_matches_diffusers_and_one_rank() {
    let io = load("flux1_tiny/io.safetensors");
    let cfg = FluxConfig::from_file(&fixtures().join("flux1_tiny/transformer/config.json")).unwrap();
    let ckpt = Arc::new(Checkpoint::open(&fixtures().join("flux1_tiny/transformer"), &Overrides::default()).unwrap());
    let wb = WeightBuilder::new(ckpt, DType::F32, &Device::Cpu, Nvfp4Options::default()).unwrap();
    let model = FluxTransformer::new(&cfg, &wb, Naming::Diffusers).unwrap();
    let g = |k: &str| io[k].clone();
    let fwd = |group: Option<&candiff::parallel::Group>| {
        model.forward_sharded(
            &g("b2_hidden_states"),
            &g("b2_encoder_hidden_states"),
            &g("b2_pooled_projections"),
            &g("b2_timestep"),
            Some(&g("b2_guidance")),
            &g("img_ids"),
            &g("txt_ids"),
            DType::F32,
            group,
        )
    };
    let one = flat(&fwd(None).unwrap());
    let want = flat(&io["b2_output"]);
    let outs = launch(&cpu(2), DEFAULT_TIMEOUT, |rank| fwd(Some(&rank.world))).unwrap();
    for (r, o) in outs.iter().enumerate() {
        let o = flat(o);
        // Fixture README: f32 outputs within 2e-4 of diffusers.
        assert!(common::max_diff(&o, &want) <= 2e-4, "rank {r} vs diffusers: {}", common::max_diff(&o, &want));
        assert!(common::max_diff(&o, &one) <= 1e-5, "rank {r} vs one rank: {}", common::max_diff(&o, &one));
    }
}

/// Per step: (timestep, expert, cond, uncond, latents).
type Trajectory = Vec<(f32, usize, Vec<f32>, Vec<f32>, Vec<f32>)>;

fn wan_trajectory(name: &str, ranks: usize) -> (Trajectory, HashMap<String, Tensor>) {
    let root = fixtures().join(format!("wan22_tiny/{name}"));
    let (req, r, _) = common::wan_fixture(name);
    let files = WanFiles::new(&root, None, None).unwrap();
    let base = WanRun {
        files: &files,
        opts: RunOptions {
            dtype: DType::F32,
            device: &Device::Cpu,
            nvfp4: Nvfp4Options::default(),
            nvfp4_overrides: Overrides::default(),
            hooks: Default::default(),
            world: None,
        },
    };
    let run = |run: WanRun| -> candle_core::Result<Trajectory> {
        let mut steps = Vec::new();
        run.denoise(
            &req,
            &r["prompt_embeds"],
            Some(&r["negative_prompt_embeds"]),
            r["latents_init"].clone(),
            &mut RunStats::default(),
            |s| steps.push((s.timestep, s.expert, flat(s.cond), flat(s.uncond.unwrap()), flat(s.latents))),
        )?;
        Ok(steps)
    };
    let traj = if ranks == 1 {
        run(base).unwrap()
    } else {
        let mut all = launch(&cpu(ranks), DEFAULT_TIMEOUT, |rank| {
            run(WanRun { opts: base.opts.on(base.opts.device, Some(&rank.world)), ..base.clone() })
        })
        .unwrap();
        // Every rank steps the same latents.
        for (i, t) in all.iter().enumerate().skip(1) {
            for (s, (a, b)) in t.iter().zip(&all[0]).enumerate() {
                assert_eq!(a.4, b.4, "{name}: rank {i} latents differ from rank 0's at step {s}");
            }
        }
        all.swap_remove(0)
    };
    (traj, r)
}

fn wan_sharded_matches(name: &str) {
    let (one, r) = wan_trajectory(name, 1);
    let want_t: Vec<f32> = flat(&r["timesteps"]);
    // 2 ranks: CFG branches on one rank each; 4 ranks: CFG x 2-way sequence parallelism.
    for ranks in [2, 4] {
        let (got, _) = wan_trajectory(name, ranks);
        assert_eq!(got.len(), one.len());
        for (i, (g, o)) in got.iter().zip(&one).enumerate() {
            assert_eq!(g.0, want_t[i], "{name} x{ranks}: timestep {i}");
            assert_eq!((g.0, g.1), (o.0, o.1), "{name} x{ranks}: schedule at step {i}");
            for (what, a, b) in [("cond", &g.2, &o.2), ("uncond", &g.3, &o.3), ("latents", &g.4, &o.4)] {
                let d = common::max_diff(a, b);
                assert!(d <= 1e-5, "{name} x{ranks} step {i} {what}: max diff {d:e} from one rank");
            }
            // Fixture README: f32 latents within 1e-4 of diffusers.
            let d = common::max_diff(&g.4, &flat(&r["latents"].get(i).unwrap()));
            assert!(d <= 1e-4, "{name} x{ranks} step {i}: latents {d:e} from diffusers");
        }
    }
}

#[test]
fn wan_a14b_on_two_and_four_ranks_follows_the_single_rank_trajectory() {
    wan_sharded_matches("pipeline_a14b");
}

#[test]
fn wan_ti2v_on_two_and_four_ranks_follows_the_single_rank_trajectory() {
    wan_sharded_matches("pipeline_ti2v");
}

#[test]
fn a_failed_rank_stops_the_others_with_its_error() {
    let t0 = std::time::Instant::now();
    let err = launch(&cpu(3), DEFAULT_TIMEOUT, |rank| {
        if rank.index() == 2 {
            candle_core::bail!("out of memory loading block 7");
        }
        // The others wait in an exchange rank 2 never joins.
        rank.world.all_gather(&Tensor::zeros(2, DType::F32, &Device::Cpu)?, 0, &[2, 2, 2])
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("rank 2 of 3 failed") && err.contains("out of memory loading block 7"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "took {:?}", t0.elapsed());
}

#[test]
fn a_silent_rank_times_out_instead_of_hanging() {
    let err = launch(&cpu(2), Duration::from_millis(300), |rank| {
        if rank.index() == 1 {
            std::thread::sleep(Duration::from_secs(2));
            return Ok(());
        }
        rank.world.all_gather(&Tensor::zeros(1, DType::F32, &Device::Cpu)?, 0, &[1, 1]).map(|_| ())
    })
    .unwrap_err()
    .to_string();
    // Blamed on the rank that went silent (by the watchdog or by the waiting rank's timeout).
    assert!(err.contains("rank 1 of 2 failed"), "{err}");
    assert!(err.contains("made no progress") || err.contains("never reached an exchange"), "{err}");
}

#[test]
fn head_counts_that_do_not_divide_are_refused_with_the_choices() {
    let errs = launch(&cpu(3), DEFAULT_TIMEOUT, |rank| Ok(Plan::new(&rank.world, 24, false).is_ok())).unwrap();
    assert!(errs.iter().all(|ok| *ok), "24 heads over 3 ranks");
    let err =
        launch(&cpu(3), DEFAULT_TIMEOUT, |rank| Plan::new(&rank.world, 2, false).map(|_| ())).unwrap_err().to_string();
    assert!(err.contains("2 attention heads do not divide by 3") && err.contains("use one of: 2"), "{err}");
    // With guidance, 6 ranks = 2 branches x 3-way sharding: 40 heads do not divide by 3.
    let err =
        launch(&cpu(6), DEFAULT_TIMEOUT, |rank| Plan::new(&rank.world, 40, true).map(|_| ())).unwrap_err().to_string();
    assert!(err.contains("over 3 ranks") && err.contains("unconditional"), "{err}");
}

#[test]
fn sharded_flux2_transformer_matches_diffusers_and_one_rank() {
    use candiff::models::flux2::{Flux2Config, Flux2Transformer};
    let dir = fixtures().join("flux2_tiny");
    for (folder, io_name) in [("transformer", "io.safetensors"), ("transformer_klein", "io_klein.safetensors")] {
        let io = load(&format!("flux2_tiny/{io_name}"));
        let cfg = Flux2Config::from_file(&dir.join(folder).join("config.json")).unwrap();
        let ckpt = Arc::new(Checkpoint::open(&dir.join(folder), &Overrides::default()).unwrap());
        let wb = WeightBuilder::new(ckpt, DType::F32, &Device::Cpu, Nvfp4Options::default()).unwrap();
        let model = Flux2Transformer::new(&cfg, &wb, Naming::Diffusers).unwrap();
        let g = |k: &str| io[&format!("b2.{k}")].clone();
        let ids = |k: &str| g(k).get(0).unwrap().to_dtype(DType::F32).unwrap();
        let guidance = io.get("b2.guidance").cloned();
        let fwd = |group: Option<&candiff::parallel::Group>| {
            model.forward_sharded(
                &g("hidden_states"),
                &g("encoder_hidden_states"),
                &g("timestep"),
                guidance.as_ref(),
                &ids("img_ids"),
                &ids("txt_ids"),
                DType::F32,
                group,
            )
        };
        let one = flat(&fwd(None).unwrap());
        let want = flat(&io["b2.out"]);
        for (r, o) in launch(&cpu(2), DEFAULT_TIMEOUT, |rank| fwd(Some(&rank.world))).unwrap().iter().enumerate() {
            let o = flat(o);
            // Fixture README: transformer outputs within 1e-4 (rel. L2) of diffusers.
            let rel = candiff::doctor::rel_l2(&o, &want);
            assert!(rel <= 1e-4, "{folder} rank {r} vs diffusers: rel L2 {rel}");
            assert!(
                common::max_diff(&o, &one) <= 1e-5,
                "{folder} rank {r} vs one rank: {}",
                common::max_diff(&o, &one)
            );
        }
    }
}

#[test]
fn sharded_wan_transformers_match_diffusers_and_one_rank() {
    use candiff::models::wan::{WanConfig, WanTransformer};
    let io = load("wan22_tiny/io_transformers.safetensors");
    let ctx = &io["encoder_hidden_states"];
    // (model, fixture key, timestep key, output key): per-sample timesteps for all three, and
    // TI2V's per-token timesteps (each rank takes its tokens' rows of the modulation).
    let cases = [
        ("transformer_a14b_high", "a14b_high", "timestep", "output"),
        ("transformer_a14b_low", "a14b_low", "timestep", "output"),
        ("transformer_ti2v", "ti2v", "timestep", "output"),
        ("transformer_ti2v", "ti2v", "timestep_tokens", "output_tokens"),
    ];
    for (folder, key, t_key, out_key) in cases {
        let dir = fixtures().join("wan22_tiny").join(folder);
        let cfg = WanConfig::from_file(&dir.join("config.json")).unwrap();
        let ckpt = Arc::new(Checkpoint::open(&dir, &Overrides::default()).unwrap());
        let wb = WeightBuilder::new(ckpt, DType::F32, &Device::Cpu, Nvfp4Options::default()).unwrap();
        let model = WanTransformer::new(&cfg, &wb).unwrap();
        let g = |n: &str| io[&format!("{key}/{n}")].clone();
        let fwd = |group: Option<&candiff::parallel::Group>| {
            model.forward_sharded(&g("hidden_states"), &g(t_key), ctx, DType::F32, group)
        };
        let one = flat(&fwd(None).unwrap());
        let want = flat(&g(out_key));
        for (r, o) in launch(&cpu(2), DEFAULT_TIMEOUT, |rank| fwd(Some(&rank.world))).unwrap().iter().enumerate() {
            let o = flat(o);
            // Fixture README: f32 Wan components within 5e-5 of diffusers.
            let d = common::max_diff(&o, &want);
            assert!(d <= 5e-5, "{key} {t_key} rank {r} vs diffusers: {d}");
            assert!(common::max_diff(&o, &one) <= 1e-5, "{key} {t_key} rank {r} vs one rank");
        }
    }
}

/// NVFP4 layers under CFG parallelism (2 ranks) and CFG x sequence parallelism (4 ranks): the
/// guided output of a tiny TI2V-shaped Wan with random NVFP4 linears in every block equals the
/// single-rank output exactly, in W4A16 and W4A4 (each rank quantizes its own tokens' activations
/// per 16-element block, which sharding by tokens leaves unchanged).
#[test]
fn nvfp4_layers_sharded_equal_one_rank() {
    use candiff::models::wan::{WanConfig, WanTransformer};
    use candiff::nvfp4::{ActMode, Backend};
    let dir = fixtures().join("wan22_tiny").join("transformer_ti2v");
    let cfg = WanConfig::from_file(&dir.join("config.json")).unwrap();
    let (f, h, w) = (3, 8, 8);
    let x = data(&[1, cfg.in_channels, f, h, w], 1);
    let cond = data(&[1, 7, cfg.text_dim], 2);
    let uncond = data(&[1, 7, cfg.text_dim], 3);
    let t = Tensor::new(&[900f32], &Device::Cpu).unwrap();
    const GUIDANCE: f64 = 5.0;
    for mode in [ActMode::W4A16, ActMode::W4A4] {
        let opts = Nvfp4Options { backend: Backend::Trtllm, mode, ..Default::default() };
        // Each rank builds its own model, as `bench wan-step --gpus` does.
        let step = |world: Option<&candiff::parallel::Group>| -> candle_core::Result<Vec<f32>> {
            let wb = WeightBuilder::synthetic(DType::F32, &Device::Cpu, vec!["blocks.".into()], opts);
            let model = WanTransformer::new(&cfg, &wb)?;
            let plan = Plan::of(world, cfg.num_attention_heads, true)?;
            let (c, u) = plan.guided(true, |b| {
                model.forward_sharded(&x, &t, if b == 0 { &cond } else { &uncond }, DType::F32, plan.sp.as_ref())
            })?;
            let u = u.expect("guided");
            Ok(flat(&(&u + ((c - &u)? * GUIDANCE)?)?))
        };
        let one = step(None).unwrap();
        assert!(one.iter().any(|v| *v != 0.0), "{mode}: the output is all zero");
        for n in [2, 4] {
            for (r, o) in launch(&cpu(n), DEFAULT_TIMEOUT, |rank| step(Some(&rank.world))).unwrap().iter().enumerate() {
                assert_eq!(o, &one, "{mode}: rank {r} of {n} differs from one rank");
            }
        }
    }
}
