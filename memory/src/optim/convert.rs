//! fp32 <-> bf16 / fp16 conversions: round to nearest even, NaN stays NaN (quieted), infinities
//! and signed zeros preserved. Plain integer arithmetic, so the compiler vectorises the loops
//! that call these.

/// fp32 -> bf16 bits.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        // NaN: keep sign and top payload bits, force the quiet bit.
        return ((b >> 16) as u16) | 0x0040;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// bf16 bits -> fp32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// fp32 -> IEEE fp16 bits, round to nearest even, overflow to infinity, subnormals kept.
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let abs = b & 0x7fff_ffff;
    if abs > 0x7f80_0000 {
        return sign | 0x7e00 | ((abs >> 13) & 0x01ff) as u16;
    }
    if abs >= 0x4780_0000 {
        // >= 65536 (or infinity): rounds to infinity (65520 and up round there too, below).
        return sign | 0x7c00;
    }
    if abs >= 0x3880_0000 {
        // Normal fp16 range: rebias the exponent (127 -> 15) and round the 13 dropped bits.
        let v = abs - 0x3800_0000;
        let round = 0x0fff + ((v >> 13) & 1);
        return sign | ((v + round) >> 13) as u16;
    }
    if abs < 0x3300_0000 {
        // Below half the smallest subnormal: signed zero.
        return sign;
    }
    // Subnormal fp16: shift the full mantissa into place and round to nearest even.
    let exp = abs >> 23;
    let mant = (abs & 0x007f_ffff) | 0x0080_0000;
    let shift = 126 - exp; // 14..=24
    let half = 1u32 << (shift - 1);
    let rest = mant & ((1u32 << shift) - 1);
    let mut out = mant >> shift;
    if rest > half || (rest == half && (out & 1) == 1) {
        out += 1;
    }
    sign | out as u16
}

/// IEEE fp16 bits -> fp32 (exact).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x03ff) as u32;
    let bits = match exp {
        0 if mant == 0 => sign,
        0 => {
            // Subnormal: normalise.
            let lz = mant.leading_zeros() - 22; // zeros within the 10-bit field
            let m = (mant << (lz + 1)) & 0x03ff;
            let e = 127 - 15 - lz;
            sign | (e << 23) | (m << 13)
        }
        0x1f => sign | 0x7f80_0000 | (mant << 13) | if mant != 0 { 0x0040_0000 } else { 0 },
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference conversions through the `half` crate's exact algorithms are not a dependency;
    /// instead: an f64 round-to-nearest-even oracle over the representable neighbours.
    fn oracle_bf16(x: f32) -> Option<u16> {
        if x.is_nan() {
            return None;
        }
        let lo = (x.to_bits() >> 16) as u16;
        let hi = lo.wrapping_add(1);
        let a = bf16_to_f32(lo) as f64;
        // Past the largest finite value, IEEE rounding treats infinity as 2^128.
        let b = match bf16_to_f32(hi) {
            h if h.is_infinite() => h.signum() as f64 * 2f64.powi(128),
            h => h as f64,
        };
        let d = x as f64;
        // Neighbours bracket x in magnitude; pick the nearer, ties to the even one.
        let (da, db) = ((d - a).abs(), (d - b).abs());
        Some(if da < db || (da == db && lo & 1 == 0) { lo } else { hi })
    }

    #[test]
    fn bf16_rounds_to_nearest_even_over_a_sweep() {
        let mut x: u32 = 0x1234_5678;
        for i in 0..2_000_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let bits = if i < 70_000 { i << 13 | (i & 0xffff) } else { x };
            let f = f32::from_bits(bits);
            let got = f32_to_bf16(f);
            match oracle_bf16(f) {
                Some(want) => assert_eq!(got, want, "{f:e} ({bits:#x})"),
                None => assert!(bf16_to_f32(got).is_nan(), "NaN stays NaN for {bits:#x}"),
            }
        }
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY), 0xff80);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80, "rounds up to infinity");
    }

    #[test]
    fn f16_matches_an_exhaustive_round_trip_and_rounds_ties_to_even() {
        // Every fp16 value converts to f32 and back unchanged.
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                assert!(f16_to_f32(f32_to_f16(f)).is_nan());
                continue;
            }
            assert_eq!(f32_to_f16(f), h, "{h:#x} -> {f:e}");
        }
        // Midpoints between neighbours go to the even one; just above/below go to the nearer.
        for h in 0..0x7bffu16 {
            let (a, b) = (f16_to_f32(h) as f64, f16_to_f32(h + 1) as f64);
            let mid = ((a + b) / 2.0) as f32;
            if mid as f64 != (a + b) / 2.0 {
                continue; // not exactly representable in f32
            }
            let even = if h & 1 == 0 { h } else { h + 1 };
            assert_eq!(f32_to_f16(mid), even, "tie between {h:#x} and the next");
            assert_eq!(f32_to_f16(f32::from_bits(mid.to_bits() + 1)), h + 1);
            assert_eq!(f32_to_f16(f32::from_bits(mid.to_bits() - 1)), h);
        }
        assert_eq!(f32_to_f16(65520.0), 0x7c00, "the first value that overflows");
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
        assert_eq!(f32_to_f16(f32::INFINITY), 0x7c00);
        assert_eq!(f32_to_f16(-0.0), 0x8000);
        assert_eq!(f32_to_f16(1e-9), 0, "underflows to zero");
    }
}
