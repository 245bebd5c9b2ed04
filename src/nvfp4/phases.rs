//! The phase marks of the Hopper wgmma W4A16 GEMM's TMA form (`kernels/nvfp4_sm90.cu`,
//! `PhaseMarks`), written only by profiling builds (the cargo feature `sm90-phases`, which compiles
//! the kernel with `CANDIFF_SM90_PHASES`) and read by `candiff bench gemm --phases`.
//!
//! Nsight Compute's stall sampling says on what the warps wait, not when: these marks split each
//! CTA's time into its set-up, each unit's fill (until its first stage landed), main loop, and
//! sums or store, count the cycles the consumers waited on the copies and the producer on the
//! consumers, and place every CTA's start and end on one timeline (`%globaltimer`) to show how much
//! of the kernel the SMs sit idle at its end (the last wave). Plain arithmetic on the words the
//! kernel wrote, so it is tested without a GPU.

/// Records in the log (`kPhaseCtas`): the first half for the CTAs of a launch from tile 0, the
/// second for those of the launch of a product's split last tiles (when the product also has whole
/// tiles, a second launch after the first); a larger grid's further CTAs are not recorded.
pub const PHASE_CTAS: usize = 1024;
/// Units recorded per CTA (`kPhaseUnits`).
pub const PHASE_UNITS: usize = 16;
/// Words of a CTA's header (`kPhaseHeaderWords`) and of each unit (`kPhaseUnitWords`).
pub const PHASE_HEADER_WORDS: usize = 8;
pub const PHASE_UNIT_WORDS: usize = 8;
/// Words of one CTA's record.
pub const PHASE_CTA_WORDS: usize = PHASE_HEADER_WORDS + PHASE_UNITS * PHASE_UNIT_WORDS;
/// The kernel's log symbol (`extern "C"`), `PHASE_CTAS * PHASE_CTA_WORDS` u64 words.
pub const PHASE_SYMBOL: &str = "candiff_sm90_phases";

// Header words (the kernel's `PhaseHeader`).
const HEAD_SM: usize = 0;
const HEAD_NS_IN: usize = 1;
const HEAD_IN: usize = 2;
const HEAD_SET_UP: usize = 3;
const HEAD_OUT: usize = 4;
const HEAD_NS_OUT: usize = 5;
const HEAD_UNITS: usize = 6;
const HEAD_SHAPE: usize = 7;
// Unit words (the kernel's `PhaseWord`).
const UNIT_START: usize = 0;
const UNIT_FIRST: usize = 1;
const UNIT_LOOP: usize = 2;
const UNIT_STORE: usize = 3;
const UNIT_FULL_WAIT: usize = 4;
const UNIT_TILES: usize = 5;
const UNIT_EMPTY_WAIT: usize = 6;
const UNIT_ISSUED: usize = 7;

/// One unit (tile, or tile and K part) of one CTA, in that SM's clock cycles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UnitMarks {
    /// The consumers began the unit.
    pub start: u64,
    /// Its first stage (weights, scales and activations of its first K tile) had landed.
    pub first: u64,
    /// Its last wgmma completed.
    pub main_end: u64,
    /// Its sums were added (K parts) or its store issued.
    pub store_end: u64,
    /// Cycles consumer thread 0 waited for stages to land, over the unit's K tiles.
    pub full_wait: u64,
    /// K tiles of the unit.
    pub k_tiles: u32,
    /// The output tile (feature block + token block x feature blocks).
    pub tile: u32,
    /// Cycles the producer waited for the consumers to free a stage while issuing this unit.
    pub empty_wait: u64,
    /// The producer issued the unit's last copy.
    pub issued: u64,
}

/// One CTA's record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CtaMarks {
    /// blockIdx.x.
    pub cta: usize,
    /// The launch's first tile (0, or the first split tile of a product that has whole ones).
    pub first_tile: u32,
    pub sm: u32,
    /// `%globaltimer` (ns) at entry and exit.
    pub ns_in: u64,
    pub ns_out: u64,
    /// Clock at entry, after the barriers' set-up, at exit.
    pub clk_in: u64,
    pub clk_set_up: u64,
    pub clk_out: u64,
    /// Tokens per CTA, K parts per tile pair, pipeline stages.
    pub tokens: u32,
    pub k_parts: u32,
    pub stages: u32,
    /// Units the CTA ran (more than [`PHASE_UNITS`]: only the first ones are in `units`).
    pub units_run: usize,
    pub units: Vec<UnitMarks>,
}

/// Why a log cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhaseLogError {
    #[error("the phase log holds {found} words, expected a multiple of {PHASE_CTA_WORDS} (one record per CTA)")]
    Size { found: usize },
    #[error("CTA {cta}: {what} (the log is not what this build's kernel writes: rebuild both with the same sources)")]
    Order { cta: usize, what: String },
    #[error(
        "no CTA left marks: the last launch was not the TMA form of the wgmma GEMM (M <= 16 runs the GEMV; \
         CANDIFF_SM90_TMA=0 or an unaligned input runs the cp.async form)"
    )]
    Empty,
}

/// The CTAs that ran (a zeroed record, entry time 0, did not) from the raw log.
pub fn parse(words: &[u64]) -> Result<Vec<CtaMarks>, PhaseLogError> {
    if !words.len().is_multiple_of(PHASE_CTA_WORDS) {
        return Err(PhaseLogError::Size { found: words.len() });
    }
    let mut ctas = Vec::new();
    for (index, rec) in words.chunks_exact(PHASE_CTA_WORDS).enumerate() {
        if rec[HEAD_NS_IN] == 0 {
            continue;
        }
        let cta = index % (PHASE_CTAS / 2);
        let order = |what: &str| PhaseLogError::Order { cta, what: what.to_string() };
        let units_run = rec[HEAD_UNITS] as usize;
        let mut units = Vec::new();
        for u in 0..units_run.min(PHASE_UNITS) {
            let w = &rec[PHASE_HEADER_WORDS + u * PHASE_UNIT_WORDS..][..PHASE_UNIT_WORDS];
            let m = UnitMarks {
                start: w[UNIT_START],
                first: w[UNIT_FIRST],
                main_end: w[UNIT_LOOP],
                store_end: w[UNIT_STORE],
                full_wait: w[UNIT_FULL_WAIT],
                k_tiles: w[UNIT_TILES] as u32,
                tile: (w[UNIT_TILES] >> 32) as u32,
                empty_wait: w[UNIT_EMPTY_WAIT],
                issued: w[UNIT_ISSUED],
            };
            if !(m.start <= m.first && m.first <= m.main_end && m.main_end <= m.store_end) {
                return Err(order(&format!("unit {u}'s marks are out of order: {m:?}")));
            }
            if m.full_wait > m.main_end - m.start {
                return Err(order(&format!("unit {u} waited {} cycles in {}", m.full_wait, m.main_end - m.start)));
            }
            units.push(m);
        }
        let (clk_in, clk_set_up, clk_out) = (rec[HEAD_IN], rec[HEAD_SET_UP], rec[HEAD_OUT]);
        let first_start = units.first().map_or(clk_out, |u| u.start);
        let last_end = units.last().map_or(clk_set_up, |u| u.store_end);
        if !(clk_in <= clk_set_up && clk_set_up <= first_start && last_end <= clk_out) {
            return Err(order("the header's clocks do not enclose the units"));
        }
        if rec[HEAD_NS_OUT] < rec[HEAD_NS_IN] {
            return Err(order("it left before it entered"));
        }
        let shape = rec[HEAD_SHAPE];
        ctas.push(CtaMarks {
            cta,
            first_tile: (shape >> 32) as u32,
            sm: rec[HEAD_SM] as u32,
            ns_in: rec[HEAD_NS_IN],
            ns_out: rec[HEAD_NS_OUT],
            clk_in,
            clk_set_up,
            clk_out,
            tokens: (shape & 0xffff) as u32,
            k_parts: ((shape >> 16) & 0xff) as u32,
            stages: ((shape >> 24) & 0xff) as u32,
            units_run,
            units,
        });
    }
    if ctas.is_empty() {
        return Err(PhaseLogError::Empty);
    }
    Ok(ctas)
}

/// The CTAs of each launch (by first tile, in launch order).
pub fn by_launch(ctas: &[CtaMarks]) -> Vec<Vec<CtaMarks>> {
    let mut firsts: Vec<u32> = ctas.iter().map(|c| c.first_tile).collect();
    firsts.sort_unstable();
    firsts.dedup();
    firsts.iter().map(|&f| ctas.iter().filter(|c| c.first_tile == f).cloned().collect()).collect()
}

/// Median and largest of a sample.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Spread {
    pub median: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Option<Self> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) };
        Some(Self { median, max: v[n - 1] })
    }
}

/// One launch, summed up over its CTAs. Shares are of a CTA's own cycles (entry to exit);
/// cycles per K tile are those of the main loop after the first stage landed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PhaseSummary {
    /// The launch's first tile.
    pub first_tile: u32,
    pub ctas: usize,
    /// Distinct SMs the CTAs ran on.
    pub sms: usize,
    pub tokens: u32,
    pub k_parts: u32,
    pub stages: u32,
    /// First entry to last exit on the global timer.
    pub kernel_ns: u64,
    /// Last entry minus first entry (CTAs that start late: a second wave, or launch skew).
    pub entry_skew_ns: u64,
    /// SM clock in GHz (cycles over ns between each CTA's entry and exit).
    pub clock_ghz: Spread,
    /// Shares of a CTA's cycles: barrier set-up, units' fill (start to first stage landed), main
    /// loops, sums or stores, and the rest (between units, the final cluster barrier).
    pub set_up: Spread,
    pub fill: Spread,
    pub main: Spread,
    pub store: Spread,
    pub other: Spread,
    /// Cycles per K tile of the main loop, per unit.
    pub per_k_tile: Spread,
    /// Share of the main loop (start to end) the consumers waited for stages.
    pub full_wait: Spread,
    /// Share of its issuing the producer waited for free stages (per unit: from the unit's start
    /// to its last copy).
    pub empty_wait: Spread,
    /// Fill of the first unit in cycles (a CTA's pipeline starts empty; later units' stages were
    /// issued during the previous unit).
    pub first_fill_cycles: Spread,
    /// Sums or store per unit, cycles.
    pub store_cycles: Spread,
    /// Of all the SMs' time over the kernel (CTAs x kernel_ns), the part after each CTA's exit:
    /// SMs idle at the end while the last CTAs finish.
    pub idle_at_end: f64,
    /// CTAs that ran more units than were recorded.
    pub truncated: usize,
}

/// Sums up one launch's CTAs (one of [`by_launch`]'s groups, not empty).
pub fn summarize(ctas: &[CtaMarks]) -> PhaseSummary {
    let first_in = ctas.iter().map(|c| c.ns_in).min().unwrap_or(0);
    let last_in = ctas.iter().map(|c| c.ns_in).max().unwrap_or(0);
    let last_out = ctas.iter().map(|c| c.ns_out).max().unwrap_or(0);
    let kernel_ns = last_out - first_in;
    let mut sms: Vec<u32> = ctas.iter().map(|c| c.sm).collect();
    sms.sort_unstable();
    sms.dedup();
    let (mut ghz, mut set_up, mut fill, mut main, mut store, mut other) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut per_k, mut full_wait, mut empty_wait, mut first_fill, mut store_cycles) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut idle_ns = 0u64;
    for c in ctas {
        let total = (c.clk_out - c.clk_in).max(1) as f64;
        let ns = c.ns_out - c.ns_in;
        if ns > 0 {
            ghz.push((c.clk_out - c.clk_in) as f64 / ns as f64);
        }
        let (mut f, mut m, mut s) = (0u64, 0u64, 0u64);
        for (i, u) in c.units.iter().enumerate() {
            f += u.first - u.start;
            m += u.main_end - u.first;
            s += u.store_end - u.main_end;
            if i == 0 {
                first_fill.push((u.first - u.start) as f64);
            }
            if u.k_tiles > 0 {
                per_k.push((u.main_end - u.first) as f64 / u.k_tiles as f64);
            }
            let span = u.main_end - u.start;
            if span > 0 {
                full_wait.push(u.full_wait as f64 / span as f64);
            }
            // The producer issues a unit from the previous unit's last copy (or the set-up).
            let issue_from = if i == 0 { c.clk_set_up } else { c.units[i - 1].issued };
            if u.issued > issue_from {
                empty_wait.push(u.empty_wait as f64 / (u.issued - issue_from) as f64);
            }
            store_cycles.push((u.store_end - u.main_end) as f64);
        }
        let su = c.clk_set_up - c.clk_in;
        set_up.push(su as f64 / total);
        fill.push(f as f64 / total);
        main.push(m as f64 / total);
        store.push(s as f64 / total);
        other.push((total - (su + f + m + s) as f64).max(0.0) / total);
        idle_ns += last_out - c.ns_out;
    }
    let spread = |v: Vec<f64>| Spread::of(v).unwrap_or(Spread { median: f64::NAN, max: f64::NAN });
    PhaseSummary {
        first_tile: ctas[0].first_tile,
        ctas: ctas.len(),
        sms: sms.len(),
        tokens: ctas[0].tokens,
        k_parts: ctas[0].k_parts,
        stages: ctas[0].stages,
        kernel_ns,
        entry_skew_ns: last_in - first_in,
        clock_ghz: spread(ghz),
        set_up: spread(set_up),
        fill: spread(fill),
        main: spread(main),
        store: spread(store),
        other: spread(other),
        per_k_tile: spread(per_k),
        full_wait: spread(full_wait),
        empty_wait: spread(empty_wait),
        first_fill_cycles: spread(first_fill),
        store_cycles: spread(store_cycles),
        idle_at_end: if kernel_ns == 0 { 0.0 } else { idle_ns as f64 / (ctas.len() as f64 * kernel_ns as f64) },
        truncated: ctas.iter().filter(|c| c.units_run > PHASE_UNITS).count(),
    }
}

/// The raw log as little-endian bytes (as copied from the GPU) to words.
pub fn words_of(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the kernel writes it: header values, then units as
    /// (start, first, loop, store, full wait, k tiles, tile, empty wait, issued).
    fn record(head: [u64; 8], units: &[[u64; 9]]) -> Vec<u64> {
        let mut r = vec![0u64; PHASE_CTA_WORDS];
        r[..8].copy_from_slice(&head);
        for (i, u) in units.iter().enumerate() {
            let w = &mut r[PHASE_HEADER_WORDS + i * PHASE_UNIT_WORDS..][..PHASE_UNIT_WORDS];
            w[..5].copy_from_slice(&u[..5]);
            w[5] = u[5] | (u[6] << 32);
            w[6] = u[7];
            w[7] = u[8];
        }
        r
    }

    const SHAPE_256_KS1_S5: u64 = 256 | (1 << 16) | (5 << 24);

    /// Two CTAs on two SMs, 1 GHz (cycles = ns), the log of a 4-CTA grid (two never ran).
    fn two_ctas() -> Vec<u64> {
        // CTA 0: enters at 1000 ns, set-up 100 cycles, two units of 10 K tiles, exits at 3000 ns.
        let a = record(
            [7, 1000, 50_000, 50_100, 52_000, 3000, 2, SHAPE_256_KS1_S5],
            &[
                [50_100, 50_400, 51_400, 51_500, 500, 10, 3, 0, 50_900],
                [51_500, 51_520, 51_920, 51_980, 20, 10, 5, 100, 51_700],
            ],
        );
        // CTA 1: enters at 1200 ns, one unit, exits at 2000 ns (idle for the last 1000 ns).
        let b = record(
            [9, 1200, 9_000, 9_100, 9_800, 2000, 1, SHAPE_256_KS1_S5],
            &[[9_100, 9_300, 9_700, 9_750, 300, 4, 4, 0, 9_500]],
        );
        let mut log = vec![0u64; 4 * PHASE_CTA_WORDS];
        log[..PHASE_CTA_WORDS].copy_from_slice(&a);
        log[2 * PHASE_CTA_WORDS..3 * PHASE_CTA_WORDS].copy_from_slice(&b);
        log
    }

    #[test]
    fn parse_skips_ctas_that_did_not_run() {
        let ctas = parse(&two_ctas()).unwrap();
        assert_eq!(ctas.iter().map(|c| c.cta).collect::<Vec<_>>(), [0, 2]);
        assert_eq!((ctas[0].sm, ctas[0].tokens, ctas[0].k_parts, ctas[0].stages), (7, 256, 1, 5));
        assert_eq!(
            ctas[0].units[1],
            UnitMarks {
                start: 51_500,
                first: 51_520,
                main_end: 51_920,
                store_end: 51_980,
                full_wait: 20,
                k_tiles: 10,
                tile: 5,
                empty_wait: 100,
                issued: 51_700,
            }
        );
        assert_eq!(ctas[1].units.len(), 1);
    }

    #[test]
    fn summary_of_two_ctas() {
        let s = summarize(&parse(&two_ctas()).unwrap());
        assert_eq!((s.ctas, s.sms, s.kernel_ns, s.entry_skew_ns), (2, 2, 2000, 200));
        // CTA 0: 2000 cycles in 2000 ns; CTA 1: 800 in 800.
        assert_eq!(s.clock_ghz, Spread { median: 1.0, max: 1.0 });
        // CTA 0: set-up 100, fill 300 + 20, main 1000 + 400, store 100 + 60 of 2000 (other 20);
        // CTA 1: set-up 100, fill 200, main 400, store 50 of 800 (other 50).
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(s.set_up.median, (0.05 + 0.125) / 2.0) && close(s.set_up.max, 0.125));
        assert!(close(s.fill.median, (0.16 + 0.25) / 2.0));
        assert!(close(s.main.median, (0.7 + 0.5) / 2.0));
        assert!(close(s.store.median, (0.08 + 0.0625) / 2.0));
        assert!(close(s.other.median, (0.01 + 0.0625) / 2.0));
        // Per K tile: 1000 / 10, 400 / 10, 400 / 4.
        assert_eq!(s.per_k_tile, Spread { median: 100.0, max: 100.0 });
        // Full waits: 500 of 1300, 20 of 420, 300 of 600.
        assert!(close(s.full_wait.median, 500.0 / 1300.0) && close(s.full_wait.max, 0.5));
        // The producer: 0 of 800 (set-up to first issue end), 100 of 800, 0 of 400.
        assert!(close(s.empty_wait.median, 0.0) && close(s.empty_wait.max, 0.125));
        assert_eq!(s.first_fill_cycles, Spread { median: 250.0, max: 300.0 });
        assert_eq!(s.store_cycles, Spread { median: 60.0, max: 100.0 });
        // Idle at the end: CTA 1 leaves 1000 ns before the last exit, of 2 x 2000 ns.
        assert!(close(s.idle_at_end, 0.25));
        assert_eq!(s.truncated, 0);
    }

    #[test]
    fn a_split_tail_launch_is_a_launch_of_its_own() {
        let mut log = two_ctas();
        // CTA 0 of the split last tiles' launch (from tile 40, K in 3 parts), in the second half.
        let shape = 256 | (3 << 16) | (6 << 24) | (40 << 32);
        let tail = record(
            [11, 3100, 70_000, 70_100, 71_000, 4000, 1, shape],
            &[[70_100, 70_300, 70_800, 70_900, 100, 6, 40, 0, 70_500]],
        );
        log.extend(vec![0; (PHASE_CTAS / 2 - 4) * PHASE_CTA_WORDS]);
        log.extend(tail);
        log.extend(vec![0; (PHASE_CTAS / 2 - 1) * PHASE_CTA_WORDS]);
        let ctas = parse(&log).unwrap();
        let launches = by_launch(&ctas);
        assert_eq!(
            launches.iter().map(|l| l.iter().map(|c| c.cta).collect::<Vec<_>>()).collect::<Vec<_>>(),
            [vec![0, 2], vec![0]]
        );
        let s = summarize(&launches[1]);
        assert_eq!((s.first_tile, s.ctas, s.tokens, s.k_parts, s.stages, s.kernel_ns), (40, 1, 256, 3, 6, 900));
        assert_eq!(summarize(&launches[0]).kernel_ns, 2000);
    }

    #[test]
    fn bad_logs_are_errors_that_say_why() {
        assert_eq!(parse(&[0; 5]), Err(PhaseLogError::Size { found: 5 }));
        assert_eq!(parse(&vec![0; 2 * PHASE_CTA_WORDS]), Err(PhaseLogError::Empty));
        // A unit whose loop ends before its first stage landed.
        let r = record([1, 10, 100, 110, 900, 20, 1, SHAPE_256_KS1_S5], &[[200, 300, 250, 400, 0, 4, 0, 0, 300]]);
        let e = parse(&r).unwrap_err();
        assert!(matches!(&e, PhaseLogError::Order { cta: 0, what } if what.contains("out of order")), "{e}");
        // Units outside the header's clocks.
        let r = record([1, 10, 100, 110, 300, 20, 1, SHAPE_256_KS1_S5], &[[200, 300, 350, 400, 0, 4, 0, 0, 300]]);
        assert!(matches!(parse(&r), Err(PhaseLogError::Order { cta: 0, .. })));
    }

    /// The kernel's constants and word orders, read from its source: a reader that drifted from
    /// the writer would sum up the wrong words without any error.
    #[test]
    fn the_kernel_writes_the_layout_read_here() {
        let src = include_str!("../../kernels/nvfp4_sm90.cu");
        let constant = |name: &str| -> usize {
            let at =
                src.find(&format!("constexpr int {name} = ")).unwrap_or_else(|| panic!("{name} not in the kernel"));
            let rest = &src[at..];
            let value = &rest[rest.find('=').unwrap() + 1..rest.find(';').unwrap()];
            value.trim().parse().unwrap_or_else(|e| panic!("{name} = {value}: {e}"))
        };
        assert_eq!(constant("kPhaseCtas"), PHASE_CTAS);
        assert_eq!(constant("kPhaseUnits"), PHASE_UNITS);
        assert_eq!(constant("kPhaseHeaderWords"), PHASE_HEADER_WORDS);
        assert_eq!(constant("kPhaseUnitWords"), PHASE_UNIT_WORDS);
        // Each enum's items, in order, against the words read here (and no more of them).
        let words_in_order = |name: &str, words: &[(&str, usize)], count: usize| {
            let at = src.find(&format!("enum {name} {{")).unwrap_or_else(|| panic!("enum {name} not in the kernel"));
            let body = &src[at + src[at..].find('{').unwrap() + 1..at + src[at..].find('}').unwrap()];
            let items: Vec<&str> = body.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
            for (item, word) in words {
                assert_eq!(items.iter().position(|i| i == item), Some(*word), "{item} in {items:?}");
            }
            assert_eq!(items.len(), count, "{name}: {items:?}");
        };
        words_in_order(
            "PhaseHeader",
            &[
                ("kHeadSm", HEAD_SM),
                ("kHeadNsIn", HEAD_NS_IN),
                ("kHeadIn", HEAD_IN),
                ("kHeadSetUp", HEAD_SET_UP),
                ("kHeadOut", HEAD_OUT),
                ("kHeadNsOut", HEAD_NS_OUT),
                ("kHeadUnits", HEAD_UNITS),
                ("kHeadShape", HEAD_SHAPE),
            ],
            PHASE_HEADER_WORDS,
        );
        words_in_order(
            "PhaseWord",
            &[
                ("kUnitStart", UNIT_START),
                ("kUnitFirst", UNIT_FIRST),
                ("kUnitLoop", UNIT_LOOP),
                ("kUnitStore", UNIT_STORE),
                ("kUnitFullWait", UNIT_FULL_WAIT),
                ("kUnitTiles", UNIT_TILES),
                ("kUnitEmptyWait", UNIT_EMPTY_WAIT),
                ("kUnitIssued", UNIT_ISSUED),
            ],
            PHASE_UNIT_WORDS,
        );
        assert!(src.contains(&format!("__device__ unsigned long long {PHASE_SYMBOL}[")));
        // The shape word: tokens in the low 16 bits, K parts from bit 16, stages from bit 24.
        assert!(src.contains("(BT | KS << 16 | STAGES << 24) | (unsigned long long)tile0 << 32"));
        // The split last tiles' launch records into the second half.
        assert!(src.contains("rec(blockIdx.x + (tile0 > 0 ? kPhaseCtas / 2 : 0))"));
    }

    #[test]
    fn words_from_device_bytes() {
        let bytes: Vec<u8> = [1u64, 0x0102_0304_0506_0708].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(words_of(&bytes), [1, 0x0102_0304_0506_0708]);
    }
}
