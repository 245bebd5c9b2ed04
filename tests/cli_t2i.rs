//! `candiff t2i` as a user runs it, on the tiny model shipped in assets/ (CPU, offline).

use std::path::Path;
use std::process::Command;

fn t2i(args: &[&str]) -> (bool, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_candiff")).arg("t2i").args(args).env("HF_HUB_OFFLINE", "1").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn png(path: &Path) -> (png::OutputInfo, Vec<u8>, Vec<(String, String)>) {
    let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let text = reader.info().utf8_text.iter().map(|c| (c.keyword.clone(), c.get_text().unwrap())).collect();
    (info, buf, text)
}

#[test]
fn tiny_model_runs_offline_and_is_reproducible() {
    let dir = std::env::temp_dir().join(format!("candiff-t2i-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = |n: &str| dir.join(n).to_string_lossy().to_string();
    let (ok, log) =
        t2i(&["--model", "tiny", "--prompt", "a red cat on a boat", "--seed", "7", "--output", &out("a.png")]);
    assert!(ok, "{log}");
    assert!(log.contains("3 steps at") && log.contains("total"), "{log}");
    let (info, a, text) = png(&dir.join("a.png"));
    assert_eq!((info.width, info.height), (48, 32));
    let get = |k: &str| text.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(get("prompt").as_deref(), Some("a red cat on a boat"));
    assert_eq!(get("model").as_deref(), Some("tiny"));
    assert_eq!(get("steps").as_deref(), Some("3"));
    // Same seed, same image; another seed or prompt, another image.
    assert!(t2i(&["--model", "tiny", "--prompt", "a red cat on a boat", "--seed", "7", "--output", &out("b.png")]).0);
    assert_eq!(png(&dir.join("b.png")).1, a);
    assert!(t2i(&["--model", "tiny", "--prompt", "a red cat on a boat", "--seed", "8", "--output", &out("c.png")]).0);
    assert_ne!(png(&dir.join("c.png")).1, a);
    assert!(t2i(&["--model", "tiny", "--prompt", "a blue dog", "--seed", "7", "--output", &out("d.png")]).0);
    assert_ne!(png(&dir.join("d.png")).1, a);
    // A batch writes one file per image.
    assert!(t2i(&["--model", "tiny", "--prompt", "x", "--batch", "2", "--output", &out("e.png")]).0);
    assert!(dir.join("e-0.png").is_file() && dir.join("e-1.png").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_requests_fail_before_any_work() {
    for (args, want) in [
        (vec!["--model", "tiny", "--prompt", "  "], "prompt is empty"),
        (vec!["--model", "no-such-model", "--prompt", "x"], "unknown model"),
        (vec!["--model", "tiny", "--prompt", "x", "--width", "40"], "multiples of 16"),
        (vec!["--model", "tiny", "--prompt", "x", "--dtype", "f8"], "unknown --dtype"),
        (vec!["--model", "tiny", "--prompt", "x", "--output", "/no/such/dir/x.png"], "does not exist"),
        (vec!["--model", "tiny", "--prompt", "x", "--fp8-accum", "fast"], "applies to --nvfp4-mode fp8"),
        (
            vec!["--model", "tiny", "--prompt", "x", "--device", "cpu", "--nvfp4-mode", "fp8", "--fp8-accum", "fast"],
            "this run is on the CPU",
        ),
    ] {
        let (ok, log) = t2i(&args);
        assert!(!ok && log.contains(want), "{args:?}: {log}");
    }
}

/// `--random-weights`: no weight file is read, the weights are the same on every run (drawn per
/// tensor name), and they are not the checkpoint's.
#[test]
fn random_weights_are_reproducible_and_not_the_checkpoint() {
    let dir = std::env::temp_dir().join(format!("candiff-t2i-random-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = |n: &str| dir.join(n).to_string_lossy().to_string();
    let run =
        |extra: &[&str], name: &str| {
            let (ok, log) =
                t2i(&[&["--model", "tiny", "--prompt", "a red cat", "--seed", "3", "--output", &out(name)], extra]
                    .concat());
            assert!(ok, "{log}");
            png(&dir.join(name)).1
        };
    let (a, b, real) = (run(&["--random-weights"], "a.png"), run(&["--random-weights"], "b.png"), run(&[], "c.png"));
    assert_eq!(a, b);
    assert_ne!(a, real);
    let _ = std::fs::remove_dir_all(&dir);
}
