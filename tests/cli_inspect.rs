//! `candiff inspect` as a user runs it.

mod common;

use std::process::Command;

fn inspect(args: &[&str]) -> (bool, String, String) {
    inspect_env(args, &[])
}

fn inspect_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_candiff"));
    cmd.arg("inspect").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn reports_layout_decisions_and_counts() {
    let bfl = common::fixtures().join("flux1_tiny/flux1_tiny_nvfp4_bfl.safetensors");
    let (ok, out, err) = inspect(&[bfl.to_str().unwrap()]);
    assert!(ok, "{err}");
    for want in [
        "BFL/Comfy",
        "names: BFL",
        "scale layout: swizzled",
        "nibble order: high-first",
        "group size:   16",
        "[inferred:",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let (ok, out, err) = inspect(&["--json", bfl.to_str().unwrap()]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let q = &v[0]["quantization"];
    // Every NVFP4 module has a U8 weight and a scale in the file: count them independently.
    let f = common::open("flux1_tiny/flux1_tiny_nvfp4_bfl.safetensors");
    let n_nvfp4 = f.header.tensors.keys().filter(|k| k.ends_with(".weight_scale")).count();
    assert_eq!(q["nvfp4_layers"].as_u64().unwrap() as usize, n_nvfp4);
    assert_eq!(q["scale_layout"], "swizzled");
    assert_eq!(q["nibble_order"], "high-first");

    let mo = common::fixtures().join("flux1_tiny/transformer_nvfp4_modelopt");
    let (ok, out, _) = inspect(&[mo.to_str().unwrap(), "--nvfp4-nibbles", "high"]);
    assert!(ok);
    assert!(out.contains("high-first") && out.contains("[override: --nvfp4-nibbles]"), "{out}");
}

#[test]
fn bad_targets_fail_with_a_message() {
    let (ok, _, err) = inspect(&["/nonexistent/model.safetensors"]);
    assert!(!ok && err.contains("error:") && err.contains("/nonexistent/model.safetensors"), "{err}");
    let (ok, _, err) = inspect_env(&["some-org/some-model-that-is-not-cached"], &[("HF_HUB_OFFLINE", "1")]);
    assert!(!ok && err.contains("Hugging Face cache") && err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn hub_repo_ids_resolve_through_the_local_cache() {
    // The standard cache layout: models--org--name/refs/main -> snapshots/<commit>/...
    let cache = std::env::temp_dir().join(format!("candiff-hf-cache-{}", std::process::id()));
    let snap = cache.join("models--some-org--tiny-flux/snapshots/0123abcd/transformer");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(cache.join("models--some-org--tiny-flux/refs")).unwrap();
    std::fs::write(cache.join("models--some-org--tiny-flux/refs/main"), "0123abcd").unwrap();
    let src = common::fixtures().join("flux1_tiny/transformer_nvfp4_modelopt");
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(src.join(f), snap.join(f)).unwrap();
    }
    let env = [("HF_HUB_CACHE", cache.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let (ok, out, err) = inspect_env(&["some-org/tiny-flux/transformer"], &env);
    let _ = std::fs::remove_dir_all(&cache);
    assert!(ok, "{err}");
    assert!(out.contains("ModelOpt NVFP4") && out.contains("scale layout: linear"), "{out}");
}
