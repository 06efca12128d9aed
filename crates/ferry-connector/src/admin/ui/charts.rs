//! The monitoring page's data: every [`STEP`] a sampler reads the connector's counters from the
//! process's metrics registry (requests allowed and denied, HTTP body bytes, backend latency) and
//! keeps the differences in a ring of [`KEEP`] samples; pages draw them as server-side SVG.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::{UiRef, esc};

/// Sample width: short enough that a request shows up within seconds.
pub(super) const STEP: Duration = Duration::from_secs(10);
/// One hour of samples.
const KEEP: usize = 360;
/// Narrowest time window a chart shows, in samples.
const MIN_SLOTS: usize = 30;

/// Cumulative counters as read from the registry.
#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    allowed: u64,
    denied: u64,
    bytes: u64,
    latency_count: u64,
    latency_seconds: f64,
}

/// What happened during one step.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sample {
    pub end: SystemTime,
    pub requests: u64,
    pub denied: u64,
    pub bytes: u64,
    /// Mean backend latency of the step in milliseconds (0 without backend requests).
    pub latency_ms: f64,
}

#[derive(Default)]
struct State {
    last: Option<Totals>,
    samples: VecDeque<Sample>,
}

#[derive(Default)]
pub(super) struct Monitor {
    state: Mutex<State>,
}

/// Reads the connector's counters from the Prometheus text of the process's registry, summing
/// over label sets (protocols, systems).
fn totals() -> Totals {
    let text = ferry_core::metrics::global().render();
    let mut t = Totals::default();
    for line in text.lines().filter(|l| l.starts_with("ferry_connector_")) {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let name = key.split('{').next().unwrap_or(key);
        let int = || value.parse::<u64>().unwrap_or(0);
        match name {
            "ferry_connector_requests_total" if key.contains("decision=\"denied\"") => t.denied += int(),
            "ferry_connector_requests_total" => t.allowed += int(),
            "ferry_connector_http_bytes_total" => t.bytes += int(),
            "ferry_connector_backend_seconds_count" => t.latency_count += int(),
            "ferry_connector_backend_seconds_sum" => t.latency_seconds += value.parse::<f64>().unwrap_or(0.0),
            _ => {}
        }
    }
    t
}

fn diff(now: Totals, before: Totals, end: SystemTime) -> Sample {
    let count = now.latency_count.saturating_sub(before.latency_count);
    let secs = (now.latency_seconds - before.latency_seconds).max(0.0);
    Sample {
        end,
        requests: (now.allowed + now.denied).saturating_sub(before.allowed + before.denied),
        denied: now.denied.saturating_sub(before.denied),
        bytes: now.bytes.saturating_sub(before.bytes),
        latency_ms: if count == 0 { 0.0 } else { secs * 1000.0 / count as f64 },
    }
}

impl Monitor {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tick(&self) {
        let now = totals();
        let mut s = self.lock();
        if let Some(before) = s.last {
            s.samples.push_back(diff(now, before, SystemTime::now()));
            while s.samples.len() > KEEP {
                s.samples.pop_front();
            }
        }
        s.last = Some(now);
    }

    /// The kept samples plus the step in progress, oldest first.
    pub(super) fn samples(&self) -> Vec<Sample> {
        let now = totals();
        let s = self.lock();
        let mut out: Vec<Sample> = s.samples.iter().copied().collect();
        out.push(diff(now, s.last.unwrap_or_default(), SystemTime::now()));
        out
    }
}

pub(super) fn spawn_sampler(ui: UiRef) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    if let Some(u) = ui.upgrade() {
        u.monitor.tick();
    }
    rt.spawn(async move {
        let mut every = tokio::time::interval(STEP);
        every.tick().await;
        loop {
            every.tick().await;
            // The UI went away with its server: stop sampling.
            let Some(u) = ui.upgrade() else { break };
            u.monitor.tick();
        }
    });
}

fn clock(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    format!("{:02}:{:02}:{:02}", dt.hour(), dt.minute(), dt.second())
}

/// One line chart as inline SVG (presentation attributes only: the page's CSP forbids inline
/// styles). `data-total` and `data-max` let tests and scripts read the numbers.
pub(super) fn svg(id: &str, title: &str, unit: &str, samples: &[Sample], value: impl Fn(&Sample) -> f64) -> String {
    const W: f64 = 640.0;
    const H: f64 = 160.0;
    const PAD: f64 = 36.0;
    let values: Vec<f64> = samples.iter().map(&value).collect();
    let max = values.iter().copied().fold(0.0, f64::max);
    let total: f64 = values.iter().sum();
    let scale = if max > 0.0 { max } else { 1.0 };
    // At least five minutes wide, newest on the right, so a fresh start does not stretch two
    // samples over the whole chart.
    let slots = values.len().max(MIN_SLOTS);
    let offset = slots - values.len();
    let x = |i: usize| PAD + (W - PAD - 8.0) * (i + offset) as f64 / (slots - 1) as f64;
    let y = |v: f64| H - 20.0 - (H - 32.0) * v / scale;
    let mut points = String::new();
    for (i, v) in values.iter().enumerate() {
        let _ = write!(points, "{:.1},{:.1} ", x(i), y(*v));
    }
    let fmt = |v: f64| if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.2}") };
    let (from, to) = match (samples.first(), samples.last()) {
        (Some(a), Some(b)) => (clock(a.end), clock(b.end)),
        _ => (String::new(), String::new()),
    };
    let mut dots = String::new();
    for (i, v) in values.iter().enumerate().filter(|(_, v)| **v > 0.0) {
        let _ = write!(
            dots,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#1f6feb\"><title>{} {}</title></circle>",
            x(i),
            y(*v),
            fmt(*v),
            esc(unit)
        );
    }
    format!(
        "<figure class=\"chart\"><figcaption>{t} <span class=\"chart-total\">peak {max} {u}</span></figcaption>\
         <svg id=\"{id}\" role=\"img\" aria-label=\"{t}\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" \
         data-total=\"{total}\" data-max=\"{max}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <line x1=\"{PAD}\" y1=\"{H0}\" x2=\"{W1}\" y2=\"{H0}\" stroke=\"#999\"/>\
         <line x1=\"{PAD}\" y1=\"12\" x2=\"{PAD}\" y2=\"{H0}\" stroke=\"#999\"/>\
         <text x=\"{L}\" y=\"16\" font-size=\"11\" text-anchor=\"end\" fill=\"#555\">{max}</text>\
         <text x=\"{L}\" y=\"{H0}\" font-size=\"11\" text-anchor=\"end\" fill=\"#555\">0</text>\
         <text x=\"{PAD}\" y=\"{HL}\" font-size=\"11\" fill=\"#555\">{from}</text>\
         <text x=\"{W1}\" y=\"{HL}\" font-size=\"11\" text-anchor=\"end\" fill=\"#555\">{to} UTC</text>\
         <polyline fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"2\" points=\"{points}\"/>{dots}</svg></figure>",
        t = esc(title),
        u = esc(unit),
        id = esc(id),
        max = fmt(max),
        total = fmt(total),
        H0 = H - 20.0,
        HL = H - 4.0,
        W1 = W - 8.0,
        L = PAD - 4.0,
    )
}
