//! How the Hopper wgmma W4A16 GEMM (`kernels/nvfp4_sm90.cu`) tiles a product: tokens per CTA and
//! the split of a mostly empty last wave along K. Plain arithmetic, shared by the CUDA launch and
//! the tests (which check, without a GPU, that `doctor`'s problems reach the split path).

/// Output features per CTA (`kRows`).
pub const SM90_ROWS: usize = 128;
/// K per tile (`kBK`).
pub const SM90_K_TILE: usize = 64;
/// Up to this many tokens the GEMV kernel runs instead of the GEMM.
pub const SM90_GEMV_MAX_M: usize = 16;
/// Largest K split of the last wave's tiles, and the fewest K tiles a part keeps (its pipeline
/// fills with 3 before the first wgmma). The TMA form puts a tile pair's parts in one cluster
/// (2 x parts CTAs): 4 parts make 8, the largest portable cluster.
pub const SM90_MAX_TAIL_SPLIT: usize = 4;
pub const SM90_MIN_TAIL_KTILES: usize = 4;

/// Clusters of `p` CTA pairs (a tile pair's K parts, 2 x p CTAs) the GPU holds at once, by p
/// (entries 0 and 1 unused). Clusters must fit in one GPU processing cluster, so the driver's count
/// can be below `sms / (2 p)`.
pub type ClusterRoom = [usize; SM90_MAX_TAIL_SPLIT + 1];

/// What a GPU of `sms` multiprocessors would hold if clusters could span them freely.
pub fn ideal_cluster_room(sms: usize) -> ClusterRoom {
    std::array::from_fn(|p| if p < 2 { 0 } else { sms / (2 * p) })
}

/// The launch plan of one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sm90Plan {
    /// Tokens per CTA (128 or 256).
    pub tokens_per_cta: usize,
    /// Tiles of SM90_ROWS features x `tokens_per_cta` tokens.
    pub tiles: usize,
    /// The last tiles, each split into `parts` along K (0 and 1: no split).
    pub tail: usize,
    pub parts: usize,
}

/// Tokens per CTA of the wgmma GEMM (the N of each warpgroup's wgmma: m64n256k16 or m64n128k16).
pub const SM90_WIDE_TOKENS: usize = 256;
pub const SM90_NARROW_TOKENS: usize = 128;

/// Inputs from which a product of a few hundred tokens still takes 256 tokens per CTA: its K
/// split into up to [`SM90_MAX_TAIL_SPLIT`] parts keeps each part long (at 256 and 512 tokens,
/// N 3072-5120, K 12288-15360: 10-32% faster than 128 tokens in twice as many CTAs, Nsight Compute
/// kernel times, docs/PERF.md session 22; at K = 3072 up to 39% slower).
pub const SM90_LONG_K: usize = 8192;

/// Tile widths between the two, for products whose 256-token tiles leave many SMs idle
/// (`kernels/nvfp4_sm90.cu` compiles them for the TMA form's whole tiles only: no K parts).
pub const SM90_FILL_TOKENS: [usize; 3] = [176, 208, 224];

/// The two base widths: the only ones compiled for every form and with K parts in a cluster.
pub fn sm90_base_width(bt: usize) -> bool {
    bt == SM90_NARROW_TOKENS || bt == SM90_WIDE_TOKENS
}

/// Every tile width the wgmma GEMM is compiled for.
pub fn sm90_tokens_compiled(bt: usize) -> bool {
    sm90_base_width(bt) || SM90_FILL_TOKENS.contains(&bt)
}

/// Tokens per CTA: 256 (more work per dequantized weight) when that still gives at least half as
/// many CTAs as SMs, or from 256 tokens when K is long ([`SM90_LONG_K`]), else 128 (measured on
/// an H200, docs/PERF.md); `forced` overrides it.
pub fn sm90_tokens_per_cta(sms: usize, m: usize, n: usize, k: usize, forced: Option<usize>) -> usize {
    if let Some(bt) = forced {
        return bt;
    }
    let ctas_wide = n.div_ceil(SM90_ROWS) * m.div_ceil(SM90_WIDE_TOKENS);
    if 2 * ctas_wide >= sms || (m >= SM90_WIDE_TOKENS && k >= SM90_LONG_K) {
        SM90_WIDE_TOKENS
    } else {
        SM90_NARROW_TOKENS
    }
}

/// The plan for `m` tokens, `n` features and `k` inputs on `sms` multiprocessors (one CTA per SM
/// at a time). The tiles left for a last wave, when that wave is at most half full, are split into
/// parts along K (as many as fill the SMs, up to [`SM90_MAX_TAIL_SPLIT`], and no more than let
/// every tile pair's cluster of parts be resident at once, `room`), so that wave takes a fraction
/// of a wave's time; `split_tail = false` keeps every tile whole. At M = 4608 and N = 3072 on an
/// H200 (132 SMs) 432 tiles leave 36, a last wave 27% full. A product of at most half a wave is all
/// "last wave": every tile is split (M = 256, N = 3072: 48 tiles in 2 parts).
///
/// With `fill` (the TMA form, which is compiled for [`SM90_FILL_TOKENS`]), a product left whole
/// at 256 tokens per CTA takes the narrowest of those widths that needs no more waves: the same
/// waves on more SMs. At 1024 tokens and N 3072 on an H200, 96 tiles of 256 tokens (73% of the
/// SMs, one wave) become 120 of 208 (91%). Each tile is shorter by less than its tokens: a K tile
/// costs ~900-990 cycles at 176-208 tokens against ~1050 at 256 (Nsight Compute, docs/PERF.md
/// session 31: 0.85-0.87x the kernel time at 176 tokens for 0.69x the tokens, 0.92-0.94x at 208), since
/// below 256 the K tile's work besides the tensor work (4 cycles per token) sets the pace: the
/// warps' own instruction streams and the copies (stall sampling, session 32); narrower widths
/// would gain nothing more. For the same reason the TMA form, from 256 tokens, takes 256
/// tokens split along K where the base rule takes 128, and where a split last wave follows
/// whole waves it takes a fill width instead when that is estimated cheaper (see the body).
#[allow(clippy::too_many_arguments)]
pub fn sm90_plan(
    m: usize,
    n: usize,
    k: usize,
    sms: usize,
    forced_tokens: Option<usize>,
    split_tail: bool,
    fill: bool,
    room: &ClusterRoom,
) -> Sm90Plan {
    let sms = sms.max(1);
    let mut tokens_per_cta = sm90_tokens_per_cta(sms, m, n, k, forced_tokens);
    // The TMA form (`fill`), from 256 tokens, where the base rule takes 128 (fewer 256-token
    // tiles than half the SMs): 256-token tiles split along K (their parts added inside a
    // cluster) fill the SMs as well and dequantize each weight tile for twice the tokens; taken
    // where they split and pad the tokens no more than 128 would. (The cp.async form's split
    // through global memory measured up to 39% slower at K = 3072, session 22.) A K tile
    // costs about the same at 128 tokens as at 256 (~960 against ~1050 cycles, Nsight Compute,
    // docs/PERF.md sessions 31-32); measured 5-16% faster on an H200 (256 x 3072x3072 and 5120x5120,
    // 512 x 3072x3072, session 32 call 3).
    if fill
        && forced_tokens.is_none()
        && split_tail
        && tokens_per_cta == SM90_NARROW_TOKENS
        && m >= SM90_WIDE_TOKENS
        && 2 * m.div_ceil(SM90_WIDE_TOKENS) == m.div_ceil(SM90_NARROW_TOKENS)
    {
        let wide = sm90_plan(m, n, k, sms, Some(SM90_WIDE_TOKENS), split_tail, fill, room);
        if wide.parts >= 2 {
            return wide;
        }
    }
    let feature_blocks = n.div_ceil(SM90_ROWS);
    let tiles_at = |bt: usize| feature_blocks * m.div_ceil(bt);
    let may_split = split_tail && sm90_base_width(tokens_per_cta);
    let base_tail = tiles_at(tokens_per_cta) % sms;
    let base_split = may_split && base_tail != 0 && 2 * base_tail <= sms;
    if fill && forced_tokens.is_none() && tokens_per_cta == SM90_WIDE_TOKENS && !base_split {
        let waves = tiles_at(SM90_WIDE_TOKENS).div_ceil(sms);
        if let Some(bt) = SM90_FILL_TOKENS.into_iter().find(|&bt| m >= bt && tiles_at(bt).div_ceil(sms) == waves) {
            tokens_per_cta = bt;
        }
    }
    let tiles = tiles_at(tokens_per_cta);
    let whole = Sm90Plan { tokens_per_cta, tiles, tail: 0, parts: 1 };
    let tail = tiles % sms;
    if !may_split || tail == 0 || 2 * tail > sms {
        return whole;
    }
    let most = (sms / tail).min(SM90_MAX_TAIL_SPLIT).min(k.div_ceil(SM90_K_TILE) / SM90_MIN_TAIL_KTILES);
    // A cluster that waits for another to finish would cost the split what it saves (measured on
    // an H200, docs/PERF.md session 29).
    let parts = (2..=most).rev().find(|&p| tail.div_ceil(2) <= room[p]).unwrap_or(1);
    if parts < 2 {
        return whole;
    }
    let split = Sm90Plan { tail, parts, ..whole };
    // Whole waves before a split last wave (TMA form): a fill width whose whole tiles take one
    // wave more can still cost less than the split wave, whose K parts' sums cost a fixed
    // ~9.5k cycles (the SM's traffic to other SMs: six ways of moving them measured no faster,
    // docs/PERF.md session 35) and which the driver's cluster room may hold to 2 parts. 4608 x
    // 3072x3072 on an H200: 3 waves of 256 tokens and 36 tiles in 2 parts, against 4 waves of
    // 224 tokens: measured 6-9% faster (session 35).
    if fill && forced_tokens.is_none() && tokens_per_cta == SM90_WIDE_TOKENS && tiles >= sms {
        let ktiles = k.div_ceil(SM90_K_TILE);
        let split_cost = sm90_est_cycles(&split, ktiles, sms);
        let best = SM90_FILL_TOKENS
            .into_iter()
            .filter(|&bt| m >= bt)
            .map(|bt| Sm90Plan { tokens_per_cta: bt, tiles: tiles_at(bt), tail: 0, parts: 1 })
            .map(|p| (sm90_est_cycles(&p, ktiles, sms), p))
            .min_by_key(|&(cost, _)| cost);
        // Only a clear gain: the model's costs are medians of measured ranges.
        if let Some((_, p)) = best.filter(|&(cost, _)| cost * SM90_FILL_GAIN_DEN < split_cost * SM90_FILL_GAIN_NUM) {
            return p;
        }
    }
    split
}

/// Cycles of one K tile per CTA by tile width (the main loop's median, phase marks of an H200,
/// docs/PERF.md session 34: 1063-1129 at 256 tokens, 936-952 at 208-224, 872 at 176; ~960 at 128,
/// Nsight Compute, sessions 31-32). Below 256 tokens a K tile costs more than its tensor work (4
/// cycles per token).
fn sm90_ktile_cycles(bt: usize) -> u64 {
    match bt {
        SM90_NARROW_TOKENS => 960,
        176 => 872,
        208 => 940,
        224 => 952,
        _ => 1081,
    }
}
/// A split unit's K-part sums (8.1-10.1k cycles whatever the parts, session 34) and a whole
/// unit's epilogue (0.9-2.4k, session 34 after the GELU-free branch).
const SM90_PART_SUM_CYCLES: u64 = 9_500;
const SM90_UNIT_STORE_CYCLES: u64 = 2_000;
/// A fill width replaces a split last wave only below 98% of its estimated cost.
const SM90_FILL_GAIN_NUM: u64 = 98;
const SM90_FILL_GAIN_DEN: u64 = 100;

/// Estimated cycles of the busiest SM for `plan` (K tiles `ktiles`, `sms` SMs, one CTA per SM):
/// its whole waves, then a split last wave's part (its share of K and the sums).
fn sm90_est_cycles(plan: &Sm90Plan, ktiles: usize, sms: usize) -> u64 {
    let per_ktile = sm90_ktile_cycles(plan.tokens_per_cta);
    let whole_unit = ktiles as u64 * per_ktile + SM90_UNIT_STORE_CYCLES;
    if plan.parts < 2 {
        return plan.tiles.div_ceil(sms) as u64 * whole_unit;
    }
    let full_waves = ((plan.tiles - plan.tail) / sms) as u64;
    full_waves * whole_unit + ktiles.div_ceil(plan.parts) as u64 * per_ktile + SM90_PART_SUM_CYCLES
}

#[cfg(test)]
mod tests {
    use super::*;

    /// H200 multiprocessors.
    const H200_SMS: usize = 132;

    #[test]
    fn flux_shapes_on_an_h200() {
        let room = ideal_cluster_room(H200_SMS);
        // Single blocks' output projection (K 15360) and the square 3072 products at 4608 tokens:
        // 432 tiles, 36 left after 3 waves, split in 3 (108 CTAs).
        for k in [3072, 12288, 15360] {
            let p = sm90_plan(4608, 3072, k, H200_SMS, None, true, false, &room);
            assert_eq!(p, Sm90Plan { tokens_per_cta: 256, tiles: 432, tail: 36, parts: 3 }, "K = {k}");
        }
        // 4096 image tokens (double blocks): 384 tiles, a last wave 91% full: no split.
        assert_eq!(sm90_plan(4096, 3072, 3072, H200_SMS, None, true, false, &room).parts, 1);
        // QKV (N 9216) at 4608: 1296 tiles, 108 left (82% full): no split.
        assert_eq!(sm90_plan(4608, 9216, 3072, H200_SMS, None, true, false, &room).parts, 1);
        // Off when asked.
        assert_eq!(sm90_plan(4608, 3072, 3072, H200_SMS, None, false, false, &room).parts, 1);
        // At most half a wave: every tile split. 256 tokens, N 3072, K 3072: 48 tiles of 128
        // tokens in 2 parts (96 CTAs) in the cp.async form; the 512 text tokens of the context
        // embedder (96 tiles, 73% of a wave) stay whole.
        assert_eq!(
            sm90_plan(256, 3072, 3072, H200_SMS, None, true, false, &room),
            Sm90Plan { tokens_per_cta: 128, tiles: 48, tail: 48, parts: 2 }
        );
        assert_eq!(sm90_plan(512, 3072, 4096, H200_SMS, None, true, false, &room).parts, 1);
        // The TMA form takes 256 tokens split along K instead: 24 tiles in 4 parts (96 CTAs);
        // 48 in 2 parts at 512 tokens; 40 in 3 (120 CTAs) at 256 tokens, N 5120, K 5120, not 80
        // whole tiles of 128.
        let tma = |m, n, k| sm90_plan(m, n, k, H200_SMS, None, true, true, &room);
        assert_eq!(tma(256, 3072, 3072), Sm90Plan { tokens_per_cta: 256, tiles: 24, tail: 24, parts: 4 });
        assert_eq!(tma(512, 3072, 4096), Sm90Plan { tokens_per_cta: 256, tiles: 48, tail: 48, parts: 2 });
        assert_eq!(tma(256, 5120, 5120), Sm90Plan { tokens_per_cta: 256, tiles: 40, tail: 40, parts: 3 });
        // It keeps 128 where 256 would pad more (300 tokens: 512 padded against 384), where the
        // tiles are kept whole, and where K is too short to split (4 K tiles).
        assert_eq!(tma(300, 3072, 3072).tokens_per_cta, 128);
        assert_eq!(sm90_plan(512, 3072, 3072, H200_SMS, None, false, true, &room).tokens_per_cta, 128);
        assert_eq!(tma(256, 3072, 256).tokens_per_cta, 128);
        // Long K (a rank's text-stream MLP down projection, 256 tokens, K 12288): 24 tiles of 256
        // tokens in 4 parts of 48 K tiles (96 CTAs), not 48 of 128 in 2.
        assert_eq!(
            sm90_plan(256, 3072, 12288, H200_SMS, None, true, false, &room),
            Sm90Plan { tokens_per_cta: 256, tiles: 24, tail: 24, parts: 4 }
        );
        // Below 256 tokens the rule is unchanged (a 256-token tile would be mostly empty).
        assert_eq!(sm90_plan(200, 3072, 12288, H200_SMS, None, true, false, &room).tokens_per_cta, 128);
        // Too few K tiles to split: K = 192 is 3 tiles.
        assert_eq!(sm90_plan(4608, 3072, 192, H200_SMS, None, true, false, &room).parts, 1);
    }

    #[test]
    fn parts_whose_clusters_do_not_fit_at_once_are_fewer() {
        // 4608 tokens, N 3072: 36 split tiles, 18 clusters. The ideal H200 holds 22 clusters of
        // 6 CTAs: 3 parts. A GPU holding only 16 clusters of 6 takes 2 parts (18 clusters of 4), and
        // one holding too few of any size keeps the tiles whole.
        let mut room = ideal_cluster_room(H200_SMS);
        assert_eq!(sm90_plan(4608, 3072, 15360, H200_SMS, None, true, false, &room).parts, 3);
        room[3] = 16;
        let p = sm90_plan(4608, 3072, 15360, H200_SMS, None, true, false, &room);
        assert_eq!((p.tail, p.parts), (36, 2));
        room[2] = 17;
        assert_eq!(sm90_plan(4608, 3072, 15360, H200_SMS, None, true, false, &room).parts, 1);
        // Every plan's clusters fit in the room it was given.
        for m in [256, 512, 1024, 2304, 4608] {
            for (n, k) in [(3072, 3072), (3072, 15360), (5120, 13824), (9216, 3072)] {
                let room = ideal_cluster_room(H200_SMS);
                let p = sm90_plan(m, n, k, H200_SMS, None, true, false, &room);
                assert!(p.parts < 2 || p.tail.div_ceil(2) <= room[p.parts], "{m} x {n} x {k}: {p:?}");
            }
        }
    }

    #[test]
    fn split_parts_fill_at_most_the_sms() {
        for tiles_m in [300, 517, 1000, 4608, 9000] {
            for n in [128, 640, 3072, 5120] {
                for sms in [4, 7, 114, 132] {
                    let room = ideal_cluster_room(sms);
                    let p = sm90_plan(tiles_m, n, 4096, sms, None, true, false, &room);
                    assert!(p.tail * p.parts <= sms, "{p:?} on {sms} SMs");
                    assert!(p.parts <= SM90_MAX_TAIL_SPLIT);
                    if p.parts > 1 {
                        assert!(2 * p.tail <= sms && (p.tiles >= sms || p.tail == p.tiles), "{p:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn fill_widths_on_an_h200() {
        let room = ideal_cluster_room(H200_SMS);
        let plan = |m, n, k, fill| sm90_plan(m, n, k, H200_SMS, None, true, fill, &room);
        // One wave either way: 96 tiles of 256 tokens -> 120 of 208 (1024 tokens, N 3072, any K
        // the base rule leaves at 256), 80 -> 120 of 176 (512 tokens, N 5120).
        for k in [3072, 12288, 15360] {
            assert_eq!(plan(1024, 3072, k, false), Sm90Plan { tokens_per_cta: 256, tiles: 96, tail: 0, parts: 1 });
            assert_eq!(plan(1024, 3072, k, true), Sm90Plan { tokens_per_cta: 208, tiles: 120, tail: 0, parts: 1 });
        }
        assert_eq!(plan(512, 5120, 5120, true), Sm90Plan { tokens_per_cta: 176, tiles: 120, tail: 0, parts: 1 });
        // Two waves: 216 tiles -> 264 of 224 (2304 tokens, N 3072).
        assert_eq!(plan(2304, 3072, 3072, true), Sm90Plan { tokens_per_cta: 224, tiles: 264, tail: 0, parts: 1 });
        // Unchanged where a narrower width needs another wave or the base plan splits: FLUX's
        // 4096 image tokens (384 tiles, 3 waves; 456 of 224 would take 4), its 4608 (split), and
        // Wan2.2 A14B's 32760 tokens at N 5120.
        assert_eq!(plan(4096, 3072, 3072, true).tokens_per_cta, 256);
        assert_eq!(plan(4608, 3072, 3072, true), plan(4608, 3072, 3072, false));
        assert_eq!(plan(32760, 5120, 5120, true).tokens_per_cta, 256);
        // Nor where the base rule takes 128 tokens (256 split along K there instead).
        assert_eq!(plan(512, 3072, 3072, true), Sm90Plan { tokens_per_cta: 256, tiles: 48, tail: 48, parts: 2 });
        // A forced width is kept, and widths other than 128 and 256 are never split.
        let forced = sm90_plan(4608, 3072, 3072, H200_SMS, Some(208), true, true, &room);
        assert_eq!(forced, Sm90Plan { tokens_per_cta: 208, tiles: 552, tail: 0, parts: 1 });
    }

    /// The cluster room the H200's driver reports (`doctor`, docs/PERF.md session 29): 30 clusters
    /// of 4 CTAs, 17 of 6, 15 of 8.
    const H200_DRIVER_ROOM: ClusterRoom = [0, 0, 30, 17, 15];

    #[test]
    fn a_split_last_wave_gives_way_to_a_fill_width_where_it_costs_more() {
        let plan = |m, n, k, fill| sm90_plan(m, n, k, H200_SMS, None, true, fill, &H200_DRIVER_ROOM);
        // 4608 x 3072x3072: 36 tiles left after 3 waves, 18 clusters of 6 do not fit (17): 2 parts,
        // estimated 197k cycles; 504 tiles of 224 tokens in 4 waves, 191k (measured 6-9% faster).
        assert_eq!(plan(4608, 3072, 3072, false), Sm90Plan { tokens_per_cta: 256, tiles: 432, tail: 36, parts: 2 });
        assert_eq!(plan(4608, 3072, 3072, true), Sm90Plan { tokens_per_cta: 224, tiles: 504, tail: 0, parts: 1 });
        // Long K hides the sums: the split stays (15360x3072: within 0.2%, measured within 2%).
        for k in [12288, 15360] {
            assert_eq!(plan(4608, 3072, k, true), plan(4608, 3072, k, false), "K = {k}");
        }
        // A fill width that needs two more waves loses (4608 x 5120x5120: 7 waves of 224 against
        // 5 and a split sixth; measured 6-14% slower).
        assert_eq!(plan(4608, 5120, 5120, true), plan(4608, 5120, 5120, false));
        // With room for 3 parts the split wave is shorter and stays.
        let ideal = ideal_cluster_room(H200_SMS);
        assert_eq!(sm90_plan(4608, 3072, 3072, H200_SMS, None, true, true, &ideal).parts, 3);
        // Products that are all last wave keep their split (no whole wave to compare with).
        assert_eq!(plan(256, 3072, 3072, true).parts, 4);
    }

    #[test]
    fn tma_plans_never_add_a_wave_or_pad_more() {
        for sms in [4, 7, 114, 132] {
            let room = ideal_cluster_room(sms);
            for m in [176, 300, 512, 777, 1024, 2304, 4096, 4608, 9000] {
                for n in [128, 640, 3072, 5120, 9216] {
                    for k in [256, 3072, 12288] {
                        let base = sm90_plan(m, n, k, sms, None, true, false, &room);
                        let fill = sm90_plan(m, n, k, sms, None, true, true, &room);
                        assert!(sm90_tokens_compiled(fill.tokens_per_cta), "{fill:?}");
                        if fill != base && base.tokens_per_cta == SM90_NARROW_TOKENS {
                            // 256 tokens split along K instead of 128: every tile split, no
                            // more tokens padded, at most one wave.
                            assert_eq!(fill.tokens_per_cta, SM90_WIDE_TOKENS, "{m} x {n} x {k} on {sms}");
                            assert!(fill.parts >= 2 && fill.tail == fill.tiles && fill.tiles * fill.parts <= sms);
                            assert_eq!(2 * m.div_ceil(SM90_WIDE_TOKENS), m.div_ceil(SM90_NARROW_TOKENS));
                        } else if fill != base && base.parts >= 2 {
                            // A split last wave replaced by whole tiles of a fill width: only
                            // after whole waves, and where the estimate is lower.
                            assert_eq!(base.tokens_per_cta, SM90_WIDE_TOKENS, "{m} x {n} x {k} on {sms}");
                            assert!(SM90_FILL_TOKENS.contains(&fill.tokens_per_cta) && fill.parts == 1);
                            assert!(base.tiles >= sms && fill.tokens_per_cta <= m, "{m} x {n} x {k} on {sms}");
                            let kt = k.div_ceil(SM90_K_TILE);
                            assert!(sm90_est_cycles(&fill, kt, sms) < sm90_est_cycles(&base, kt, sms));
                        } else if fill != base {
                            assert_eq!(base.tokens_per_cta, SM90_WIDE_TOKENS, "{m} x {n} x {k} on {sms}");
                            assert!(SM90_FILL_TOKENS.contains(&fill.tokens_per_cta) && fill.tokens_per_cta <= m);
                            assert_eq!((base.parts, fill.parts), (1, 1), "{m} x {n} x {k} on {sms}");
                            assert_eq!(fill.tiles.div_ceil(sms), base.tiles.div_ceil(sms), "{m} x {n} x {k} on {sms}");
                            assert!(fill.tiles >= base.tiles);
                        }
                    }
                }
            }
        }
    }

    /// `doctor` checks the split path by planning its standard problems for a GPU of 4 SMs
    /// (`cuda::with_sm90_policy_sms`): some of the products the GEMM (not the GEMV) runs must then
    /// be split, with whole tiles before them.
    #[test]
    fn doctor_problems_reach_the_split_path() {
        const DOCTOR_PLAN_SMS: usize = 4;
        let problems = crate::doctor::Problem::standard_set(0, 4).expect("problems");
        let split: Vec<String> = problems
            .iter()
            .filter(|p| p.m > SM90_GEMV_MAX_M)
            .filter(|p| {
                let plan = sm90_plan(p.m, p.n, p.k, DOCTOR_PLAN_SMS, None, true, false, &ideal_cluster_room(H200_SMS));
                plan.parts > 1 && plan.tiles > plan.tail
            })
            .map(|p| p.label.clone())
            .collect();
        assert!(!split.is_empty(), "no doctor problem takes the split path");
        // The TMA form's plan (fill widths, which may keep a split wave's tiles whole) still
        // splits some of them: its K parts' sums in a cluster are checked too.
        let tma_split = problems.iter().filter(|p| p.m > SM90_GEMV_MAX_M).any(|p| {
            let plan = sm90_plan(p.m, p.n, p.k, DOCTOR_PLAN_SMS, None, true, true, &ideal_cluster_room(H200_SMS));
            plan.parts > 1 && plan.tiles > plan.tail
        });
        assert!(tma_split, "no doctor problem takes the TMA form's split path");
    }

    /// On an H200 some standard problem takes 256 tokens split along K where the base rule (the
    /// cp.async form's plan, `doctor`'s reference for that form) takes 128.
    #[test]
    fn doctor_problems_reach_the_wide_split() {
        let room = ideal_cluster_room(H200_SMS);
        let problems = crate::doctor::Problem::standard_set(0, 0).expect("problems");
        let wide = problems.iter().filter(|p| p.m > SM90_GEMV_MAX_M).any(|p| {
            let base = sm90_plan(p.m, p.n, p.k, H200_SMS, None, true, false, &room);
            let tma = sm90_plan(p.m, p.n, p.k, H200_SMS, None, true, true, &room);
            base.tokens_per_cta == SM90_NARROW_TOKENS && tma.tokens_per_cta == SM90_WIDE_TOKENS && tma.parts > 1
        });
        assert!(wide, "no doctor problem takes 256 tokens split along K");
    }
}
