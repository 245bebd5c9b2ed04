//! Video output: the MP4 is parsed back box by box and decoded with OpenH264's decoder, and must
//! reproduce the frames (PSNR); GIF and PNG sequences decode to the right frame count and sizes.

use candiff::video::{write, Video};
use openh264::decoder::Decoder;
use openh264::formats::YUVSource;

/// Smooth moving pattern, the kind of content generated video has.
fn pattern(w: usize, h: usize, frames: usize) -> Video {
    let mut rgb = Vec::with_capacity(w * h * 3 * frames);
    for f in 0..frames {
        for y in 0..h {
            for x in 0..w {
                let t = f as f32 * 0.3;
                rgb.push((128.0 + 100.0 * ((x as f32 * 0.15 + t).sin())) as u8);
                rgb.push((128.0 + 100.0 * ((y as f32 * 0.12 - t).cos())) as u8);
                rgb.push(((x + y + 4 * f) % 256) as u8);
            }
        }
    }
    Video { width: w, height: h, fps: 16, rgb }
}

/// Children of a box body.
fn boxes(mut b: &[u8]) -> Vec<([u8; 4], &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 8 {
        let size = u32::from_be_bytes(b[0..4].try_into().unwrap()) as usize;
        assert!(size >= 8 && size <= b.len(), "bad box size {size}");
        out.push((b[4..8].try_into().unwrap(), &b[8..size]));
        b = &b[size..];
    }
    assert!(b.is_empty(), "trailing bytes");
    out
}

fn child<'a>(b: &'a [u8], kind: &[u8; 4]) -> &'a [u8] {
    boxes(b).into_iter().find(|(k, _)| k == kind).unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(kind))).1
}

fn be32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10()
}

/// Minimum PSNR of the round trip at our bitrate on smooth content.
const MIN_PSNR_DB: f64 = 30.0;

#[test]
fn mp4_parses_and_decodes_to_the_frames() {
    let dir = std::env::temp_dir().join(format!("candiff-video-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let v = pattern(96, 64, 9);
    let path = dir.join("t.mp4");
    let meta = [("prompt", "a fox".to_string()), ("seed", "7".to_string())];
    assert_eq!(write(&path, &v, &meta).unwrap(), vec![path.clone()]);
    assert!(!dir.join("t.mp4.partial").exists());
    let file = std::fs::read(&path).unwrap();

    let top = boxes(&file);
    let kinds: Vec<&[u8]> = top.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(kinds, [b"ftyp".as_slice(), b"moov", b"mdat"], "moov before mdat (progressive playback)");
    let moov = top[1].1;
    let udta = child(moov, b"udta");
    let cmt = child(udta, b"\xA9cmt");
    assert!(String::from_utf8_lossy(&cmt[4..]).contains("prompt: a fox"));
    let stbl = child(child(child(child(moov, b"trak"), b"mdia"), b"minf"), b"stbl");
    let mdhd = child(child(child(moov, b"trak"), b"mdia"), b"mdhd");
    let (timescale, duration) = (be32(mdhd, 12), be32(mdhd, 16));
    assert_eq!(duration as f64 / timescale as f64, 9.0 / 16.0, "duration = frames / fps");
    let stsd = child(stbl, b"stsd");
    let avc1 = child(&stsd[8..], b"avc1");
    assert_eq!((u16::from_be_bytes([avc1[24], avc1[25]]), u16::from_be_bytes([avc1[26], avc1[27]])), (96, 64));
    let avcc = child(&avc1[78..], b"avcC");
    let sps_len = u16::from_be_bytes([avcc[6], avcc[7]]) as usize;
    let sps = &avcc[8..8 + sps_len];
    let pps_len = u16::from_be_bytes([avcc[9 + sps_len], avcc[10 + sps_len]]) as usize;
    let pps = &avcc[11 + sps_len..11 + sps_len + pps_len];
    let stsz = child(stbl, b"stsz");
    let stco = child(stbl, b"stco");
    let n = be32(stsz, 8);
    assert_eq!(n, 9);
    assert_eq!(be32(stco, 4), n);
    let stss = child(stbl, b"stss");
    assert_eq!(be32(stss, 8), 1, "the first sample is a key frame");

    let mut dec = Decoder::new().unwrap();
    let annexb = |nal: &[u8]| [&[0u8, 0, 0, 1][..], nal].concat();
    let mut frames_out = Vec::new();
    let mut rgb = vec![0u8; 96 * 64 * 3];
    let mut head = annexb(sps);
    head.extend(annexb(pps));
    for i in 0..n {
        let (off, size) = (be32(stco, 8 + 4 * i), be32(stsz, 12 + 4 * i));
        let mut sample = &file[off..off + size];
        let mut packet = if i == 0 { head.clone() } else { Vec::new() };
        while !sample.is_empty() {
            let l = be32(sample, 0);
            packet.extend(annexb(&sample[4..4 + l]));
            sample = &sample[4 + l..];
        }
        if let Some(img) = dec.decode(&packet).unwrap() {
            assert_eq!(img.dimensions(), (96, 64));
            img.write_rgb8(&mut rgb);
            frames_out.push(rgb.clone());
        }
    }
    for img in dec.flush_remaining().unwrap() {
        img.write_rgb8(&mut rgb);
        frames_out.push(rgb.clone());
    }
    assert_eq!(frames_out.len(), 9, "every frame decodes");
    for (i, f) in frames_out.iter().enumerate() {
        let p = psnr(f, v.frame(i));
        assert!(p > MIN_PSNR_DB, "frame {i}: PSNR {p:.1} dB");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gif_and_png_sequences_hold_every_frame() {
    let dir = std::env::temp_dir().join(format!("candiff-video-g-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let v = pattern(32, 16, 5);
    let meta = [("prompt", "p".to_string())];
    let g = dir.join("t.gif");
    write(&g, &v, &meta).unwrap();
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::RGBA);
    let mut d = opts.read_info(std::fs::File::open(&g).unwrap()).unwrap();
    let mut count = 0;
    while let Some(f) = d.read_next_frame().unwrap() {
        assert_eq!((f.width, f.height, f.delay), (32, 16, 6), "size and 1/16 s delay (centiseconds)");
        count += 1;
    }
    assert_eq!(count, 5);

    let paths = write(&dir.join("f.png"), &v, &meta).unwrap();
    assert_eq!(paths.len(), 5);
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&paths[3]).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    r.next_frame(&mut buf).unwrap();
    assert_eq!(&buf[..32 * 16 * 3], v.frame(3), "PNG frames are lossless");
    std::fs::remove_dir_all(&dir).ok();
    assert!(write(&dir.join("x.avi"), &v, &meta).unwrap_err().to_string().contains(".mp4"));
}
