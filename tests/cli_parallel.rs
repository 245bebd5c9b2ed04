//! `--ranks N` as a user runs it on the tiny models (CPU, offline): the sharded runs write the
//! same files as the single-device run; bad rank counts fail before any work.

use std::path::Path;
use std::process::Command;

fn candiff(cmd: &str, args: &[&str]) -> (bool, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_candiff")).arg(cmd).args(args).env("HF_HUB_OFFLINE", "1").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn pixels(path: &Path) -> Vec<u8> {
    let mut reader = png::Decoder::new(std::fs::File::open(path).unwrap()).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

/// Sharded runs split each GEMM's rows differently, so an f32 value may round the other way:
/// at most one 8-bit level, on at most 0.1% of the values.
fn assert_same_image(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    let differ: Vec<i32> = a.iter().zip(b).map(|(x, y)| (*x as i32 - *y as i32).abs()).filter(|d| *d > 0).collect();
    let max = differ.iter().copied().max().unwrap_or(0);
    assert!(max <= 1 && differ.len() * 1000 <= a.len(), "{what}: {} values differ, by up to {max}", differ.len());
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("candiff-par-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn flux_on_two_ranks_writes_the_single_device_image() {
    let dir = tmp("t2i");
    let out = |n: &str| dir.join(n).to_string_lossy().to_string();
    let base = ["--model", "tiny", "--prompt", "a red cat on a boat", "--seed", "7"];
    // Distilled guidance only (tokens sharded 2 ways), then true CFG (branches on one rank each).
    for (tag, extra, split) in [
        ("plain", vec![], "2 ranks: tokens sharded 2 ways"),
        (
            "cfg",
            vec!["--negative-prompt", "blurry", "--true-cfg", "3"],
            "2 ranks: the guidance branches on one rank each",
        ),
    ] {
        let one = out(&format!("{tag}-1.png"));
        let two = out(&format!("{tag}-2.png"));
        let (ok, log) = candiff("t2i", &[&base[..], &extra, &["--output", &one]].concat());
        assert!(ok, "{log}");
        let (ok, log) = candiff("t2i", &[&base[..], &extra, &["--output", &two, "--ranks", "2"]].concat());
        assert!(ok && log.contains(split), "{log}");
        assert_same_image(&pixels(Path::new(&one)), &pixels(Path::new(&two)), tag);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flux2_on_two_and_four_ranks_writes_the_single_device_image() {
    let dir = tmp("flux2");
    let out = |n: &str| dir.join(n).to_string_lossy().to_string();
    // dev (embedded guidance: tokens sharded) and klein base (CFG: branches split, then sharded).
    for model in ["flux.2-tiny", "flux.2-klein-tiny"] {
        let base = ["--model", model, "--prompt", "a red cat on a boat", "--seed", "5"];
        let one = out(&format!("{model}-1.png"));
        let (ok, log) = candiff("t2i", &[&base[..], &["--output", &one]].concat());
        assert!(ok, "{log}");
        for ranks in ["2", "4"] {
            let many = out(&format!("{model}-{ranks}.png"));
            let (ok, log) = candiff("t2i", &[&base[..], &["--output", &many, "--ranks", ranks]].concat());
            if ranks == "4" && model == "flux.2-tiny" {
                // No CFG: 4-way sharding of 2 heads is refused.
                assert!(!ok && log.contains("do not divide by 4"), "{log}");
                continue;
            }
            assert!(ok, "{model} x{ranks}: {log}");
            assert_same_image(&pixels(Path::new(&one)), &pixels(Path::new(&many)), &format!("{model} x{ranks}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wan_on_two_and_four_ranks_writes_the_single_device_frames() {
    let dir = tmp("t2v");
    let base = ["--model", "wan-tiny", "--prompt", "a red fox running", "--seed", "3", "--steps", "3"];
    let run = |name: &str, ranks: &str| {
        let out = dir.join(name);
        let (ok, log) = candiff("t2v", &[&base[..], &["--output", out.to_str().unwrap(), "--ranks", ranks]].concat());
        assert!(ok, "{log}");
        let mut frames: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(name.trim_end_matches(".png")))
            .collect();
        frames.sort();
        assert!(!frames.is_empty(), "{name}: no frames written");
        frames.iter().map(|p| pixels(p)).collect::<Vec<_>>()
    };
    let one = run("one.png", "1");
    for (name, ranks) in [("two.png", "2"), ("four.png", "4")] {
        let many = run(name, ranks);
        assert_eq!(many.len(), one.len(), "{ranks} ranks: frames");
        for (i, (a, b)) in one.iter().zip(&many).enumerate() {
            assert_same_image(a, b, &format!("{ranks} ranks, frame {i}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_rank_counts_fail_before_any_work() {
    for (cmd, args, want) in [
        ("t2i", vec!["--model", "tiny", "--prompt", "x", "--ranks", "3"], "do not divide by 3"),
        ("t2i", vec!["--model", "tiny", "--prompt", "x", "--ranks", "0"], "at least 1"),
        ("t2i", vec!["--model", "tiny", "--prompt", "x", "--ranks", "2", "--gpus", "2"], "cannot be used with"),
        ("t2i", vec!["--model", "flux.2-tiny", "--prompt", "x", "--ranks", "3"], "do not divide by 3"),
        ("t2v", vec!["--model", "wan-tiny", "--prompt", "x", "--ranks", "3", "--guidance", "1"], "do not divide by 3"),
    ] {
        let (ok, log) = candiff(cmd, &args);
        assert!(!ok && log.contains(want), "{args:?}: {log}");
    }
    // Several GPUs need NCCL: a build without it says so.
    if !cfg!(feature = "nccl") {
        let (ok, log) = candiff("t2i", &["--model", "tiny", "--prompt", "x", "--gpus", "2"]);
        assert!(!ok && log.contains("built without") && log.contains("--features nccl"), "{log}");
    }
}

#[test]
fn a_failing_rank_stops_the_run_with_its_error_and_no_output() {
    let dir = tmp("fault");
    let out = dir.join("x.gif");
    let res = Command::new(env!("CARGO_BIN_EXE_candiff"))
        .args(["t2v", "--model", "wan-tiny", "--prompt", "a fox", "--ranks", "2", "--output", out.to_str().unwrap()])
        .env("HF_HUB_OFFLINE", "1")
        .env(candiff::parallel::FAULT_ENV, "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && log.contains("rank 1 of 2 failed: injected failure"), "{log}");
    assert!(!out.exists(), "no output from a failed run");
    let _ = std::fs::remove_dir_all(&dir);
}
