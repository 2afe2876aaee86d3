//! A run's results: a table on the terminal, the same as JSON, and the latency percentiles as an SVG plot.
//!
//! It formats what the scenarios measured and computes nothing else.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The percentiles a report lists, and the plot marks.
const PERCENTILES: [(f64, &str); 4] = [(50.0, "p50"), (99.0, "p99"), (99.9, "p99.9"), (100.0, "max")];

#[derive(Debug)]
pub struct Report {
    scenario: String,
    params: Value,
    /// Figures in the order they were set.
    rows: Vec<(String, Value)>,
    /// End-to-end latency histograms (microseconds), by label (`fleet`, `floor`, ...).
    latencies: Vec<(String, Histogram<u64>)>,
    /// CPU seconds by process name, by label.
    cpu: Vec<(String, BTreeMap<String, f64>)>,
}

impl Report {
    pub fn new(scenario: &str, params: Value) -> Report {
        Report { scenario: scenario.to_owned(), params, rows: Vec::new(), latencies: Vec::new(), cpu: Vec::new() }
    }

    /// Set a figure; setting it again replaces the value and keeps its place.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        let (key, value) = (key.into(), value.into());
        match self.rows.iter_mut().find(|(k, _)| *k == key) {
            Some(row) => row.1 = value,
            None => self.rows.push((key, value)),
        }
    }

    pub fn latency(&mut self, label: &str, histogram: Histogram<u64>) {
        self.latencies.push((label.to_owned(), histogram));
    }

    pub fn cpu(&mut self, label: &str, by_process: BTreeMap<String, f64>) {
        self.cpu.push((label.to_owned(), by_process));
    }

    pub fn get_u64(&self, key: &str) -> u64 {
        self.rows.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.as_u64()).unwrap_or(0)
    }

    pub fn print(&self) {
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(10).max(24);
        println!("\n== {} ==  {}", self.scenario, self.params);
        for (key, value) in &self.rows {
            let shown = match value {
                Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("  {key:<width$}  {shown}");
        }
        if !self.latencies.is_empty() {
            let header: Vec<String> = PERCENTILES.iter().map(|(_, name)| format!("{name:>9}")).collect();
            println!("  {:<width$}  {}  {:>10}  (milliseconds)", "latency", header.join(""), "count");
            for (label, h) in &self.latencies {
                let cells: Vec<String> = PERCENTILES.iter().map(|(p, _)| format!("{:>9.2}", ms(h, *p))).collect();
                println!("  {label:<width$}  {}  {:>10}", cells.join(""), h.len());
            }
        }
        for (label, by_process) in &self.cpu {
            let parts: Vec<String> = by_process.iter().map(|(name, secs)| format!("{name} {secs:.2}s")).collect();
            println!("  {:<width$}  {}", format!("cpu ({label})"), parts.join(", "));
        }
    }

    pub fn to_json(&self) -> Value {
        let rows: Map<String, Value> = self.rows.iter().cloned().collect();
        let latencies: Map<String, Value> = self
            .latencies
            .iter()
            .map(|(label, h)| {
                let mut m: Map<String, Value> =
                    PERCENTILES.iter().map(|(p, name)| (format!("{name}_ms"), json!(ms(h, *p)))).collect();
                m.insert("count".into(), json!(h.len()));
                (label.clone(), Value::Object(m))
            })
            .collect();
        let cpu: Map<String, Value> = self.cpu.iter().map(|(label, c)| (label.clone(), json!(c))).collect();
        json!({"scenario": self.scenario, "params": self.params, "results": rows, "latency": latencies,
               "cpu_secs": cpu})
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(&self.to_json())? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Latency by percentile, one line per histogram; the x axis is log(1 / (1 - p)), as percentile plots are.
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.svg()).with_context(|| format!("writing {}", path.display()))
    }

    fn svg(&self) -> String {
        let (w, h, left, bottom, top, right) = (720.0, 420.0, 70.0, 50.0, 40.0, 130.0);
        let max_x = 4.0; // up to 99.99 %
        let max_ms = self.latencies.iter().map(|(_, h)| ms(h, 99.99)).fold(1.0, f64::max) * 1.1;
        let x_of = |p: f64| left + (-(1.0 - p / 100.0).max(1e-4).log10()).min(max_x) / max_x * (w - left - right);
        let y_of = |v: f64| h - bottom - v / max_ms * (h - bottom - top);
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="24" font-size="14">{} latency by percentile (ms)</text>
"#,
            self.scenario
        );
        for (p, label) in [(0.0, "0"), (90.0, "90"), (99.0, "99"), (99.9, "99.9"), (99.99, "99.99")] {
            let x = x_of(p);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}%</text>"##,
                h - bottom,
                h - bottom + 18.0
            );
        }
        for i in 0..=4 {
            let v = max_ms * i as f64 / 4.0;
            let y = y_of(v);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.1}</text>"##,
                w - right,
                left - 6.0,
                y + 4.0
            );
        }
        let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
        for (i, (label, hist)) in self.latencies.iter().enumerate() {
            let colour = colours[i % colours.len()];
            let points: Vec<String> = (0..=200)
                .map(|k| {
                    let p = 100.0 * (1.0 - 10f64.powf(-max_x * k as f64 / 200.0));
                    format!("{:.1},{:.1}", x_of(p), y_of(ms(hist, p)))
                })
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/><text x="{:.1}" y="{:.1}" fill="{colour}">{label}</text>"#,
                points.join(" "),
                w - right + 8.0,
                top + 16.0 * (i as f64 + 1.0)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// The value at percentile `p` (0..=100) in milliseconds.
fn ms(h: &Histogram<u64>, p: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    let us = if p >= 100.0 { h.max() } else { h.value_at_percentile(p) };
    us as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_svg_carry_the_figures() {
        let mut report = Report::new("fanout", json!({"rooms": 1}));
        report.set("lost", 0u64);
        let mut h = crate::deliveries::histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        report.latency("fleet", h);
        let j = report.to_json();
        assert_eq!(j["results"]["lost"], 0);
        assert!((j["latency"]["fleet"]["p50_ms"].as_f64().unwrap() - 5.0).abs() < 0.05);
        assert_eq!(j["latency"]["fleet"]["count"], 1000);
        let svg = report.svg();
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.trim_end().ends_with("</svg>"));
    }
}
