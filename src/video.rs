//! Video files: MP4 (H.264 in yuv420p through OpenH264, built from source by the `openh264`
//! crate, in our own small ISO-BMFF muxer with `moov` first so browsers can start playing at
//! once), animated GIF, or a numbered PNG sequence. Every format carries the run's metadata.

use std::io::Write;
use std::path::{Path, PathBuf};

use openh264::encoder::{
    Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, QpRange, RateControlMode, VuiConfig,
};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;

use crate::error::{CResult, CandiffError};

/// Frames `[F][H][W][3]` in sRGB u8 at `fps`.
#[derive(Debug, Clone)]
pub struct Video {
    pub width: usize,
    pub height: usize,
    pub fps: u32,
    /// `F * H * W * 3` bytes, frame after frame.
    pub rgb: Vec<u8>,
}

impl Video {
    pub fn frames(&self) -> usize {
        self.rgb.len() / (self.width * self.height * 3).max(1)
    }

    pub fn frame(&self, i: usize) -> &[u8] {
        let n = self.width * self.height * 3;
        &self.rgb[i * n..(i + 1) * n]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Mp4,
    Gif,
    /// `stem-00000.png`, `stem-00001.png`, ... next to the given path.
    PngFrames,
}

impl Format {
    /// From the output file's extension.
    pub fn from_path(path: &Path) -> CResult<Self> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("mp4") => Ok(Self::Mp4),
            Some("gif") => Ok(Self::Gif),
            Some("png") => Ok(Self::PngFrames),
            other => Err(CandiffError::Unsupported(format!(
                "cannot write video to `{}` (extension {other:?}): use .mp4 (H.264), .gif, or .png (one PNG per frame)",
                path.display()
            ))),
        }
    }
}

/// Quantizer range of the constant-quality stream (H.264 QP: lower is better; ~20 is visually
/// transparent for generated video).
const QP_MIN: u8 = 16;
const QP_MAX: u8 = 22;
/// A key frame every this many seconds, so players can seek.
const KEYFRAME_SECONDS: u32 = 2;
/// MP4 media timescale units per frame.
const TICKS_PER_FRAME: u32 = 1000;

/// Writes `video` to `path` in the format its extension names; files appear only when complete.
/// Returns the paths written.
pub fn write(path: &Path, video: &Video, meta: &[(&str, String)]) -> CResult<Vec<PathBuf>> {
    if video.frames() == 0 || !video.width.is_multiple_of(2) || !video.height.is_multiple_of(2) {
        return Err(CandiffError::Unsupported(format!(
            "cannot encode {} frames of {}x{} (need at least one frame, even sizes)",
            video.frames(),
            video.width,
            video.height
        )));
    }
    let io = |e: std::io::Error| CandiffError::io(path, e);
    match Format::from_path(path)? {
        Format::Mp4 => {
            let bytes = mp4(video, meta)?;
            atomic_write(path, &bytes).map_err(io)?;
            Ok(vec![path.to_path_buf()])
        }
        Format::Gif => {
            let bytes = gif(video, meta)?;
            atomic_write(path, &bytes).map_err(io)?;
            Ok(vec![path.to_path_buf()])
        }
        Format::PngFrames => {
            let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "frame".into());
            let mut out = Vec::new();
            for i in 0..video.frames() {
                let p = path.with_file_name(format!("{stem}-{i:05}.png"));
                let mut m = meta.to_vec();
                m.push(("frame", format!("{i} of {} at {} fps", video.frames(), video.fps)));
                let bytes = png(video.frame(i), video.width, video.height, &m)?;
                atomic_write(&p, &bytes).map_err(|e| CandiffError::io(&p, e))?;
                out.push(p);
            }
            Ok(out)
        }
    }
}

fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

fn encode_err(e: impl std::fmt::Display) -> CandiffError {
    CandiffError::Unsupported(format!("video encoding failed: {e}"))
}

/// A PNG with iTXt metadata.
pub fn png(rgb: &[u8], width: usize, height: usize, meta: &[(&str, String)]) -> CResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in meta {
        enc.add_itxt_chunk(k.to_string(), v.clone()).map_err(encode_err)?;
    }
    let mut w = enc.write_header().map_err(encode_err)?;
    w.write_image_data(rgb).map_err(encode_err)?;
    w.finish().map_err(encode_err)?;
    Ok(out)
}

/// Animated GIF (looping), metadata in a comment extension.
fn gif(video: &Video, meta: &[(&str, String)]) -> CResult<Vec<u8>> {
    let mut out = Vec::new();
    {
        let (w, h) = (video.width as u16, video.height as u16);
        let mut enc = gif::Encoder::new(&mut out, w, h, &[]).map_err(encode_err)?;
        enc.set_repeat(gif::Repeat::Infinite).map_err(encode_err)?;
        let comment = meta.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("\n");
        // GIF comment extension (label 0xFE), in sub-blocks of at most 255 bytes.
        let chunks: Vec<&[u8]> = comment.as_bytes().chunks(255).collect();
        enc.write_raw_extension(gif::Extension::Comment.into(), &chunks).map_err(encode_err)?;
        // GIF delays are in centiseconds.
        let delay = (100.0 / video.fps.max(1) as f64).round() as u16;
        for i in 0..video.frames() {
            let mut f = gif::Frame::from_rgb_speed(w, h, video.frame(i), 10);
            f.delay = delay;
            enc.write_frame(&f).map_err(encode_err)?;
        }
    }
    Ok(out)
}

/// One encoded frame: length-prefixed NAL units, and whether it is a key frame.
struct Sample {
    data: Vec<u8>,
    key: bool,
}

/// NAL units of an Annex B stream (start codes removed).
fn nal_units(stream: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (k, &s) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map(|n| n - 3).unwrap_or(stream.len());
        // A 4-byte start code leaves one zero byte before the next 3-byte code.
        while end > s && stream[end - 1] == 0 {
            end -= 1;
        }
        out.push(&stream[s..end]);
    }
    out
}

/// H.264 NAL unit types.
const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;

/// Encodes every frame; returns (samples, SPS, PPS).
fn h264(video: &Video) -> CResult<(Vec<Sample>, Vec<u8>, Vec<u8>)> {
    let cfg = EncoderConfig::new()
        .max_frame_rate(FrameRate::from_hz(video.fps as f32))
        // Constant quality: OpenH264 cannot hold a bitrate without dropping frames, and every
        // generated frame must be kept.
        .rate_control_mode(RateControlMode::Off)
        .qp(QpRange::new(QP_MIN, QP_MAX))
        .skip_frames(false)
        .intra_frame_period(IntraFramePeriod::from_num_frames(video.fps * KEYFRAME_SECONDS))
        // openh264's RGB conversion is BT.601, limited range.
        .vui(VuiConfig::bt601());
    let mut enc = Encoder::with_api_config(OpenH264API::from_source(), cfg).map_err(encode_err)?;
    let (mut sps, mut pps) = (Vec::new(), Vec::new());
    let mut samples = Vec::with_capacity(video.frames());
    for i in 0..video.frames() {
        let yuv = YUVBuffer::from_rgb8_source(RgbSliceU8::new(video.frame(i), (video.width, video.height)));
        let bits = enc.encode(&yuv).map_err(encode_err)?;
        if matches!(bits.frame_type(), FrameType::Skip | FrameType::Invalid) {
            return Err(encode_err(format!("the encoder dropped frame {i}")));
        }
        let stream = bits.to_vec();
        let mut s = Sample { data: Vec::new(), key: false };
        for nal in nal_units(&stream) {
            let Some(&head) = nal.first() else { continue };
            match head & 0x1F {
                NAL_SPS => {
                    if sps.is_empty() {
                        sps = nal.to_vec();
                    }
                }
                NAL_PPS => {
                    if pps.is_empty() {
                        pps = nal.to_vec();
                    }
                }
                t => {
                    s.key |= t == NAL_IDR;
                    s.data.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    s.data.extend_from_slice(nal);
                }
            }
        }
        samples.push(s);
    }
    if sps.len() < 4 || pps.is_empty() {
        return Err(encode_err("the encoder produced no parameter sets"));
    }
    Ok((samples, sps, pps))
}

/// An ISO-BMFF box.
fn bx(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 8);
    v.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
    v.extend_from_slice(kind);
    v.extend_from_slice(body);
    v
}

/// A full box (version 0 + flags).
fn full(kind: &[u8; 4], flags: u32, body: &[u8]) -> Vec<u8> {
    let mut b = flags.to_be_bytes().to_vec();
    b[0] = 0;
    b.extend_from_slice(body);
    bx(kind, &b)
}

fn be32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}

fn be16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_be_bytes());
}

/// The identity transform of `mvhd`/`tkhd`.
const UNITY_MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];
/// ISO-639-2 "und", packed as three 5-bit letters.
const LANG_UND: u16 = 0x55C4;

fn moov(
    video: &Video,
    samples: &[Sample],
    sps: &[u8],
    pps: &[u8],
    data_offset: u32,
    meta: &[(&str, String)],
) -> Vec<u8> {
    let n = samples.len() as u32;
    let timescale = video.fps * TICKS_PER_FRAME;
    let duration = n * TICKS_PER_FRAME;
    let (w, h) = (video.width as u32, video.height as u32);

    let mut mvhd = Vec::new();
    for x in [0, 0, timescale, duration, 0x0001_0000] {
        be32(&mut mvhd, x);
    }
    be16(&mut mvhd, 0x0100);
    mvhd.extend_from_slice(&[0; 10]);
    UNITY_MATRIX.iter().for_each(|m| be32(&mut mvhd, *m));
    mvhd.extend_from_slice(&[0; 24]);
    be32(&mut mvhd, 2);

    let mut tkhd = Vec::new();
    for x in [0, 0, 1, 0, duration] {
        be32(&mut tkhd, x);
    }
    tkhd.extend_from_slice(&[0; 16]);
    UNITY_MATRIX.iter().for_each(|m| be32(&mut tkhd, *m));
    be32(&mut tkhd, w << 16);
    be32(&mut tkhd, h << 16);

    let mut mdhd = Vec::new();
    for x in [0, 0, timescale, duration] {
        be32(&mut mdhd, x);
    }
    be16(&mut mdhd, LANG_UND);
    be16(&mut mdhd, 0);

    let mut hdlr = vec![0; 4];
    hdlr.extend_from_slice(b"vide");
    hdlr.extend_from_slice(&[0; 12]);
    hdlr.extend_from_slice(b"VideoHandler\0");

    let mut avcc = vec![1, sps[1], sps[2], sps[3], 0xFF, 0xE1];
    be16(&mut avcc, sps.len() as u16);
    avcc.extend_from_slice(sps);
    avcc.push(1);
    be16(&mut avcc, pps.len() as u16);
    avcc.extend_from_slice(pps);
    let mut avc1 = vec![0; 6];
    be16(&mut avc1, 1);
    avc1.extend_from_slice(&[0; 16]);
    be16(&mut avc1, w as u16);
    be16(&mut avc1, h as u16);
    be32(&mut avc1, 0x0048_0000);
    be32(&mut avc1, 0x0048_0000);
    be32(&mut avc1, 0);
    be16(&mut avc1, 1);
    let mut name = [0u8; 32];
    let tag = b"candiff H.264";
    name[0] = tag.len() as u8;
    name[1..=tag.len()].copy_from_slice(tag);
    avc1.extend_from_slice(&name);
    be16(&mut avc1, 0x0018);
    be16(&mut avc1, 0xFFFF);
    avc1.extend(bx(b"avcC", &avcc));
    let mut stsd = Vec::new();
    be32(&mut stsd, 1);
    stsd.extend(bx(b"avc1", &avc1));

    let mut stts = Vec::new();
    for x in [1, n, TICKS_PER_FRAME] {
        be32(&mut stts, x);
    }
    let keys: Vec<u32> = samples.iter().enumerate().filter(|(_, s)| s.key).map(|(i, _)| i as u32 + 1).collect();
    let mut stss = Vec::new();
    be32(&mut stss, keys.len() as u32);
    keys.iter().for_each(|k| be32(&mut stss, *k));
    let mut stsc = Vec::new();
    for x in [1, 1, 1, 1] {
        be32(&mut stsc, x);
    }
    let mut stsz = Vec::new();
    be32(&mut stsz, 0);
    be32(&mut stsz, n);
    samples.iter().for_each(|s| be32(&mut stsz, s.data.len() as u32));
    let mut stco = Vec::new();
    be32(&mut stco, n);
    let mut off = data_offset;
    for s in samples {
        be32(&mut stco, off);
        off += s.data.len() as u32;
    }
    let stbl = [
        full(b"stsd", 0, &stsd),
        full(b"stts", 0, &stts),
        full(b"stss", 0, &stss),
        full(b"stsc", 0, &stsc),
        full(b"stsz", 0, &stsz),
        full(b"stco", 0, &stco),
    ]
    .concat();
    let dref = {
        let mut d = Vec::new();
        be32(&mut d, 1);
        d.extend(full(b"url ", 1, &[]));
        d
    };
    let minf = [full(b"vmhd", 1, &[0; 8]), bx(b"dinf", &full(b"dref", 0, &dref)), bx(b"stbl", &stbl)].concat();
    let mdia = [full(b"mdhd", 0, &mdhd), full(b"hdlr", 0, &hdlr), bx(b"minf", &minf)].concat();
    let trak = [full(b"tkhd", 3, &tkhd), bx(b"mdia", &mdia)].concat();

    // QuickTime-style user data: (c)nam = prompt, (c)cmt = everything, (c)too = encoder.
    let text = |kind: &[u8; 4], s: &str| {
        let mut b = Vec::new();
        be16(&mut b, s.len() as u16);
        be16(&mut b, LANG_UND);
        b.extend_from_slice(s.as_bytes());
        bx(kind, &b)
    };
    let comment = meta.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("\n");
    let prompt = meta.iter().find(|(k, _)| *k == "prompt").map(|(_, v)| v.as_str()).unwrap_or("");
    let clip = |s: &str| {
        s.chars()
            .scan(0, |n, c| {
                *n += c.len_utf8();
                (*n <= u16::MAX as usize / 2).then_some(c)
            })
            .collect::<String>()
    };
    let udta = [
        text(b"\xA9nam", &clip(prompt)),
        text(b"\xA9cmt", &clip(&comment)),
        text(b"\xA9too", concat!("candiff ", env!("CARGO_PKG_VERSION"))),
    ]
    .concat();
    bx(b"moov", &[full(b"mvhd", 0, &mvhd), bx(b"trak", &trak), bx(b"udta", &udta)].concat())
}

/// A complete MP4 file: `ftyp`, `moov` (first, for progressive playback), `mdat`.
fn mp4(video: &Video, meta: &[(&str, String)]) -> CResult<Vec<u8>> {
    let (samples, sps, pps) = h264(video)?;
    let mut ftyp = b"isom".to_vec();
    be32(&mut ftyp, 0x200);
    for b in [b"isom", b"iso2", b"avc1", b"mp41"] {
        ftyp.extend_from_slice(b);
    }
    let ftyp = bx(b"ftyp", &ftyp);
    let payload: usize = samples.iter().map(|s| s.data.len()).sum();
    // The moov size does not depend on the offsets it stores: measure it, then write it.
    let probe = moov(video, &samples, &sps, &pps, 0, meta);
    let data_offset = ftyp.len() + probe.len() + 8;
    if data_offset + payload > u32::MAX as usize {
        return Err(encode_err("the video exceeds 4 GiB; write a PNG sequence instead"));
    }
    let moov = moov(video, &samples, &sps, &pps, data_offset as u32, meta);
    let mut out = Vec::with_capacity(data_offset + payload);
    out.extend(ftyp);
    out.extend(moov);
    be32(&mut out, (payload + 8) as u32);
    out.extend_from_slice(b"mdat");
    samples.iter().for_each(|s| out.extend_from_slice(&s.data));
    Ok(out)
}
