//! One row per scenario (what was injected, the counts, the recovery time and its bound, and every guarantee that
//! broke), printed as a table and as JSON lines.
//!
//! It does not decide what a scenario checks; scenarios add their failures to their row.

use crate::traffic::Outcome;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Row {
    pub scenario: String,
    pub injected: String,
    pub sent: usize,
    pub acked: usize,
    pub delivered: usize,
    pub stored: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub recovery: Option<Duration>,
    /// The bound the recovery must stay within, when the design brief gives one.
    pub bound: Option<Duration>,
    /// Extra measurements, `name=value`.
    pub details: Vec<String>,
    /// Guarantees that broke; empty means the scenario passed.
    pub failures: Vec<String>,
    pub took: Duration,
}

impl Row {
    pub fn new(scenario: &str, injected: impl Into<String>) -> Row {
        Row { scenario: scenario.to_owned(), injected: injected.into(), ..Row::default() }
    }

    /// Take the counts of a traffic run and check the guarantees every run must keep: nothing acked lost, nothing
    /// duplicated, order kept, no resume gap, every send acked in the end, recovery inside the bound.
    pub fn judge(&mut self, outcome: &Outcome) {
        self.sent += outcome.sent;
        self.acked += outcome.acked;
        self.delivered += outcome.delivered;
        self.stored += outcome.stored;
        self.lost += outcome.lost;
        self.duplicated += outcome.duplicated;
        if self.recovery.is_none() {
            self.recovery = outcome.recovery;
        }
        self.details.push(format!("deliveries={}/{}", outcome.delivered, outcome.expected_deliveries));
        self.details.push(format!("p99_before_ms={}", outcome.p99_before_ms));
        self.details.push(format!("p99_after_ms={}", outcome.p99_after_ms));
        if !outcome.slowest_after.is_empty() {
            let slowest: Vec<String> = outcome
                .slowest_after
                .iter()
                .map(|(latency, sent)| format!("{latency}ms@{:.1}s", *sent as f64 / 1000.0))
                .collect();
            self.details.push(format!("slowest_after={}", slowest.join(" ")));
        }
        self.details.push(format!("reconnects={}", outcome.reconnects));
        self.check(outcome.lost == 0, format!("{} acked messages lost", outcome.lost));
        self.check(outcome.duplicated == 0, format!("{} duplicated", outcome.duplicated));
        self.check(outcome.out_of_order == 0, format!("{} events out of seq order", outcome.out_of_order));
        self.check(outcome.gaps == 0, format!("{} resumes could not replay what was missed", outcome.gaps));
        self.check(outcome.gave_up == 0, format!("{} sends were never acked", outcome.gave_up));
        self.check(outcome.acked > 0, "nothing was acked".to_owned());
        for note in &outcome.notes {
            self.details.push(note.clone());
        }
        if let Some(bound) = self.bound {
            match self.recovery {
                Some(recovery) => self.check(recovery <= bound, format!("recovery {recovery:?} is over {bound:?}")),
                None => self.fail("some receiver never got a message sent after the injection".to_owned()),
            }
        }
    }

    pub fn check(&mut self, ok: bool, failure: String) {
        if !ok {
            self.failures.push(failure);
        }
    }

    pub fn fail(&mut self, failure: String) {
        self.failures.push(failure);
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1}s", d.as_secs_f64())).unwrap_or_else(|| "-".to_owned())
}

/// The table, one line per scenario, then the details and failures of each.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<18} {:<44} {:>7} {:>7} {:>9} {:>7} {:>5} {:>5} {:>8} {:>7}  {}\n",
        "scenario", "injected", "sent", "acked", "delivered", "stored", "lost", "dup", "recovery", "bound", "result"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<18} {:<44} {:>7} {:>7} {:>9} {:>7} {:>5} {:>5} {:>8} {:>7}  {}\n",
            r.scenario,
            r.injected,
            r.sent,
            r.acked,
            r.delivered,
            r.stored,
            r.lost,
            r.duplicated,
            secs(r.recovery),
            secs(r.bound),
            if r.passed() { "ok" } else { "FAILED" }
        ));
    }
    for r in rows {
        out.push_str(&format!("\n{} ({:.0}s): {}\n", r.scenario, r.took.as_secs_f64(), r.details.join(", ")));
        for failure in &r.failures {
            out.push_str(&format!("  BROKEN: {failure}\n"));
        }
    }
    out
}

/// One JSON object per row.
pub fn json(row: &Row) -> serde_json::Value {
    serde_json::json!({
        "scenario": row.scenario,
        "injected": row.injected,
        "sent": row.sent,
        "acked": row.acked,
        "delivered": row.delivered,
        "stored": row.stored,
        "lost": row.lost,
        "duplicated": row.duplicated,
        "recovery_ms": row.recovery.map(|d| d.as_millis() as u64),
        "bound_ms": row.bound.map(|d| d.as_millis() as u64),
        "details": row.details,
        "failures": row.failures,
        "took_ms": row.took.as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_message_fails_the_row() {
        let mut row = Row::new("x", "y");
        row.judge(&Outcome { sent: 10, acked: 10, lost: 1, ..Outcome::default() });
        assert!(!row.passed());
        let mut row = Row::new("x", "y");
        row.judge(&Outcome { sent: 10, acked: 10, ..Outcome::default() });
        assert!(row.passed(), "{:?}", row.failures);
    }

    #[test]
    fn a_slow_recovery_fails_the_row() {
        let mut row = Row::new("x", "y");
        row.bound = Some(Duration::from_secs(10));
        row.judge(&Outcome { sent: 1, acked: 1, recovery: Some(Duration::from_secs(11)), ..Outcome::default() });
        assert!(!row.passed());
    }
}
