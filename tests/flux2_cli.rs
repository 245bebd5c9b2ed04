//! FLUX.2 as a user runs it: `t2i` on the tiny dev and klein models (CPU, offline), the chat
//! templates' tokenization, `inspect` on the official-layout NVFP4 file, `compare`, early errors.

mod common;

use std::process::Command;

use candiff::pipelines::flux2::{tokenize, Flux2Files, TextEncoderKind};
use candle_core::Device;

fn candiff(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_candiff")).args(args).env("HF_HUB_OFFLINE", "1").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("candiff-flux2-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn asset(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join(name)
}

#[test]
fn t2i_runs_dev_and_klein_deterministically() {
    let dir = tmp("t2i");
    for (model, encoder) in [("flux.2-tiny", "Mistral"), ("flux.2-klein-tiny", "Qwen3")] {
        let a = dir.join(format!("{model}-a.png"));
        let b = dir.join(format!("{model}-b.png"));
        for p in [&a, &b] {
            let (ok, log) = candiff(&[
                "t2i",
                "--model",
                model,
                "--prompt",
                "a red fox in the snow",
                "--seed",
                "7",
                "--output",
                p.to_str().unwrap(),
            ]);
            assert!(ok, "{model}: {log}");
            assert!(log.contains(encoder) && log.contains("3 steps"), "{log}");
        }
        let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(x, y, "{model}: same seed, same image");
        let decoder = png::Decoder::new(std::io::Cursor::new(x));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (64, 48));
        let text: Vec<String> = reader.info().utf8_text.iter().map(|t| t.keyword.clone()).collect();
        assert!(text.contains(&"text_encoder".to_string()), "{text:?}");
    }
    // Another prompt gives another image.
    let c = dir.join("c.png");
    let (ok, log) = candiff(&[
        "t2i",
        "--model",
        "flux.2-tiny",
        "--prompt",
        "a blue boat",
        "--seed",
        "7",
        "--output",
        c.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    assert_ne!(std::fs::read(&c).unwrap(), std::fs::read(dir.join("flux.2-tiny-a.png")).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chat_templates_tokenize_with_each_encoders_padding_side() {
    let files = Flux2Files::new(&asset("flux2-tiny"), None);
    let (ids, mask) = tokenize(&files, TextEncoderKind::Mistral, &["a red cat", ""], 48, &Device::Cpu).unwrap();
    let (ids, mask): (Vec<Vec<i64>>, Vec<Vec<i64>>) = (ids.to_vec2().unwrap(), mask.to_vec2().unwrap());
    for (row, m) in ids.iter().zip(&mask) {
        // Left padding with <pad> (11), then <s> [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT] [INST] ... [/INST].
        let first = m.iter().position(|&v| v == 1).unwrap();
        assert!(row[..first].iter().all(|&t| t == 11) && m[first..].iter().all(|&v| v == 1));
        assert_eq!(&row[first..first + 2], &[1, 17]);
        assert_eq!(*row.last().unwrap(), 4, "[/INST] ends the sequence");
        assert!(row.contains(&18) && row.contains(&3));
    }
    // The prompt's words sit between [INST] and [/INST]: 3 words, 0 words.
    let inst = |r: &Vec<i64>| r.len() - 1 - r.iter().position(|&t| t == 3).unwrap() - 1;
    assert_eq!((inst(&ids[0]), inst(&ids[1])), (3, 0));

    let files = Flux2Files::new(&asset("flux2-klein-tiny"), None);
    let (ids, mask) = tokenize(&files, TextEncoderKind::Qwen3, &["a red cat"], 32, &Device::Cpu).unwrap();
    let (ids, mask): (Vec<i64>, Vec<i64>) =
        (ids.get(0).unwrap().to_vec1().unwrap(), mask.get(0).unwrap().to_vec1().unwrap());
    let n = mask.iter().filter(|&&v| v == 1).count();
    // <|im_start|> user a red cat <|im_end|> <|im_start|> assistant <think> </think>, right padded with 7.
    assert_eq!(&ids[..2], &[5, ids[1]]);
    assert_eq!(&ids[n - 2..n], &[8, 9]);
    assert!(ids[n..].iter().all(|&t| t == 7) && mask[..n].iter().all(|&v| v == 1));
    // Truncation keeps the first tokens.
    let (short, _) = tokenize(&files, TextEncoderKind::Qwen3, &["a red cat"], 4, &Device::Cpu).unwrap();
    assert_eq!(short.get(0).unwrap().to_vec1::<i64>().unwrap(), ids[..4].to_vec());
}

#[test]
fn inspect_reports_the_inferred_bfl_layout() {
    let f = common::fixtures().join("flux2_tiny/flux2_tiny_nvfp4.safetensors");
    let (ok, out) = candiff(&["inspect", f.to_str().unwrap()]);
    assert!(ok, "{out}");
    let quantized = common::open("flux2_tiny/flux2_tiny_nvfp4.safetensors")
        .header
        .tensors
        .keys()
        .filter(|k| k.ends_with(".weight_scale"))
        .count();
    for want in [
        "names: BFL".to_string(),
        format!("NVFP4 layers: {quantized}"),
        "scale layout: swizzled".into(),
        "nibble order: high-first".into(),
        "packed-QKV".into(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in\n{out}");
    }
    let mixed = common::fixtures().join("flux2_tiny/flux2_tiny_nvfp4_mixed.safetensors");
    let (ok, out) = candiff(&["inspect", mixed.to_str().unwrap()]);
    assert!(ok && out.contains("no input_scale"), "{out}");
}

#[test]
fn compare_runs_on_flux2() {
    let dir = tmp("compare");
    let prompts = dir.join("p.txt");
    std::fs::write(&prompts, "a red cat on a boat\n").unwrap();
    let out = dir.join("out");
    let (ok, log) = candiff(&[
        "compare",
        "--model",
        "flux.2-klein-tiny",
        "--prompts",
        prompts.to_str().unwrap(),
        "--seeds",
        "3",
        "--variants",
        "bf16,nvfp4:trtllm:w4a16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let v = &report["variants"][1];
    assert_eq!(v["status"], "ok", "{v}");
    let p = v["mean_psnr"].as_f64().unwrap();
    assert!(p.is_finite() && p > 20.0, "psnr {p}");
    assert!(!v["worst_layers"].as_array().unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_fail_before_loading() {
    let (ok, log) =
        candiff(&["t2i", "--model", "flux.2-tiny", "--prompt", "x", "--width", "40", "--output", "/tmp/x.png"]);
    assert!(!ok && log.contains("multiples of"), "{log}");
    let (ok, log) = candiff(&["t2i", "--model", "flux.2-tiny", "--prompt", "x", "--text-encoder", "tpu"]);
    assert!(!ok && log.contains("native, nvfp4 or cpu"), "{log}");
    let (ok, log) =
        candiff(&["t2i", "--model", "flux.2-tiny", "--prompt", "x", "--nvfp4-scales-from", "/nonexistent.safetensors"]);
    assert!(!ok && log.contains("nonexistent"), "{log}");
}
