//! `candiff t2v` as a user runs it, on the tiny two-expert Wan model shipped in assets/ (CPU,
//! offline): files in every format, metadata, reproducibility, and early errors.

use std::path::Path;
use std::process::Command;

fn t2v(args: &[&str]) -> (bool, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_candiff")).arg("t2v").args(args).env("HF_HUB_OFFLINE", "1").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// (width, height, pixels, text chunks) of a PNG.
fn png(path: &Path) -> (u32, u32, Vec<u8>, Vec<(String, String)>) {
    let mut r = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap())).read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let text = r.info().utf8_text.iter().map(|c| (c.keyword.clone(), c.get_text().unwrap())).collect();
    (info.width, info.height, buf, text)
}

#[test]
fn tiny_wan_writes_every_format_reproducibly() {
    let dir = std::env::temp_dir().join(format!("candiff-t2v-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = |n: &str| dir.join(n).to_string_lossy().to_string();
    let prompt = "a red fox running in snow";

    let (ok, log) = t2v(&["--model", "wan-tiny", "--prompt", prompt, "--seed", "3", "--output", &out("a.png")]);
    assert!(ok, "{log}");
    assert!(log.contains("4 steps at") && log.contains("(2 experts)") && log.contains("wrote 9 PNG frames"), "{log}");
    let (w, h, a4, text) = png(&dir.join("a-00004.png"));
    assert_eq!((w, h), (48, 32));
    let get = |k: &str| text.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(get("prompt").as_deref(), Some(prompt));
    assert_eq!(get("model").as_deref(), Some("wan-tiny"));
    assert_eq!(get("seed").as_deref(), Some("3"));
    assert!(get("guidance").unwrap().contains("(low noise)"));
    assert!(!dir.join("a-00009.png").exists());

    // Same seed, same frames; another seed, other frames.
    assert!(t2v(&["--model", "wan-tiny", "--prompt", prompt, "--seed", "3", "--output", &out("b.png")]).0);
    assert_eq!(png(&dir.join("b-00004.png")).2, a4);
    assert!(t2v(&["--model", "wan-tiny", "--prompt", prompt, "--seed", "4", "--output", &out("c.png")]).0);
    assert_ne!(png(&dir.join("c-00004.png")).2, a4);

    let (ok, log) = t2v(&["--model", "wan-tiny", "--prompt", prompt, "--output", &out("v.mp4"), "--fps", "8"]);
    assert!(ok, "{log}");
    let mp4 = std::fs::read(dir.join("v.mp4")).unwrap();
    assert_eq!(&mp4[4..8], b"ftyp");
    assert!(mp4.windows(prompt.len()).any(|w| w == prompt.as_bytes()), "prompt stored in the MP4");
    let (ok, log) = t2v(&["--model", "wan-tiny", "--prompt", prompt, "--output", &out("v.gif"), "--steps", "2"]);
    assert!(ok && log.contains("(1 expert)"), "2 steps stay above the boundary: {log}");
    assert_eq!(&std::fs::read(dir.join("v.gif")).unwrap()[..6], b"GIF89a");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_requests_fail_before_any_work() {
    for (args, want) in [
        (vec!["--model", "wan-tiny", "--prompt", " "], "prompt is empty"),
        (vec!["--model", "no-such-model", "--prompt", "x"], "unknown model"),
        (vec!["--model", "tiny", "--prompt", "x"], "image model"),
        (vec!["--model", "wan-tiny", "--prompt", "x", "--frames", "8"], "4k+1"),
        (vec!["--model", "wan-tiny", "--prompt", "x", "--width", "40"], "multiples of 16"),
        (vec!["--model", "wan-tiny", "--prompt", "x", "--output", "x.avi"], ".mp4"),
        (vec!["--model", "wan-tiny", "--prompt", "x", "--boundary", "2"], "--boundary"),
        (vec!["--model", "wan-tiny", "--prompt", "x", "--output", "/no/such/dir/x.mp4"], "does not exist"),
    ] {
        let (ok, log) = t2v(&args);
        assert!(!ok && log.contains(want), "{args:?}: {log}");
    }
}

/// `--random-weights`: reproducible (drawn per tensor name, each expert under its own folder's
/// name), not the checkpoint's, and the two experts differ.
#[test]
fn random_weights_are_reproducible_and_not_the_checkpoint() {
    let dir = std::env::temp_dir().join(format!("candiff-t2v-random-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = |n: &str| dir.join(n).to_string_lossy().to_string();
    let run = |extra: &[&str], name: &str| {
        let base = ["--model", "wan-tiny", "--prompt", "a red fox", "--seed", "3", "--output", &out(name)];
        let (ok, log) = t2v(&[&base[..], extra].concat());
        assert!(ok, "{log}");
        png(&dir.join(name.replace(".png", "-00000.png"))).2
    };
    let a = run(&["--random-weights"], "a.png");
    assert!(a == run(&["--random-weights"], "b.png"), "random weights differ between runs");
    assert!(a != run(&[], "c.png"), "random weights give the checkpoint's frames");
    // Not a constant image (random norm scales near 0 would silence the VAE).
    assert!(a.chunks(3).any(|p| p != &a[..3]), "constant frame");
    // Boundary 0 runs only the low-noise expert, 1 only the high-noise one: with distinct random
    // experts the frames differ.
    let lo = run(&["--random-weights", "--boundary", "0"], "lo.png");
    let hi = run(&["--random-weights", "--boundary", "1"], "hi.png");
    assert!(lo != hi, "the two random experts are the same");
    let _ = std::fs::remove_dir_all(&dir);
}
