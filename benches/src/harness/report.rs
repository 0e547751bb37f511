//! Summaries (median, min, max, ratio to the kernel), the terminal table, JSON, a markdown table
//! for the README and a hand-written SVG chart.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::{metric, metrics_of, Results, TESTS};

/// The reference dataplane for ratios.
pub const REFERENCE: &str = "kernel";

/// A number with about three significant digits.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// One cell of the summary.
pub struct Cell {
    pub test: String,
    pub metric: String,
    pub dataplane: String,
    /// "ok", "n/a: why" or "error: what".
    pub status: String,
    pub samples: Vec<f64>,
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub ratio: Option<f64>,
}

/// Every (test, metric, dataplane that was set up) with its status.
pub fn summarize(r: &Results) -> Vec<Cell> {
    let mut cells = Vec::new();
    let up: Vec<&(String, String, Vec<String>, bool)> =
        r.dataplanes.iter().filter(|d| d.1 == "ok").collect();
    for test in &r.tests {
        let def = TESTS.iter().find(|d| d.id == test).expect("known test");
        for m in metrics_of(test) {
            let md = metric(m);
            let refm = r
                .samples
                .get(&(test.clone(), m.to_string(), REFERENCE.to_string()))
                .map(|s| median(s));
            for (dp, _, _, has_process) in up.iter().map(|d| (&d.0, &d.1, &d.2, d.3)) {
                let key = (test.clone(), m.to_string(), dp.clone());
                let samples = r.samples.get(&key).cloned().unwrap_or_default();
                let has_c2 = !matches!(dp.as_str(), "pasta" | "slirp4netns");
                let status = if def.needs_c2 && !has_c2 {
                    "n/a: no container-to-container path".to_string()
                } else if md.needs_process && !has_process {
                    "n/a: forwarding runs in the kernel, not in a process".to_string()
                } else if samples.is_empty() {
                    let errs = r
                        .errors
                        .get(&(test.clone(), dp.clone()))
                        .cloned()
                        .unwrap_or_default();
                    format!(
                        "error: {}",
                        errs.first().map(String::as_str).unwrap_or("no sample")
                    )
                } else {
                    "ok".to_string()
                };
                let (med, min, max) = if samples.is_empty() {
                    (None, None, None)
                } else {
                    (
                        Some(median(&samples)),
                        samples.iter().copied().reduce(f64::min),
                        samples.iter().copied().reduce(f64::max),
                    )
                };
                let ratio = match (med, refm) {
                    (Some(v), Some(k)) if k > 0.0 => Some(v / k),
                    _ => None,
                };
                cells.push(Cell {
                    test: test.clone(),
                    metric: m.to_string(),
                    dataplane: dp.clone(),
                    status,
                    samples,
                    median: med,
                    min,
                    max,
                    ratio,
                });
            }
        }
    }
    cells
}

fn title(test: &str) -> &'static str {
    TESTS
        .iter()
        .find(|d| d.id == test)
        .map(|d| d.title)
        .unwrap_or("?")
}

/// The table printed at the end of a run.
pub fn terminal_table(r: &Results, cells: &[Cell]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nswitchyard-bench: {} rep(s), medians with min..max, ratio to {REFERENCE} from this run",
        r.reps
    );
    if !r.generator.is_empty() {
        let _ = writeln!(
            o,
            "UDP generator ceiling on loopback: {} Mpps sent, {} Mpps received",
            num(r.generator[0].1),
            num(r.generator[1].1)
        );
    }
    let mut last = (String::new(), String::new());
    for c in cells {
        if (c.test.clone(), c.metric.clone()) != last {
            let md = metric(&c.metric);
            let _ = writeln!(
                o,
                "\n{} [{}, {} is better]",
                title(&c.test),
                md.unit,
                if md.higher_is_better {
                    "higher"
                } else {
                    "lower"
                }
            );
            let _ = writeln!(
                o,
                "  {:<16} {:>10} {:>10} {:>10} {:>10}",
                "dataplane", "median", "min", "max", "vs kernel"
            );
            last = (c.test.clone(), c.metric.clone());
        }
        match (c.status.as_str(), c.median) {
            ("ok", Some(m)) => {
                let _ = writeln!(
                    o,
                    "  {:<16} {:>10} {:>10} {:>10} {:>10}",
                    c.dataplane,
                    num(m),
                    num(c.min.unwrap_or(m)),
                    num(c.max.unwrap_or(m)),
                    c.ratio
                        .map(|x| format!("{x:.2}x"))
                        .unwrap_or_else(|| "-".into())
                );
            }
            (s, _) => {
                let mut s = s.to_string();
                s.truncate(100);
                let _ = writeln!(o, "  {:<16} {s}", c.dataplane);
            }
        }
    }
    o
}

/// A UTC date-time from unix seconds (civil-from-days).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

pub fn to_json(r: &Results, cells: &[Cell]) -> Value {
    let versions: serde_json::Map<String, Value> = r
        .versions
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "harness": "switchyard-bench",
        "date": utc(r.started_unix),
        "started_unix": r.started_unix,
        "elapsed_s": r.elapsed_s,
        "config": {
            "quick": r.quick,
            "reps": r.reps,
            "tcp_secs": r.tcp_secs,
            "secs": r.secs,
            "tests": r.tests,
            "reference": REFERENCE,
            "udp_payload_bytes": super::work::UDP_PAYLOAD,
            "udp_flows": super::work::UDP_FLOWS,
            "rr_message_bytes": super::work::RR_BYTES,
        },
        "versions": versions,
        "generator_ceiling": r.generator.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "dataplanes": r.dataplanes.iter().map(|(n, s, notes, p)| json!({
            "name": n, "status": s, "notes": notes, "cpu_accounted": p,
        })).collect::<Vec<_>>(),
        "results": cells.iter().map(|c| {
            let md = metric(&c.metric);
            json!({
                "test": c.test,
                "title": title(&c.test),
                "metric": c.metric,
                "unit": md.unit,
                "higher_is_better": md.higher_is_better,
                "dataplane": c.dataplane,
                "status": c.status,
                "samples": c.samples,
                "median": c.median,
                "min": c.min,
                "max": c.max,
                "ratio_to_kernel": c.ratio,
            })
        }).collect::<Vec<_>>(),
        "errors": r.errors.iter().map(|((t, d), e)| json!({"test": t, "dataplane": d, "errors": e})).collect::<Vec<_>>(),
    })
}

/// The headline figures shown in the README table and the chart.
const HEADLINE: &[(&str, &str)] = &[
    ("tcp_c2c", "gbps"),
    ("tcp_nat", "gbps"),
    ("tcp_pub", "gbps"),
    ("udp_c2c", "mpps"),
    ("udp_nat", "mpps"),
    ("rr_c2c", "p50_us"),
    ("rr_c2c", "p99_us"),
    ("rr_nat", "p50_us"),
    ("rr_nat", "p99_us"),
    ("cps_nat", "cps"),
    ("tcp_c2c", "cpu_s_per_gbit"),
    ("tcp_nat", "cpu_s_per_gbit"),
    ("udp_c2c", "cpu_s_per_mpkt"),
];

fn dataplanes_up(r: &Results) -> Vec<String> {
    r.dataplanes
        .iter()
        .filter(|d| d.1 == "ok")
        .map(|d| d.0.clone())
        .collect()
}

fn find<'a>(cells: &'a [Cell], t: &str, m: &str, dp: &str) -> Option<&'a Cell> {
    cells
        .iter()
        .find(|c| c.test == t && c.metric == m && c.dataplane == dp)
}

/// A markdown table (rows: figures, columns: dataplanes) for the README.
pub fn markdown(r: &Results, cells: &[Cell], chart: &str) -> String {
    let dps = dataplanes_up(r);
    let mut o = String::new();
    let v: std::collections::BTreeMap<&str, &str> = r
        .versions
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let _ = writeln!(
        o,
        "Measured {} on {} (kernel {}), {} {}; medians of {} run(s), dataplanes interleaved; \
         in parentheses the ratio to the kernel bridge + iptables from the same run. \
         `switchyard-bench` in `benches/` made this table and the chart.\n",
        utc(r.started_unix),
        v.get("cpu").copied().unwrap_or("?"),
        v.get("kernel").copied().unwrap_or("?"),
        v.get("switchyard").copied().unwrap_or("switchyard ?"),
        v.get("iperf3")
            .map(|s| s.split(" (").next().unwrap_or(s))
            .unwrap_or(""),
        r.reps
    );
    let _ = writeln!(o, "![switchyard-bench chart]({chart})\n");
    let _ = write!(o, "| figure |");
    for d in &dps {
        let _ = write!(o, " {d} |");
    }
    let _ = write!(o, "\n|---|");
    for _ in &dps {
        let _ = write!(o, "---|");
    }
    o.push('\n');
    for (t, m) in HEADLINE {
        if !r.tests.iter().any(|x| x == t) {
            continue;
        }
        let md = metric(m);
        let _ = write!(o, "| {} ({}) |", title(t), md.unit);
        for d in &dps {
            let cell = match find(cells, t, m, d) {
                Some(c) if c.status == "ok" => {
                    let mut s = num(c.median.unwrap_or(0.0));
                    if let Some(x) = c.ratio {
                        let _ = write!(s, " ({x:.2}x)");
                    }
                    s
                }
                Some(c) if c.status.starts_with("n/a") => "n/a".into(),
                Some(_) => "failed".into(),
                None => "-".into(),
            };
            let _ = write!(o, " {cell} |");
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "\nUDP: {}-byte payloads (64-byte frames) from our own generator over {} flows; its own \
         ceiling on loopback was {} Mpps. CPU: user + system seconds of the dataplane process \
         (switchyard daemon, ovs-vswitchd, pasta, slirp4netns); n/a for the kernel, which \
         forwards in softirq context.",
        super::work::UDP_PAYLOAD,
        super::work::UDP_FLOWS,
        r.generator
            .iter()
            .find(|g| g.0 == "sent_mpps")
            .map(|g| num(g.1))
            .unwrap_or_else(|| "?".into())
    );
    o
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const COLORS: &[&str] = &[
    "#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
];

/// Small multiples: one panel per headline figure, one bar per dataplane (median), a whisker
/// for min..max and the ratio to the kernel as a label.
pub fn svg(r: &Results, cells: &[Cell]) -> String {
    let dps = dataplanes_up(r);
    let figs: Vec<(&str, &str)> = HEADLINE
        .iter()
        .copied()
        .filter(|(t, _)| r.tests.iter().any(|x| x == t))
        .collect();
    let (pw, cols) = (470.0_f64, 2usize);
    let bar_h = 16.0;
    let ph = 44.0 + dps.len() as f64 * (bar_h + 6.0) + 10.0;
    let rows = figs.len().div_ceil(cols);
    let width = pw * cols as f64 + 20.0;
    let height = 70.0 + ph * rows as f64;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        o,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">switchyard-bench: {} ({} rep(s), medians, whiskers min..max, ratio to kernel)</text>"#,
        esc(&utc(r.started_unix)),
        r.reps
    );
    let cpu = r
        .versions
        .iter()
        .find(|v| v.0 == "cpu")
        .map(|v| v.1.clone())
        .unwrap_or_default();
    let _ = writeln!(
        o,
        r##"<text x="10" y="40" fill="#555">{}</text>"##,
        esc(&format!(
            "{cpu}; same topology per dataplane (2 containers on a /24, an outside namespace behind SNAT, published port 8080 -> c1:80)"
        ))
    );
    for (i, (t, m)) in figs.iter().enumerate() {
        let x0 = 10.0 + (i % cols) as f64 * pw;
        let y0 = 60.0 + (i / cols) as f64 * ph;
        let md = metric(m);
        let _ = writeln!(
            o,
            r#"<text x="{x0}" y="{}" font-weight="bold">{} [{}, {}]</text>"#,
            y0 + 14.0,
            esc(title(t)),
            esc(md.unit),
            if md.higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            }
        );
        let maxv = dps
            .iter()
            .filter_map(|d| find(cells, t, m, d))
            .filter_map(|c| c.max.or(c.median))
            .fold(0.0_f64, f64::max);
        let label_w = 110.0;
        let plot_w = pw - label_w - 120.0;
        for (j, d) in dps.iter().enumerate() {
            let y = y0 + 26.0 + j as f64 * (bar_h + 6.0);
            let color = COLORS[j % COLORS.len()];
            let _ = writeln!(
                o,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                x0 + label_w - 6.0,
                y + bar_h - 4.0,
                esc(d)
            );
            let bx = x0 + label_w;
            match find(cells, t, m, d) {
                Some(c) if c.status == "ok" && maxv > 0.0 => {
                    let v = c.median.unwrap_or(0.0);
                    let w = (v / maxv * plot_w).max(1.0);
                    let _ = writeln!(
                        o,
                        r#"<rect x="{bx}" y="{y}" width="{w:.1}" height="{bar_h}" fill="{color}"/>"#
                    );
                    if let (Some(lo), Some(hi)) = (c.min, c.max) {
                        if hi > lo {
                            let (a, b) = (bx + lo / maxv * plot_w, bx + hi / maxv * plot_w);
                            let ym = y + bar_h / 2.0;
                            let _ = writeln!(
                                o,
                                r#"<path d="M{a:.1} {ym} H{b:.1} M{a:.1} {} V{} M{b:.1} {} V{}" stroke="black" fill="none"/>"#,
                                y + 3.0,
                                y + bar_h - 3.0,
                                y + 3.0,
                                y + bar_h - 3.0
                            );
                        }
                    }
                    let mut label = num(v);
                    if let Some(x) = c.ratio {
                        let _ = write!(label, " ({x:.2}x)");
                    }
                    let _ = writeln!(
                        o,
                        r#"<text x="{:.1}" y="{}">{}</text>"#,
                        bx + w.max(c.max.unwrap_or(0.0) / maxv * plot_w) + 5.0,
                        y + bar_h - 4.0,
                        esc(&label)
                    );
                }
                Some(c) => {
                    let s = if c.status.starts_with("n/a") {
                        "n/a"
                    } else {
                        "failed"
                    };
                    let _ = writeln!(
                        o,
                        r##"<text x="{bx}" y="{}" fill="#888">{s}</text>"##,
                        y + bar_h - 4.0
                    );
                }
                None => {}
            }
        }
    }
    o.push_str("</svg>\n");
    o
}
