//! Process-wide metrics in the Prometheus text format, without a metrics framework: a few
//! named counters, gauges and one latency histogram family, all plain atomics, so that
//! counting on the data path costs one relaxed atomic add.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// A metric name plus its labels, rendered `name{a="b",c="d"}`.
type Key = (String, String);

#[derive(Default)]
pub struct Registry {
    values: Mutex<BTreeMap<Key, (Kind, Arc<AtomicU64>)>>,
    histograms: Mutex<BTreeMap<Key, Arc<Histogram>>>,
    help: Mutex<BTreeMap<String, &'static str>>,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Registry {
    fn slot(&self, kind: Kind, name: &str, help: &'static str, pairs: &[(&str, &str)]) -> Arc<AtomicU64> {
        self.help.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_owned()).or_insert(help);
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.entry((name.to_owned(), labels(pairs))).or_insert_with(|| (kind, Arc::new(AtomicU64::new(0)))).1.clone()
    }

    /// A counter; keep the returned handle on hot paths instead of looking it up each time.
    pub fn counter(&self, name: &str, help: &'static str, pairs: &[(&str, &str)]) -> Arc<AtomicU64> {
        self.slot(Kind::Counter, name, help, pairs)
    }

    pub fn gauge(&self, name: &str, help: &'static str, pairs: &[(&str, &str)]) -> Arc<AtomicU64> {
        self.slot(Kind::Gauge, name, help, pairs)
    }

    pub fn histogram(&self, name: &str, help: &'static str, pairs: &[(&str, &str)]) -> Arc<Histogram> {
        self.help.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_owned()).or_insert(help);
        let mut h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        h.entry((name.to_owned(), labels(pairs))).or_default().clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let help = self.help.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = String::new();
        let mut last = String::new();
        for ((name, lbl), (kind, v)) in self.values.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}", help.get(name).copied().unwrap_or(""));
                let _ = writeln!(out, "# TYPE {name} {}", if *kind == Kind::Counter { "counter" } else { "gauge" });
                last = name.clone();
            }
            let _ = writeln!(out, "{name}{lbl} {}", v.load(Ordering::Relaxed));
        }
        for ((name, lbl), h) in self.histograms.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if *name != last {
                let _ = writeln!(out, "# HELP {name} {}", help.get(name).copied().unwrap_or(""));
                let _ = writeln!(out, "# TYPE {name} histogram");
                last = name.clone();
            }
            let inner = lbl.trim_start_matches('{').trim_end_matches('}');
            let sep = if inner.is_empty() { "" } else { "," };
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ =
                    writeln!(out, "{name}_bucket{{{inner}{sep}le=\"{le}\"}} {}", h.buckets[i].load(Ordering::Relaxed));
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{inner}{sep}le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{lbl} {}", h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
            let _ = writeln!(out, "{name}_count{lbl} {count}");
        }
        out
    }
}

/// The process's registry.
pub fn global() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

/// Adds one to a gauge now and takes it away when dropped (open connections, streams).
pub struct GaugeGuard(Arc<AtomicU64>);

impl GaugeGuard {
    pub fn new(g: Arc<AtomicU64>) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        Self(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::default();
        r.counter("ferry_x_total", "Things.", &[("kind", "a\"b")]).fetch_add(3, Ordering::Relaxed);
        let g = r.gauge("ferry_open", "Open.", &[]);
        {
            let _guard = GaugeGuard::new(g.clone());
            assert_eq!(g.load(Ordering::Relaxed), 1);
        }
        assert_eq!(g.load(Ordering::Relaxed), 0);
        r.histogram("ferry_lat_seconds", "Latency.", &[("system", "s")]).observe(Duration::from_millis(3));
        let text = r.render();
        assert!(text.contains("# TYPE ferry_x_total counter\nferry_x_total{kind=\"a\\\"b\"} 3\n"), "{text}");
        assert!(text.contains("ferry_open 0"), "{text}");
        assert!(text.contains("ferry_lat_seconds_bucket{system=\"s\",le=\"0.0025\"} 0"), "{text}");
        assert!(text.contains("ferry_lat_seconds_bucket{system=\"s\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("ferry_lat_seconds_count{system=\"s\"} 1"), "{text}");
    }
}
