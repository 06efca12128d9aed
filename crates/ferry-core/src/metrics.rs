//! Process-wide metrics in the Prometheus text format, without a metrics framework: a few
//! named counters, gauges and one latency histogram family, all plain atomics, so that
//! counting on the data path costs one relaxed atomic add.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
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
    known_values: Index<Arc<AtomicU64>>,
    known_histograms: Index<Arc<Histogram>>,
}

/// Handles already looked up, by name and label pairs as given. Data paths look a metric up per
/// request when a label is known only then (status code, system); a hit takes a read lock and
/// allocates nothing, where the rendered key costs a dozen allocations and two global locks.
struct Index<T> {
    /// Hash of (name, pairs) → entries with that hash.
    map: RwLock<HashMap<u64, Vec<IndexEntry<T>>, foldhash::fast::RandomState>>,
}

struct IndexEntry<T> {
    name: Box<str>,
    pairs: Box<[(Box<str>, Box<str>)]>,
    handle: T,
}

impl<T> Default for Index<T> {
    fn default() -> Self {
        Self { map: RwLock::new(HashMap::default()) }
    }
}

/// foldhash, not SipHash: looked up several times per request, and the keys are the program's
/// own metric names and labels, not an attacker's choice.
fn index_hash(name: &str, pairs: &[(&str, &str)]) -> u64 {
    use std::hash::BuildHasher;
    let mut h = foldhash::fast::FixedState::with_seed(0x6665_7272_795f_6d65).build_hasher();
    name.hash(&mut h);
    pairs.hash(&mut h);
    h.finish()
}

impl<T: Clone> Index<T> {
    fn get(&self, hash: u64, name: &str, pairs: &[(&str, &str)]) -> Option<T> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let same = |e: &&IndexEntry<T>| {
            *e.name == *name
                && e.pairs.len() == pairs.len()
                && e.pairs.iter().zip(pairs).all(|((k, v), (k2, v2))| **k == **k2 && **v == **v2)
        };
        map.get(&hash)?.iter().find(same).map(|e| e.handle.clone())
    }

    fn insert(&self, hash: u64, name: &str, pairs: &[(&str, &str)], handle: T) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let entries = map.entry(hash).or_default();
        let pairs: Box<[(Box<str>, Box<str>)]> = pairs.iter().map(|(k, v)| (Box::from(*k), Box::from(*v))).collect();
        if !entries.iter().any(|e| *e.name == *name && e.pairs == pairs) {
            entries.push(IndexEntry { name: name.into(), pairs, handle });
        }
    }
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
        let hash = index_hash(name, pairs);
        if let Some(handle) = self.known_values.get(hash, name, pairs) {
            return handle;
        }
        self.help.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_owned()).or_insert(help);
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let handle = values
            .entry((name.to_owned(), labels(pairs)))
            .or_insert_with(|| (kind, Arc::new(AtomicU64::new(0))))
            .1
            .clone();
        drop(values);
        self.known_values.insert(hash, name, pairs, handle.clone());
        handle
    }

    /// A counter; keep the returned handle on hot paths instead of looking it up each time.
    pub fn counter(&self, name: &str, help: &'static str, pairs: &[(&str, &str)]) -> Arc<AtomicU64> {
        self.slot(Kind::Counter, name, help, pairs)
    }

    pub fn gauge(&self, name: &str, help: &'static str, pairs: &[(&str, &str)]) -> Arc<AtomicU64> {
        self.slot(Kind::Gauge, name, help, pairs)
    }

    pub fn histogram(&self, name: &str, help: &'static str, pairs: &[(&str, &str)]) -> Arc<Histogram> {
        let hash = index_hash(name, pairs);
        if let Some(handle) = self.known_histograms.get(hash, name, pairs) {
            return handle;
        }
        self.help.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_owned()).or_insert(help);
        let mut h = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let handle = h.entry((name.to_owned(), labels(pairs))).or_default().clone();
        drop(h);
        self.known_histograms.insert(hash, name, pairs, handle.clone());
        handle
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

    /// Repeated lookups (the data path's, answered from the index) return the one series of
    /// their name and labels, and never another's.
    #[test]
    fn repeated_lookups_share_one_series() {
        let r = Registry::default();
        let a = r.counter("ferry_c_total", "C.", &[("a", "bc")]);
        let b = r.counter("ferry_c_total", "C.", &[("ab", "c")]);
        let none = r.counter("ferry_c_total", "C.", &[]);
        for _ in 0..3 {
            r.counter("ferry_c_total", "C.", &[("a", "bc")]).fetch_add(1, Ordering::Relaxed);
        }
        r.counter("ferry_c_total", "C.", &[("ab", "c")]).fetch_add(10, Ordering::Relaxed);
        assert!(Arc::ptr_eq(&a, &r.counter("ferry_c_total", "C.", &[("a", "bc")])));
        assert_eq!((a.load(Ordering::Relaxed), b.load(Ordering::Relaxed), none.load(Ordering::Relaxed)), (3, 10, 0));
        let h = r.histogram("ferry_h_seconds", "H.", &[("system", "x")]);
        r.histogram("ferry_h_seconds", "H.", &[("system", "x")]).observe(Duration::from_millis(1));
        assert_eq!(h.count.load(Ordering::Relaxed), 1);
        assert_eq!(r.histogram("ferry_h_seconds", "H.", &[("system", "y")]).count.load(Ordering::Relaxed), 0);
        let text = r.render();
        assert!(text.contains("ferry_c_total{a=\"bc\"} 3\n"), "{text}");
        assert!(text.contains("ferry_c_total{ab=\"c\"} 10\n"), "{text}");
    }
}
