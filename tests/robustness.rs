//! Property tests: parsers and layout code never panic on random or corrupted input, and layout
//! conversions round-trip on random shapes.

use candiff::nvfp4::config::{self, infer, parse_hf_quant_config, parse_model_config, resolve, Overrides};
use candiff::nvfp4::layout::{code_in_row, swizzle_scales, unswizzle_scales, LayoutKind, Nvfp4Weight, PreparedLayout};
use candiff::nvfp4::quant::quantize_weight;
use candiff::safetensors::{parse_header, serialize, Header};
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|v| serde_json::json!(v)),
        prop_oneof![
            Just("NVFP4".to_string()),
            Just("modelopt".to_string()),
            Just("compressed-tensors".to_string()),
            Just("nvfp4-pack-quantized".to_string()),
            Just("swizzled".to_string()),
            "[a-z_]{0,8}".prop_map(|s| s),
        ]
        .prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        let keys = prop_oneof![
            Just("quantization_config".to_string()),
            Just("quantization".to_string()),
            Just("quant_method".to_string()),
            Just("quant_algo".to_string()),
            Just("format".to_string()),
            Just("config_groups".to_string()),
            Just("weights".to_string()),
            Just("group_size".to_string()),
            Just("ignore".to_string()),
            Just("exclude_modules".to_string()),
            Just("checkpoint_weight_scale_layout".to_string()),
            Just("swap_weight_nibbles".to_string()),
            "[a-z]{1,4}".prop_map(|s| s),
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(keys, inner, 0..5)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A random module as (weight shape, scale shape, scale dtype).
fn module_spec() -> impl Strategy<Value = (usize, usize, usize, usize, bool)> {
    (1usize..300, 0usize..40, 0usize..300, 0usize..12, any::<bool>())
}

fn header_of(mods: &[(usize, usize, usize, usize, bool)], names: &[String]) -> Header {
    let mut owned = Vec::new();
    for (i, &(n, kh, sr, sc, e4m3)) in mods.iter().enumerate() {
        let name = names[i % names.len()].replace("{}", &i.to_string());
        owned.push((format!("{name}.weight"), "U8".to_string(), vec![n, kh], vec![0u8; n * kh]));
        let dt = if e4m3 { "F8_E4M3" } else { "BF16" };
        let bytes = if e4m3 { sr * sc } else { 2 * sr * sc };
        owned.push((format!("{name}.weight_scale"), dt.to_string(), vec![sr, sc], vec![0u8; bytes]));
    }
    let t: Vec<(&str, &str, Vec<usize>, Vec<u8>)> =
        owned.iter().map(|(a, b, c, d)| (a.as_str(), b.as_str(), c.clone(), d.clone())).collect();
    let bytes = serialize(&t, None);
    parse_header(&bytes, Some(bytes.len() as u64), "random").unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_header_parser(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_header(&bytes, Some(bytes.len() as u64), "random");
        let _ = parse_header(&bytes, None, "random");
    }

    #[test]
    fn corrupted_headers_never_panic(len_delta in -64i64..64, flip in 0usize..400, val in any::<u8>(), cut in 0usize..600) {
        let file = serialize(&[
            ("a.weight", "U8", vec![4, 8], vec![1; 32]),
            ("a.weight_scale", "F8_E4M3", vec![4, 1], vec![0x38; 4]),
            ("a.weight_scale_2", "F32", vec![], vec![0, 0, 128, 63]),
        ], Some(serde_json::json!({"format": "pt"})));
        let mut f = file.clone();
        let n = u64::from_le_bytes(f[..8].try_into().unwrap()) as i64 + len_delta;
        f[..8].copy_from_slice(&(n.max(0) as u64).to_le_bytes());
        let _ = parse_header(&f, Some(f.len() as u64), "corrupt");
        let mut g = file.clone();
        let i = flip % g.len();
        g[i] = val;
        if let Ok(h) = parse_header(&g, Some(g.len() as u64), "corrupt") {
            // Whatever parses must have offsets inside the file.
            for t in h.tensors.values() {
                prop_assert!(h.data_start + t.end <= g.len());
            }
            let _ = infer(&[("corrupt".to_string(), &h)]);
        }
        let c = cut.min(file.len());
        let _ = parse_header(&file[..c], Some(c as u64), "cut");
    }

    #[test]
    fn random_configs_never_panic(v in json_value()) {
        let _ = parse_model_config(&v, "config.json");
        let _ = parse_hf_quant_config(&v, "hf_quant_config.json");
        let wrapped = serde_json::json!({"quantization_config": v.clone(), "quantization": v});
        let _ = parse_model_config(&wrapped, "config.json");
        let _ = parse_hf_quant_config(&wrapped, "hf_quant_config.json");
    }

    #[test]
    fn random_module_shapes_never_panic_inference(mods in prop::collection::vec(module_spec(), 1..6), bfl in any::<bool>(), layout in 0u8..3) {
        let names: Vec<String> = if bfl {
            vec!["double_blocks.{}.img_attn.qkv".into(), "single_blocks.{}.linear1".into()]
        } else {
            vec!["transformer_blocks.{}.attn.to_q".into()]
        };
        let h = header_of(&mods, &names);
        if let Ok(inf) = infer(&[("random".to_string(), &h)]) {
            let declared = config::DeclaredConfig {
                file: "config.json".into(),
                method: "modelopt".into(),
                scale_layout: match layout { 0 => None, 1 => Some(config::ScaleLayout::Linear), _ => Some(config::ScaleLayout::Swizzled) },
                ..Default::default()
            };
            let _ = resolve(&[declared], &inf, &Overrides::default());
            let _ = resolve(&[], &inf, &Overrides::default());
        }
    }

    #[test]
    fn layouts_round_trip_on_random_shapes(n in 1usize..300, kb in 1usize..24, seed in any::<u64>()) {
        let k = kb * 16;
        let mut s = seed | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
        let packed: Vec<u8> = (0..n * k / 2).map(|_| next() as u8).collect();
        // Any byte but the NaN codes is a valid scale for layout purposes.
        let scales: Vec<u8> = (0..n * kb).map(|_| (next() as u8) & 0x7E).collect();
        let w = Nvfp4Weight::new(n, k, packed, scales, 0.5).unwrap();
        for kind in [LayoutKind::Trtllm, LayoutKind::TrtllmSm90, LayoutKind::Cutlass, LayoutKind::CutlassLinearScales] {
            let p = PreparedLayout::prepare(&w, kind);
            prop_assert_eq!(p.to_canonical(0.5).unwrap(), w.clone());
            // Padding is zero (codes past K, wherever a layout keeps them).
            let nonzero_pad = (0..p.weight_rows).any(|r| {
                let logical = (0..n).any(|l| PreparedLayout::physical_row(kind, l) == r);
                let row = &p.weight[r * p.weight_row_bytes..(r + 1) * p.weight_row_bytes];
                if logical {
                    (k..2 * p.weight_row_bytes).any(|kk| code_in_row(kind, row, kk) != 0)
                } else {
                    row.iter().any(|&b| b != 0)
                }
            });
            prop_assert!(!nonzero_pad);
        }
        let sw = swizzle_scales(&w.scales, n, kb);
        prop_assert_eq!(unswizzle_scales(&sw, n, kb).unwrap(), w.scales.clone());
        prop_assert!(unswizzle_scales(&sw[1..], n, kb).is_err());
    }

    #[test]
    fn quantize_dequantize_error_is_bounded(n in 1usize..8, kb in 1usize..6, seed in any::<u64>()) {
        let k = kb * 16;
        let mut s = seed | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; (s % 20001) as f32 / 10000.0 - 1.0 };
        let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let q = quantize_weight(&w, n, k).unwrap();
        let d = q.dequantize();
        // Each element is off by at most half the block's largest E2M1 step (2 of 6 at the top)
        // plus the E4M3 rounding of the block scale (1/16 relative).
        for (r, (blk_w, blk_d)) in w.chunks(16).zip(d.chunks(16)).enumerate() {
            let amax = blk_w.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in blk_w.iter().zip(blk_d) {
                prop_assert!((a - b).abs() <= amax * (1.0 / 6.0 + 1.0 / 16.0) + 1e-6, "block {}: {} vs {}", r, a, b);
            }
        }
    }
}
