//! The ratio of two means with a confidence interval, for comparing two sets of measured
//! durations (the end-to-end bench's blackouts with the interception on and off).
//!
//! Pure functions on `f64` samples, no dependencies: the interval is Fieller's, with
//! Welch–Satterthwaite degrees of freedom and Student's t quantile computed here (regularised
//! incomplete beta function by continued fraction, then bisection).

use thiserror::Error;

/// Which of the two samples of [`ratio_of_means`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// The numerator's sample (`num`).
    Numerator,
    /// The denominator's sample (`den`).
    Denominator,
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sample::Numerator => "numerator",
            Sample::Denominator => "denominator",
        })
    }
}

/// Why [`ratio_of_means`] gives no interval.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RatioError {
    /// A sample has fewer than two values: its variance is unknown.
    #[error("the {which} sample has {n} value(s); at least 2 are needed for a variance")]
    TooFewValues {
        /// The sample.
        which: Sample,
        /// How many values it has.
        n: usize,
    },
    /// A sample holds a NaN or an infinity.
    #[error("the {which} sample holds a value that is not finite")]
    NotFinite {
        /// The sample.
        which: Sample,
    },
    /// The confidence level is not strictly between 0 and 1.
    #[error("confidence level {0} is not strictly between 0 and 1")]
    BadConfidence(f64),
    /// The denominator's mean is zero: the ratio is undefined.
    #[error("the denominator's mean is zero: no ratio")]
    ZeroDenominatorMean,
    /// The denominator's mean is not distinguishable from zero at this confidence level
    /// (`t² · var(mean) / mean² >= 1`): Fieller's interval is unbounded.
    #[error(
        "the denominator's mean ({mean}) is not distinguishable from zero at this confidence \
         level (g = {g:.3} >= 1): the interval is unbounded"
    )]
    Unbounded {
        /// The denominator's mean.
        mean: f64,
        /// Fieller's `g = t² · var(mean) / mean²`.
        g: f64,
    },
}

/// The ratio of two means and its confidence interval, as [`ratio_of_means`] computed it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatioEstimate {
    /// `mean(num) / mean(den)`.
    pub ratio: f64,
    /// Lower end of the interval.
    pub low: f64,
    /// Upper end of the interval.
    pub high: f64,
    /// The confidence level of `low..=high` (e.g. 0.95).
    pub confidence: f64,
    /// Mean of the numerator's sample (its unit).
    pub mean_num: f64,
    /// Mean of the denominator's sample (its unit).
    pub mean_den: f64,
    /// Values in the numerator's sample.
    pub n_num: usize,
    /// Values in the denominator's sample.
    pub n_den: usize,
    /// Welch–Satterthwaite degrees of freedom of the t quantile (infinite when both
    /// samples have zero variance, when the interval is the point `ratio`).
    pub df: f64,
}

/// The ratio of the means of `num` and `den`, `mean(num) / mean(den)`, with its
/// two-sided `confidence` interval (e.g. 0.95) by **Fieller's theorem** for two independent
/// samples of possibly unequal variance: the interval is every `ρ` for which
/// `mean(num) - ρ·mean(den)` is within `t · sqrt(var(mean(num)) + ρ²·var(mean(den)))` of 0,
/// where `var(mean(x)) = s²(x) / n(x)` (sample variance, `n - 1` divisor) and `t` is
/// Student's t quantile at `(1 + confidence) / 2` with the Welch–Satterthwaite degrees of
/// freedom of that combination, evaluated at the point estimate:
/// `df = (v₁ + r²v₂)² / (v₁²/(n₁-1) + r⁴v₂²/(n₂-1))`, which lies between
/// `min(n₁, n₂) - 1` and `n₁ + n₂ - 2`. Unlike the delta method, the interval is
/// asymmetric around the ratio as the ratio's distribution is.
///
/// The values are treated as independent draws; their unit does not matter (it cancels
/// in the ratio; the means are reported in it). When both samples have zero variance the
/// interval is the point `ratio` and `df` is infinite.
///
/// # Errors
///
/// [`RatioError::TooFewValues`] when a sample has fewer than 2 values,
/// [`RatioError::NotFinite`] for a NaN or infinite value, [`RatioError::BadConfidence`]
/// unless `0 < confidence < 1`, [`RatioError::ZeroDenominatorMean`] when `mean(den)` is 0,
/// and [`RatioError::Unbounded`] when `mean(den)` is not distinguishable from 0 at that
/// level (Fieller's interval is then not a finite interval).
pub fn ratio_of_means(
    num: &[f64],
    den: &[f64],
    confidence: f64,
) -> Result<RatioEstimate, RatioError> {
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(RatioError::BadConfidence(confidence));
    }
    let (m1, v1) = mean_and_var_of_mean(num, Sample::Numerator)?;
    let (m2, v2) = mean_and_var_of_mean(den, Sample::Denominator)?;
    if m2 == 0.0 {
        return Err(RatioError::ZeroDenominatorMean);
    }
    let ratio = m1 / m2;
    let (n1, n2) = (num.len() as f64, den.len() as f64);
    let (a, b) = (v1, ratio * ratio * v2);
    let spread = a * a / (n1 - 1.0) + b * b / (n2 - 1.0);
    let estimate = |low, high, df| RatioEstimate {
        ratio,
        low,
        high,
        confidence,
        mean_num: m1,
        mean_den: m2,
        n_num: num.len(),
        n_den: den.len(),
        df,
    };
    if a + b == 0.0 {
        // No variance in either sample: t does not matter, the interval is the point.
        return Ok(estimate(ratio, ratio, f64::INFINITY));
    }
    // `spread` can only be 0 here by underflow: then df is as large as it gets.
    let df = if spread > 0.0 {
        (a + b) * (a + b) / spread
    } else {
        f64::INFINITY
    };
    let t = student_t_quantile(0.5 + confidence / 2.0, df);
    let g = t * t * v2 / (m2 * m2);
    if g >= 1.0 {
        return Err(RatioError::Unbounded { mean: m2, g });
    }
    // Roots of (m1 - ρ·m2)² = t²·(v1 + ρ²·v2), divided through by m2².
    let half = t / m2.abs() * (v1 * (1.0 - g) + ratio * ratio * v2).max(0.0).sqrt();
    let low = (ratio - half) / (1.0 - g);
    let high = (ratio + half) / (1.0 - g);
    Ok(estimate(low, high, df))
}

/// Mean of `x` and the variance of that mean (`s² / n`), or why not.
fn mean_and_var_of_mean(x: &[f64], which: Sample) -> Result<(f64, f64), RatioError> {
    if x.len() < 2 {
        return Err(RatioError::TooFewValues { which, n: x.len() });
    }
    if x.iter().any(|v| !v.is_finite()) {
        return Err(RatioError::NotFinite { which });
    }
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    Ok((mean, var / n))
}

/// Student's t quantile: the `t` with `P(T <= t) = p` for `df` degrees of freedom
/// (`df > 0`, not necessarily an integer; infinite gives the standard normal's quantile to
/// about 1e-6). Accurate to about 1e-10 relative; NaN when `p` is not in (0, 1) or `df` is
/// not positive.
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    if !(p > 0.0 && p < 1.0) || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if p < 0.5 {
        return -student_t_quantile(1.0 - p, df);
    }
    if p == 0.5 {
        return 0.0;
    }
    // Above 1e7 degrees of freedom the quantile is the normal's to within 1e-7 relative.
    let df = df.min(1e7);
    let mut high = 2.0;
    while student_t_cdf(high, df) < p {
        high *= 2.0;
        if !high.is_finite() {
            return f64::INFINITY;
        }
    }
    let mut low = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (low + high);
        if student_t_cdf(mid, df) < p {
            low = mid;
        } else {
            high = mid;
        }
        if high - low <= 1e-14 * high {
            break;
        }
    }
    0.5 * (low + high)
}

/// Student's t distribution function `P(T <= t)` for `df > 0` degrees of freedom.
fn student_t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * regularized_incomplete_beta(0.5 * df, 0.5, df / (df + t * t));
    if t > 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The regularised incomplete beta function `I_x(a, b)` for `a, b > 0`, `0 <= x <= 1`, by
/// its continued fraction (modified Lentz), on the side of `x` where that converges fast.
fn regularized_incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_continued_fraction(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_continued_fraction(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of the incomplete beta function (Numerical Recipes' `betacf`).
fn beta_continued_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let clamp = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / clamp(1.0 - qab * x / qap);
    let mut h = d;
    for m in 1..100_000 {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 / clamp(1.0 + aa * d);
        c = clamp(1.0 + aa / c);
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 / clamp(1.0 + aa * d);
        c = clamp(1.0 + aa / c);
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, 9 terms; about 1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1-x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let sum = COEF[1..]
        .iter()
        .enumerate()
        .fold(COEF[0], |s, (i, c)| s + c / (x + i as f64 + 1.0));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn ln_gamma_known_values() {
        assert!(ln_gamma(1.0).abs() < 1e-14 && ln_gamma(2.0).abs() < 1e-14);
        assert!(close(ln_gamma(5.0), 24f64.ln(), 1e-13));
        // Γ(1/2) = √π.
        assert!(close(
            ln_gamma(0.5),
            std::f64::consts::PI.sqrt().ln(),
            1e-13
        ));
        // Γ(10.5) = 1133278.3889487855...
        assert!(close(
            ln_gamma(10.5),
            1_133_278.388_948_785_5f64.ln(),
            1e-13
        ));
    }

    /// Student's t quantiles against mpmath (betainc + findroot, 40 digits).
    #[test]
    fn t_quantiles_match_reference() {
        let cases = [
            (0.975, 1.0, 12.706_204_736_174_705),
            (0.975, 2.0, 4.302_652_729_749_464),
            (0.975, 3.0, 3.182_446_305_283_709_6),
            (0.975, 5.0, 2.570_581_835_636_315_5),
            (0.975, 7.5, 2.333_039_626_864_974_6),
            (0.975, 10.0, 2.228_138_851_986_274),
            (0.975, 30.0, 2.042_272_456_301_238),
            (0.975, 1e6, 1.959_966_356_814_107),
            (0.95, 4.3, 2.089_822_096_271_946_7),
            (0.995, 2.5, 7.163_728_138_948_786),
        ];
        for (p, df, want) in cases {
            let got = student_t_quantile(p, df);
            assert!(close(got, want, 1e-9), "t({p}, {df}) = {got}, want {want}");
            assert!(close(student_t_quantile(1.0 - p, df), -want, 1e-9));
        }
        // Infinite degrees of freedom: the normal quantile.
        assert!(close(
            student_t_quantile(0.975, f64::INFINITY),
            1.959_963_984_540_054,
            1e-6
        ));
        assert_eq!(student_t_quantile(0.5, 3.0), 0.0);
        assert!(student_t_quantile(0.0, 3.0).is_nan());
        assert!(student_t_quantile(1.0, 3.0).is_nan());
        assert!(student_t_quantile(0.9, 0.0).is_nan());
        assert!(student_t_quantile(0.9, f64::NAN).is_nan());
    }

    /// Fieller intervals against mpmath: the same formula's quadratic solved at 40 digits.
    #[test]
    fn fieller_matches_reference() {
        let on = [96.1, 101.3, 92.4, 99.0, 95.5, 98.2];
        let off = [77.9, 80.1, 75.3, 79.4, 76.8, 81.0];
        let r = ratio_of_means(&on, &off, 0.95).unwrap();
        assert!(close(r.ratio, 1.238_044_633_368_756_6, 1e-12));
        assert!(close(r.low, 1.191_252_469_491_656, 1e-9), "{r:?}");
        assert!(close(r.high, 1.286_384_727_257_105_2, 1e-9), "{r:?}");
        assert!(close(r.df, 9.771_968_298_814_033, 1e-12));
        assert_eq!((r.n_num, r.n_den), (6, 6));
        assert!(close(r.mean_num, 97.083_333_333_333_33, 1e-12));
        assert!(close(r.mean_den, 78.416_666_666_666_67, 1e-12));

        // Unequal sizes.
        let r = ratio_of_means(&[10.0, 12.0, 11.0, 13.0], &[10.0, 9.0, 11.0], 0.95).unwrap();
        assert!(close(r.ratio, 1.15, 1e-12));
        assert!(close(r.low, 0.930_546_436_272_522, 1e-9), "{r:?}");
        assert!(close(r.high, 1.423_022_577_777_688, 1e-9), "{r:?}");
        assert!(close(r.df, 4.742_767_388_092_627, 1e-12));
        assert!(
            r.high - r.ratio > r.ratio - r.low,
            "asymmetric, longer upward"
        );

        // A constant denominator: df from the numerator alone (n - 1).
        let r = ratio_of_means(&[1.0, 1.1, 0.9], &[1.0, 1.0, 1.0], 0.95).unwrap();
        assert!(close(r.ratio, 1.0, 1e-12));
        assert!(close(r.df, 2.0, 1e-12));
        assert!(close(r.low, 0.751_586_228_824_967, 1e-9), "{r:?}");
        assert!(close(r.high, 1.248_413_771_175_033_2, 1e-9), "{r:?}");
    }

    #[test]
    fn equal_samples_give_one_inside() {
        let x = [3.0, 4.0, 5.0, 4.5];
        let r = ratio_of_means(&x, &x, 0.95).unwrap();
        assert!(close(r.ratio, 1.0, 1e-15));
        assert!(r.low < 1.0 && 1.0 < r.high);
        // Scaling the numerator scales the interval.
        let y: Vec<f64> = x.iter().map(|v| v * 2.0).collect();
        let s = ratio_of_means(&y, &x, 0.95).unwrap();
        assert!(close(s.low, 2.0 * r.low, 1e-12) && close(s.high, 2.0 * r.high, 1e-12));
        // A higher confidence level widens it.
        let w = ratio_of_means(&x, &x, 0.99).unwrap();
        assert!(w.low < r.low && w.high > r.high);
    }

    #[test]
    fn no_variance_is_a_point() {
        let r = ratio_of_means(&[2.0, 2.0], &[4.0, 4.0, 4.0], 0.95).unwrap();
        assert_eq!((r.ratio, r.low, r.high), (0.5, 0.5, 0.5));
        assert!(r.df.is_infinite());
    }

    #[test]
    fn degenerate_inputs_are_errors() {
        assert_eq!(
            ratio_of_means(&[1.0], &[1.0, 2.0], 0.95),
            Err(RatioError::TooFewValues {
                which: Sample::Numerator,
                n: 1
            })
        );
        assert_eq!(
            ratio_of_means(&[1.0, 2.0], &[], 0.95),
            Err(RatioError::TooFewValues {
                which: Sample::Denominator,
                n: 0
            })
        );
        assert_eq!(
            ratio_of_means(&[1.0, 2.0], &[-1.0, 1.0], 0.95),
            Err(RatioError::ZeroDenominatorMean)
        );
        assert_eq!(
            ratio_of_means(&[1.0, f64::NAN], &[1.0, 2.0], 0.95),
            Err(RatioError::NotFinite {
                which: Sample::Numerator
            })
        );
        assert_eq!(
            ratio_of_means(&[1.0, 2.0], &[1.0, f64::INFINITY], 0.95),
            Err(RatioError::NotFinite {
                which: Sample::Denominator
            })
        );
        for c in [0.0, 1.0, -0.5, f64::NAN] {
            assert!(matches!(
                ratio_of_means(&[1.0, 2.0], &[1.0, 2.0], c),
                Err(RatioError::BadConfidence(_))
            ));
        }
        // A denominator whose mean is within its noise of zero: unbounded, not a panic.
        let e = ratio_of_means(&[1.0, 2.0, 3.0], &[0.1, 5.0, -4.0], 0.95).unwrap_err();
        assert!(
            matches!(e, RatioError::Unbounded { g, .. } if g >= 1.0),
            "{e:?}"
        );
        assert!(e.to_string().contains("unbounded"));
    }
}
