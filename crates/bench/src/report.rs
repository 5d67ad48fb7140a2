//! The table the suite prints and writes whole as BENCHMARKS.md. Each figure carries its target
//! as a typed value, so every row says by itself whether the target is met, or missed and by how
//! much; no row is written by hand.

use std::fmt::Write as _;

/// A figure's target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// At least this much (throughput, speed-up).
    AtLeast(f64),
    /// At most this much (latency, a ratio to a baseline, memory).
    AtMost(f64),
    /// No target: the figure is reported for what it says.
    None,
}

impl Target {
    fn text(self, unit: &str) -> String {
        match self {
            Target::AtLeast(t) => format!(">= {}{unit}", number(t)),
            Target::AtMost(t) => format!("<= {}{unit}", number(t)),
            Target::None => "-".into(),
        }
    }

    /// "met", or "missed" with the factor by which the value falls short.
    pub fn verdict(self, value: f64) -> String {
        match self {
            Target::AtLeast(t) if value >= t => "met".into(),
            Target::AtLeast(t) => format!("missed ({:.2}x short)", t / value.max(f64::MIN_POSITIVE)),
            Target::AtMost(t) if value <= t => "met".into(),
            Target::AtMost(t) => format!("missed ({:.2}x over)", value / t),
            Target::None => "-".into(),
        }
    }
}

/// A number as a person writes it: 10,000; 1.1; 0.25.
fn number(x: f64) -> String {
    if x >= 1000.0 && x.fract() == 0.0 {
        let digits = format!("{x:.0}");
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{x}")
    }
}

pub struct Row {
    pub what: String,
    pub shown: String,
    pub target: String,
    pub verdict: String,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Report {
    /// A figure: what was measured, how it reads, the value the target is about (in `unit`), and
    /// the target.
    pub fn figure(&mut self, what: &str, shown: String, value: f64, unit: &str, target: Target) {
        let row = Row { what: what.into(), shown, target: target.text(unit), verdict: target.verdict(value) };
        println!("{:<62} {:>30}   target {} : {}", row.what, row.shown, row.target, row.verdict);
        self.rows.push(row);
    }

    /// A figure without a target.
    pub fn info(&mut self, what: &str, shown: String) {
        self.figure(what, shown, 0.0, "", Target::None);
    }

    pub fn note(&mut self, note: String) {
        println!("note: {note}");
        self.notes.push(note);
    }

    /// BENCHMARKS.md, whole: the run's context, the table, the notes, then the analysis.
    pub fn markdown(&self, date: &str, machine: &str, commit: &str, analysis: Option<&str>) -> String {
        let mut md = format!(
            "# vmgrid benchmarks\n\nWritten by `scripts/bench` (crates/bench) in one run; each comparison ran side by side in that run. Do not edit by hand.\n\n- date: {date}\n- machine: {machine}\n- commit: {commit}\n\n| figure | measured | target | verdict |\n|---|---|---|---|\n"
        );
        for r in &self.rows {
            let _ = writeln!(md, "| {} | {} | {} | {} |", r.what, r.shown, r.target, r.verdict);
        }
        for n in &self.notes {
            let _ = write!(md, "\n- {n}");
        }
        md.push('\n');
        if let Some(a) = analysis {
            md.push('\n');
            md.push_str(a);
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_say_met_or_by_how_much_missed() {
        assert_eq!(Target::AtLeast(10_000.0).verdict(12_000.0), "met");
        assert_eq!(Target::AtLeast(10_000.0).verdict(900.0), "missed (11.11x short)");
        assert_eq!(Target::AtMost(2.0).verdict(2.99), "missed (1.50x over)");
        assert_eq!(Target::AtMost(1.1).verdict(1.03), "met");
        assert_eq!(Target::AtLeast(10_000.0).text(" jobs/s"), ">= 10,000 jobs/s");
        assert_eq!(Target::AtMost(1.1).text("x"), "<= 1.1x");
    }
}
