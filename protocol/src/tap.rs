//! Counting the TAP output of a kselftest, in the guest, as the test prints it.
//!
//! The kselftest harness prints one `ok N name` / `not ok N name` line per case (`# SKIP`
//! after a skipped one) and, at the end, `# Totals: pass:P fail:F xfail:X xpass:Y
//! skip:S error:E`. The totals line wins when present; a test killed before printing it
//! is counted from its case lines.

/// TAP counts of one selftest run (the kselftest `Totals` line's fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapCounts {
    /// Cases passed.
    pub pass: u32,
    /// Cases failed.
    pub fail: u32,
    /// Cases skipped.
    pub skip: u32,
    /// Cases expected to fail that failed.
    pub xfail: u32,
    /// Cases expected to fail that passed.
    pub xpass: u32,
    /// Cases that errored.
    pub error: u32,
}

impl TapCounts {
    /// Cases counted, all kinds together.
    pub fn total(&self) -> u64 {
        [
            self.pass, self.fail, self.skip, self.xfail, self.xpass, self.error,
        ]
        .iter()
        .map(|&n| u64::from(n))
        .sum()
    }

    /// Parses a `# Totals: pass:13 fail:0 xfail:0 xpass:0 skip:0 error:0` line.
    pub fn parse_totals(line: &str) -> Option<TapCounts> {
        let rest = line.trim().strip_prefix("# Totals:")?;
        let mut t = TapCounts::default();
        for field in rest.split_whitespace() {
            let (key, value) = field.split_once(':')?;
            let value: u32 = value.parse().ok()?;
            match key {
                "pass" => t.pass = value,
                "fail" => t.fail = value,
                "skip" => t.skip = value,
                "xfail" => t.xfail = value,
                "xpass" => t.xpass = value,
                "error" => t.error = value,
                _ => return None,
            }
        }
        Some(t)
    }
}

/// Feeds on a selftest's output lines and says its counts.
#[derive(Debug, Clone, Default)]
pub struct TapTally {
    counted: TapCounts,
    totals: Option<TapCounts>,
}

impl TapTally {
    /// A tally of nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one output line.
    pub fn line(&mut self, line: &str) {
        let line = line.trim_end();
        if let Some(t) = TapCounts::parse_totals(line) {
            self.totals = Some(t);
            return;
        }
        let bump = |n: &mut u32| *n = n.saturating_add(1);
        if let Some(rest) = line.strip_prefix("not ok ") {
            if rest.contains("# XFAIL") {
                bump(&mut self.counted.xfail);
            } else {
                bump(&mut self.counted.fail);
            }
        } else if let Some(rest) = line.strip_prefix("ok ") {
            if rest.contains("# SKIP") {
                bump(&mut self.counted.skip);
            } else if rest.contains("# XPASS") {
                bump(&mut self.counted.xpass);
            } else {
                bump(&mut self.counted.pass);
            }
        }
    }

    /// The totals line's counts, else the counted case lines.
    pub fn counts(&self) -> TapCounts {
        self.totals.unwrap_or(self.counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_line_wins() {
        let mut t = TapTally::new();
        for l in [
            "TAP version 13",
            "1..15",
            "# Starting 15 tests from 1 test cases.",
            "#  RUN           liveupdate_device.basic_open_close ...",
            "ok 1 liveupdate_device.basic_open_close",
            "not ok 2 liveupdate_device.preserve_many_sessions",
            "ok 3 liveupdate_device.x # SKIP no device",
            "# FAILED: 13 / 15 tests passed.",
            "# Totals: pass:13 fail:2 xfail:0 xpass:0 skip:0 error:0",
        ] {
            t.line(l);
        }
        assert_eq!(
            t.counts(),
            TapCounts {
                pass: 13,
                fail: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn case_lines_count_without_totals() {
        let mut t = TapTally::new();
        for l in ["ok 1 a", "not ok 2 b", "ok 3 c # SKIP why", "ok 4 d\r"] {
            t.line(l);
        }
        let c = t.counts();
        assert_eq!((c.pass, c.fail, c.skip), (2, 1, 1));
        assert_eq!(c.total(), 4);
    }

    #[test]
    fn malformed_totals_are_not_totals() {
        assert_eq!(TapCounts::parse_totals("# Totals: pass:x"), None);
        assert_eq!(TapCounts::parse_totals("# Totals: colour:1"), None);
        assert_eq!(TapCounts::parse_totals("Totals: pass:1"), None);
        assert_eq!(
            TapCounts::parse_totals("# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0")
                .map(|t| t.pass),
            Some(1)
        );
    }
}
