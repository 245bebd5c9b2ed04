//! `report.json` (everything), `report.md` (tables) and a self-contained `report.html` (the
//! variants x items grid with images/GIFs embedded, metric tables, a speed-quality chart in SVG).

use std::fmt::Write as _;
use std::path::Path;

use super::run::{Report, VariantReport};
use crate::error::{CResult, CandiffError};

/// Chart size in SVG user units.
const CHART_W: f64 = 560.0;
const CHART_H: f64 = 300.0;
const CHART_PAD: f64 = 48.0;
/// PSNR plotted for identical outputs (infinite PSNR).
const PSNR_CAP: f64 = 60.0;

fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_infinite() => "identical".into(),
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    }
}

fn gib(b: Option<usize>) -> String {
    b.map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_else(|| "-".into())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn summary_rows(r: &Report) -> Vec<[String; 14]> {
    r.variants
        .iter()
        .map(|v: &VariantReport| {
            [
                v.variant.label.clone(),
                if v.variant.label == r.reference { "reference".into() } else { v.status.clone() },
                num(v.mean_psnr, 2),
                num(v.worst_psnr, 2),
                num(v.mean_ssim, 4),
                num(v.worst_ssim, 4),
                num(v.mean_lpips, 4),
                num(v.worst_lpips, 4),
                num(v.mean_clip_image_sim, 4),
                num(v.mean_clip_score, 2),
                num(v.mean_final_latent_cosine, 5),
                num(v.mean_step_ms, 1),
                num(v.mean_seconds, 2),
                gib(v.max_peak_gpu_bytes),
            ]
        })
        .collect()
}

const HEADERS: [&str; 14] = [
    "variant",
    "status",
    "PSNR mean (dB)",
    "PSNR worst",
    "SSIM mean",
    "SSIM worst",
    "LPIPS mean",
    "LPIPS worst",
    "CLIP image sim.",
    "CLIP score",
    "final latent cosine",
    "ms / step",
    "s / output",
    "peak GPU",
];

/// What the columns mean (below the table in both reports).
const LEGEND: &str = "PSNR, SSIM and LPIPS against the reference (LPIPS: lower is closer); CLIP image sim.: cosine of the CLIP image embeddings of output and reference; CLIP score: 100 x cosine of the output's and the prompt's CLIP embeddings (the reference has one too); ms / step: median transformer step; s / output: the whole generation, loading and quantizing included; time and memory exclude the output that carried the per-layer diagnosis when there are others; the reference's include recording the activation ranges that calibrate W4A4.";

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# candiff compare: {}\n", r.settings.model);
    let _ = writeln!(
        s,
        "{} outputs per variant ({} steps, {}x{}{}){}, reference `{}`, device {}. Metrics are against the reference on the saved 8-bit outputs; video metrics are means over frames.\n",
        r.settings.items.len(),
        r.settings.steps,
        r.settings.width,
        r.settings.height,
        r.settings.frames.map(|f| format!(", {f} frames")).unwrap_or_default(),
        if r.settings.random_weights { ", random weights (the outputs are noise; the metrics measure the NVFP4 error)" } else { "" },
        r.reference,
        r.device
    );
    let _ = writeln!(s, "| {} |", HEADERS.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(HEADERS.len()));
    for row in summary_rows(r) {
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
    let _ = writeln!(s, "\n{LEGEND}\n");
    for n in &r.learned_metrics {
        let _ = writeln!(s, "- {n}");
    }
    for v in &r.variants {
        if v.worst_layers.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\n## Worst layers of {} (output rel. L2 error vs bf16, first output)\n", v.variant.label);
        let _ = writeln!(s, "| layer | rel. L2 |\n|---|---|");
        for (n, e) in &v.worst_layers {
            let _ = writeln!(s, "| `{n}` | {e:.4} |");
        }
        let _ = writeln!(
            s,
            "\nKeep a layer in bf16 with `--exclude <pattern>` (full list: `layers-{}.json`).",
            v.variant.label
        );
    }
    s
}

fn chart(r: &Report) -> String {
    let others = || r.variants.iter().filter(|v| v.variant.label != r.reference && v.mean_psnr.is_some());
    // Step time is the speed that matters; whole-output time where a variant lacks it.
    let per_step = others().all(|v| v.mean_step_ms.is_some());
    let (unit, axis) = if per_step { ("ms", "ms per step") } else { ("s", "seconds per output") };
    let pts: Vec<(String, f64, f64)> = others()
        .filter_map(|v| {
            let t = if per_step { v.mean_step_ms? } else { v.mean_seconds? };
            Some((v.variant.label.clone(), t, v.mean_psnr?.min(PSNR_CAP)))
        })
        .collect();
    let mut s = format!(
        r#"<svg viewBox="0 0 {CHART_W} {CHART_H}" width="{CHART_W}" height="{CHART_H}" role="img" aria-label="speed versus quality">"#
    );
    let (x0, y0, x1, y1) = (CHART_PAD, CHART_H - CHART_PAD, CHART_W - CHART_PAD / 2.0, CHART_PAD / 2.0);
    let _ = write!(
        s,
        r##"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#555"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#555"/>"##
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">{axis}</text>"#,
        (x0 + x1) / 2.0,
        CHART_H - 10.0
    );
    let _ = write!(
        s,
        r#"<text x="14" y="{}" font-size="12" transform="rotate(-90 14 {})" text-anchor="middle">mean PSNR (dB)</text>"#,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
    if !pts.is_empty() {
        let tmax = pts.iter().map(|p| p.1).fold(0f64, f64::max).max(1e-9) * 1.1;
        let (pmin, pmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.2), b.max(p.2)));
        let (pmin, pmax) = (pmin - 2.0, pmax + 2.0);
        // Points are numbered (labels of coinciding variants would overlap); the legend follows.
        for (k, (_, t, p)) in pts.iter().enumerate() {
            let x = x0 + (x1 - x0) * t / tmax;
            let y = y0 - (y0 - y1) * (p - pmin) / (pmax - pmin);
            let dy = -8.0 - 10.0 * (k % 3) as f64;
            let _ = write!(
                s,
                r##"<circle cx="{x:.1}" cy="{y:.1}" r="5" fill="#2a6fdb"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
                y + dy,
                k + 1
            );
        }
        let _ = write!(
            s,
            r#"<text x="{x0}" y="{}" font-size="10">0</text><text x="{x1}" y="{}" font-size="10" text-anchor="end">{tmax:.2} {unit}</text>"#,
            y0 + 14.0,
            y0 + 14.0
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="{y0}" font-size="10" text-anchor="end">{pmin:.0}</text><text x="{}" y="{}" font-size="10" text-anchor="end">{pmax:.0}</text>"#,
            x0 - 4.0,
            x0 - 4.0,
            y1 + 4.0
        );
    }
    s.push_str("</svg><ol>");
    for (label, t, p) in &pts {
        let _ = write!(
            s,
            "<li>{} — {t:.2} {unit} per {}, mean PSNR {p:.2} dB</li>",
            esc(label),
            if per_step { "step" } else { "output" }
        );
    }
    s.push_str("</ol>");
    s
}

pub fn html(r: &Report, out: &Path) -> CResult<String> {
    let mut s = String::from("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>candiff compare</title><style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{image-rendering:pixelated;max-width:256px;display:block}.grid td{text-align:center;vertical-align:top}.prompt{max-width:220px;text-align:left;font-size:12px}</style></head><body>");
    let _ = write!(s, "<h1>candiff compare: {}</h1>", esc(&r.settings.model));
    let _ = write!(s, "<p>{}</p>", esc(markdown(r).lines().nth(2).unwrap_or("")));
    let _ = write!(s, "<table><tr>{}</tr>", HEADERS.iter().map(|h| format!("<th>{}</th>", esc(h))).collect::<String>());
    for row in summary_rows(r) {
        let _ = write!(s, "<tr>{}</tr>", row.iter().map(|c| format!("<td>{}</td>", esc(c))).collect::<String>());
    }
    let _ = write!(s, "</table><p><small>{}</small></p><ul>", esc(LEGEND));
    for n in &r.learned_metrics {
        let _ = write!(s, "<li>{}</li>", esc(n));
    }
    s.push_str("</ul><h2>Speed and quality</h2>");
    s.push_str(&chart(r));
    s.push_str("<h2>Outputs</h2><table class=\"grid\"><tr><th>prompt / seed</th>");
    for v in &r.variants {
        let _ = write!(s, "<th>{}</th>", esc(&v.variant.label));
    }
    s.push_str("</tr>");
    for (i, (prompt, seed)) in r.settings.items.iter().enumerate() {
        let _ = write!(s, "<tr><td class=\"prompt\">{} <br>seed {seed}</td>", esc(prompt));
        for v in &r.variants {
            match v.items.iter().find(|it| it.item == i) {
                Some(it) => {
                    let p = out.join(&v.variant.label).join(&it.file);
                    let data = std::fs::read(&p).map_err(|e| CandiffError::io(&p, e))?;
                    let mime = if it.file.ends_with(".gif") { "image/gif" } else { "image/png" };
                    let mut cap = match (it.psnr, it.ssim) {
                        (Some(p), Some(q)) => format!("PSNR {} / SSIM {q:.3}", num(Some(p), 1)),
                        _ => "reference".into(),
                    };
                    if let Some(l) = it.lpips {
                        let _ = write!(cap, " / LPIPS {l:.3}");
                    }
                    if let Some(c) = it.clip_score {
                        let _ = write!(cap, " / CLIP {c:.1}");
                    }
                    let _ = write!(
                        s,
                        "<td><img alt=\"{}\" src=\"data:{mime};base64,{}\"><small>{}</small></td>",
                        esc(&it.file),
                        base64(&data),
                        esc(&cap)
                    );
                }
                None => {
                    let _ = write!(s, "<td>{}</td>", esc(&v.status));
                }
            }
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    for v in &r.variants {
        if v.worst_layers.is_empty() {
            continue;
        }
        let _ = write!(
            s,
            "<h2>Worst layers of {}</h2><table><tr><th>layer</th><th>output rel. L2 vs bf16</th></tr>",
            esc(&v.variant.label)
        );
        for (n, e) in &v.worst_layers {
            let _ = write!(s, "<tr><td><code>{}</code></td><td>{e:.4}</td></tr>", esc(n));
        }
        s.push_str("</table>");
    }
    s.push_str("</body></html>\n");
    Ok(s)
}

/// Writes the three reports into `out`.
pub fn write_all(r: &Report, out: &Path) -> CResult<()> {
    let w = |name: &str, text: String| -> CResult<()> {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| CandiffError::io(&p, e))
    };
    w("report.json", serde_json::to_string_pretty(r).expect("serializable"))?;
    w("report.md", markdown(r))?;
    w("report.html", html(r, out)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(super::base64(i.as_bytes()), o);
        }
    }
}
