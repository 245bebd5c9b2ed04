//! NVFP4 number formats: E2M1 element codes, E4M3 (fn) block scales and nibble packing.
//!
//! Every conversion here is exact bit manipulation (no lookup through `f64` rounding), because the
//! GPU kernels and the reference checkpoints must agree with it bit for bit.

/// Elements per block scale along K (NVFP4 fixes it at 16).
pub const GROUP_SIZE: usize = 16;
/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;
/// Largest finite E4M3fn magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// `E4M3_MAX * E2M1_MAX`: the global scale maps a tensor's amax onto this value.
pub const NVFP4_AMAX_TARGET: f32 = E4M3_MAX * E2M1_MAX;

/// Value of each E2M1 code. Bit 3 is the sign; code 8 is -0 and decodes to 0.
pub const E2M1_VALUES: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

#[inline]
pub fn e2m1_decode(code: u8) -> f32 {
    E2M1_VALUES[(code & 0xF) as usize]
}

/// Round to the nearest E2M1 value, ties to the even code, saturating at 6.
/// The sign bit follows the sign of `v` (so `-0.1` gives code 8, as the hardware conversion does).
/// NaN has no E2M1 encoding; it maps to 0 (callers reject NaN scales before quantizing).
#[inline]
pub fn e2m1_encode(v: f32) -> u8 {
    let sign = if v.is_sign_negative() { 8u8 } else { 0 };
    let a = v.abs();
    // Midpoints between consecutive grid values; `<=` where the lower code is even, `<` where the
    // upper one is, which is round-half-to-even on the code's mantissa bit.
    let mag = if a.is_nan() {
        return 0;
    } else if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | mag
}

/// E4M3fn bit pattern to f32. Exponent bias 7, subnormals `m * 2^-9`, 0x7F / 0xFF are NaN.
#[inline]
pub fn e4m3_decode(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((bits >> 3) & 0xF) as i32;
    let m = (bits & 0x7) as f32;
    if e == 0xF && (bits & 0x7) == 0x7 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m * (2.0f32).powi(-9)
    } else {
        sign * (1.0 + m / 8.0) * (2.0f32).powi(e - 7)
    }
}

/// f32 to E4M3fn: round to nearest, ties to even, saturating to ±448 (`cvt.rn.satfinite`).
/// NaN maps to 0x7F.
#[inline]
pub fn e4m3_encode(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let a = v.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    const MIN_NORMAL: f32 = 0.015625; // 2^-6
    if a < MIN_NORMAL {
        // Subnormal grid m * 2^-9; scaling by a power of two is exact, so one rounding happens.
        let q = (a * 512.0).round_ties_even() as u8; // 0..=8; 8 is the smallest normal (bits 0x08)
        return sign | q;
    }
    let exp = ((a.to_bits() >> 23) & 0xFF) as i32 - 127; // -6..=8
    let mant = a / (2.0f32).powi(exp); // [1, 2), exact
    let mut q = ((mant - 1.0) * 8.0).round_ties_even() as i32; // exact product, one rounding
    let mut e = exp + 7;
    if q == 8 {
        q = 0;
        e += 1;
    }
    let bits = ((e as u8) << 3) | q as u8;
    // 464 <= a rounds past 448; the bit pattern 0x7F would be NaN: saturate instead.
    sign | bits.min(0x7E)
}

/// Where element `2i` of a packed byte sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NibbleOrder {
    /// Element `2i` in bits 0..4 (ModelOpt, compressed-tensors, FlashInfer).
    Low,
    /// Element `2i` in bits 4..8 (BFL / Comfy single files).
    High,
}

impl std::fmt::Display for NibbleOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NibbleOrder::Low => "low-first",
            NibbleOrder::High => "high-first",
        })
    }
}

impl std::str::FromStr for NibbleOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "low" | "low-first" | "lo" => Ok(Self::Low),
            "high" | "high-first" | "hi" => Ok(Self::High),
            _ => Err(format!("expected `low` or `high`, found `{s}`")),
        }
    }
}

/// Swap the two nibbles of every byte (high-first <-> low-first), in place.
pub fn swap_nibbles(bytes: &mut [u8]) {
    for b in bytes {
        *b = b.rotate_left(4);
    }
}

/// The two codes of a byte, in element order.
#[inline]
pub fn unpack_byte(b: u8, order: NibbleOrder) -> (u8, u8) {
    match order {
        NibbleOrder::Low => (b & 0xF, b >> 4),
        NibbleOrder::High => (b >> 4, b & 0xF),
    }
}

/// Two codes (element order) into one byte.
#[inline]
pub fn pack_pair(first: u8, second: u8, order: NibbleOrder) -> u8 {
    match order {
        NibbleOrder::Low => (first & 0xF) | (second << 4),
        NibbleOrder::High => (second & 0xF) | (first << 4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_roundtrips_every_finite_code() {
        for bits in 0u8..=255 {
            let v = e4m3_decode(bits);
            if v.is_nan() {
                assert!(bits & 0x7F == 0x7F);
                continue;
            }
            let back = e4m3_encode(v);
            // -0 and +0 both decode to zero; everything else must come back as itself.
            if v == 0.0 {
                assert_eq!(back & 0x7F, 0);
            } else {
                assert_eq!(back, bits, "code {bits:#x} value {v}");
            }
        }
        assert_eq!(e4m3_decode(0x7E), 448.0);
        assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
    }

    #[test]
    fn e4m3_rounds_half_even_and_saturates() {
        // 1.0625 lies halfway between 1.0 (mantissa 0, even) and 1.125 (mantissa 1).
        assert_eq!(e4m3_decode(e4m3_encode(1.0625)), 1.0);
        // 1.1875 lies between 1.125 (odd) and 1.25 (even).
        assert_eq!(e4m3_decode(e4m3_encode(1.1875)), 1.25);
        // Subnormal tie: 1.5 * 2^-9 -> 2 * 2^-9.
        assert_eq!(e4m3_encode(1.5 * 2f32.powi(-9)), 2);
        assert_eq!(e4m3_encode(0.5 * 2f32.powi(-9)), 0);
        assert_eq!(e4m3_encode(1e6), 0x7E);
        assert_eq!(e4m3_encode(f32::INFINITY), 0x7E);
        assert_eq!(e4m3_encode(460.0), 0x7E);
        // Largest subnormal rounds up into the first normal.
        assert_eq!(e4m3_encode(7.6 * 2f32.powi(-9)), 0x08);
    }

    #[test]
    fn e2m1_grid_ties_to_even() {
        let cases = [
            (0.25, 0.0),
            (0.26, 0.5),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.01, 6.0),
            (100.0, 6.0),
        ];
        for (x, want) in cases {
            assert_eq!(e2m1_decode(e2m1_encode(x)), want, "{x}");
            assert_eq!(e2m1_decode(e2m1_encode(-x)), -want, "-{x}");
        }
        assert_eq!(e2m1_encode(-0.1), 8);
    }

    #[test]
    fn nibble_orders() {
        assert_eq!(pack_pair(1, 2, NibbleOrder::Low), 0x21);
        assert_eq!(pack_pair(1, 2, NibbleOrder::High), 0x12);
        assert_eq!(unpack_byte(0x21, NibbleOrder::Low), (1, 2));
        assert_eq!(unpack_byte(0x21, NibbleOrder::High), (2, 1));
        let mut b = [0x21u8, 0xF0];
        swap_nibbles(&mut b);
        assert_eq!(b, [0x12, 0x0F]);
    }
}
