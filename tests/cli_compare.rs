//! `candiff compare` on the tiny FLUX.1 and Wan2.2 models (CPU, offline): reports, metrics,
//! resumption, per-layer diagnosis and early errors.

use std::process::Command;

fn compare(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_candiff"))
        .arg("compare")
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("candiff-cmp-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn tiny_flux_comparison_reports_and_resumes() {
    let dir = tmp("flux");
    let prompts = dir.with_extension("txt");
    std::fs::write(&prompts, "a red cat on a boat\n# comment\n{\"prompt\": \"a blue dog\", \"seeds\": [5]}\n").unwrap();
    let out = dir.to_string_lossy().to_string();
    let args = ["--model", "tiny", "--prompts", prompts.to_str().unwrap(), "--seeds", "1,2", "--out", &out];
    let (ok, log) = compare(&args);
    assert!(ok, "{log}");
    // 2 seeds for the first prompt, its own seed for the second: 3 outputs x 4 variants.
    assert_eq!(log.matches("(seed ").count(), 12, "{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["reference"], "bf16");
    let vs = report["variants"].as_array().unwrap();
    assert_eq!(vs.len(), 4);
    assert_eq!(vs[3]["variant"]["label"], "nvfp4-trtllm-fp8");
    for v in &vs[1..] {
        assert_eq!(v["status"], "ok");
        let p = v["mean_psnr"].as_f64().unwrap();
        let s = v["mean_ssim"].as_f64().unwrap();
        // Quantized, so not identical, but close to the reference on this model.
        assert!(p > 25.0 && p.is_finite() && s > 0.8 && s < 1.0, "{}: psnr {p}, ssim {s}", v["variant"]["label"]);
        let items = v["items"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[2]["seed"], 5);
        assert_eq!(items[0]["latent_cosine"].as_array().unwrap().len(), 3, "one cosine per step");
        assert!(!v["worst_layers"].as_array().unwrap().is_empty(), "per-layer diagnosis");
    }
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("data:image/png;base64,") && html.contains("<svg") && html.contains("a blue dog"));
    assert!(std::fs::read_to_string(dir.join("report.md")).unwrap().contains("| nvfp4-trtllm-w4a4 | ok |"));

    // Resuming regenerates nothing and gives the same report.
    let (ok, log) = compare(&args);
    assert!(ok && log.matches("(seed ").count() == 0, "{log}");
    // Excluding the worst layers is another run (another folder).
    let (ok, log) = compare(&[&args[..6], &["--out", &out, "--exclude", "proj_out"]].concat());
    assert!(!ok && log.contains("other settings"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&prompts);
}

#[test]
fn tiny_wan_comparison_has_per_frame_metrics() {
    let dir = tmp("wan");
    let out = dir.to_string_lossy().to_string();
    let (ok, log) = compare(&[
        "--model",
        "wan-tiny",
        "--max-prompts",
        "1",
        "--variants",
        "bf16,nvfp4:cutlass:w4a16",
        "--out",
        &out,
    ]);
    assert!(ok, "{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let it = &report["variants"][1]["items"][0];
    assert!(it["psnr"].as_f64().unwrap() > 20.0 && it["psnr_std"].as_f64().unwrap() >= 0.0, "{it}");
    assert!(it["ssim_std"].is_number());
    assert!(dir.join("nvfp4-cutlass-w4a16/item000_s0.gif").is_file());
    assert!(std::fs::read_to_string(dir.join("report.html")).unwrap().contains("data:image/gif;base64,"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_fail_before_any_model_loads() {
    let empty = std::env::temp_dir().join(format!("candiff-empty-{}.txt", std::process::id()));
    std::fs::write(&empty, "# nothing\n\n").unwrap();
    let out = tmp("bad").to_string_lossy().to_string();
    for (args, want) in [
        (vec!["--model", "tiny", "--prompts", empty.to_str().unwrap()], "holds no prompts"),
        (vec!["--model", "tiny", "--variants", "bf16,nvfp4:trtllm:w8a8"], "variant `nvfp4:trtllm:w8a8`"),
        (vec!["--model", "tiny", "--variants", "nvfp4:trtllm:w4a16"], "--reference bf16 is not one of"),
        (vec!["--model", "tiny", "--out", "/proc/candiff-not-writable"], "output folder"),
        (vec!["--model", "tiny", "--frames", "9", "--out", &out], "video models"),
        (vec!["--model", "flux.1-dev-nvfp4", "--out", &out], "bf16 checkpoint"),
        (vec!["--model", "no-such-model"], "unknown model"),
        (vec!["--model", "tiny", "--clip", "/no/such/clip", "--out", &out], "cannot load a CLIP model"),
        (vec!["--model", "tiny", "--lpips", "Cargo.toml", "--out", &out], "not LPIPS AlexNet weights"),
        (
            vec!["--model", "flux.2-tiny", "--random-weights", "--out", &out],
            "random weights are supported for FLUX.1 and Wan2.2",
        ),
    ] {
        let (ok, log) = compare(&args);
        assert!(!ok && log.contains(want) && !log.contains("(seed "), "{args:?}: {log}");
    }
    let _ = std::fs::remove_file(&empty);
    let _ = std::fs::remove_dir_all(&out);
}

fn fixture(rel: &str) -> String {
    let root = std::env::var("CANDIFF_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    root.join(rel).to_string_lossy().to_string()
}

/// LPIPS and CLIP (tiny random models from the fixtures) on the tiny Wan video: per-frame means,
/// added to outputs generated without them, the reference scored against its prompt only.
#[test]
fn learned_metrics_are_added_to_finished_outputs() {
    let dir = tmp("learned");
    let out = dir.to_string_lossy().to_string();
    let base = ["--model", "wan-tiny", "--max-prompts", "1", "--variants", "bf16,nvfp4:trtllm:fp8", "--out", &out];
    let (ok, log) = compare(&[&base[..], &["--clip", "off"]].concat());
    assert!(ok && !log.contains("warning: CLIP"), "{log}");
    let report = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("report.json")).unwrap()).unwrap()
    };
    let r = report(&dir);
    assert!(r["variants"][1]["items"][0]["lpips"].is_null());
    assert!(r["learned_metrics"].to_string().contains("LPIPS: not computed"), "{}", r["learned_metrics"]);
    // Second run: nothing regenerated, the metrics filled in from the saved frames.
    let (clip, lpips) = (fixture("metrics/clip_tiny"), fixture("metrics/lpips_alex_random.safetensors"));
    let (ok, log) = compare(&[&base[..], &["--clip", &clip, "--lpips", &lpips]].concat());
    assert!(ok && !log.contains("(seed ") && log.contains("learned metrics of output 0"), "{log}");
    let r = report(&dir);
    let (refv, q) = (&r["variants"][0], &r["variants"][1]);
    assert!(refv["items"][0]["clip_score"].is_number() && refv["items"][0]["lpips"].is_null(), "{refv}");
    let l = q["items"][0]["lpips"].as_f64().unwrap();
    let sim = q["items"][0]["clip_image_sim"].as_f64().unwrap();
    // Quantized: close to the reference but not identical.
    assert!(l > 0.0 && l < 0.1, "lpips {l}");
    assert!(sim > 0.9 && sim <= 1.0 + 1e-6, "clip image similarity {sim}");
    assert_eq!(q["mean_lpips"].as_f64(), Some(l));
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("LPIPS mean") && md.contains("- CLIP: "), "{md}");
    // --report-only keeps the values and says which models made them.
    let (ok, log) = compare(&[&base[..], &["--report-only"]].concat());
    assert!(ok, "{log}");
    let r = report(&dir);
    assert_eq!(r["variants"][1]["items"][0]["lpips"].as_f64(), Some(l));
    assert!(r["learned_metrics"].to_string().contains("LPIPS: AlexNet"), "{}", r["learned_metrics"]);
    let _ = std::fs::remove_dir_all(&dir);
}
