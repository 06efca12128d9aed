//! The circuit breaker the SAP Cloud SDK puts around token and Destination Service calls
//! (CLIENT-CONTRACT §3.1: opossum with 50 % errors over at least 10 calls, open for 30 s,
//! keyed by service URL and tenant, and only non-4xx errors count). While a breaker is open,
//! calls fail at once instead of piling up on a service that is down; after the open time one
//! trial call goes through, and its outcome closes or reopens the breaker.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{ClientError, Hop};

/// When a breaker opens and for how long. The default is the SDK's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerOptions {
    /// Opens when more than this percentage of the calls in the window failed…
    pub error_threshold_percent: u32,
    /// …and the window holds at least this many calls.
    pub volume_threshold: usize,
    /// How long an open breaker refuses calls before letting a trial call through.
    pub reset_timeout: Duration,
    /// Calls older than this no longer count (opossum's `rollingCountTimeout`).
    pub rolling_window: Duration,
    /// `false` turns the breakers off.
    pub enabled: bool,
}

impl Default for BreakerOptions {
    fn default() -> Self {
        Self {
            error_threshold_percent: 50,
            volume_threshold: 10,
            reset_timeout: Duration::from_secs(30),
            rolling_window: Duration::from_secs(10),
            enabled: true,
        }
    }
}

enum State {
    /// Outcomes of recent calls (`true` = failed).
    Closed(VecDeque<(Instant, bool)>),
    Open {
        until: Instant,
    },
    /// One trial call is under way; everything else is refused until it ends.
    HalfOpen,
}

#[derive(Default)]
struct Inner {
    options: BreakerOptions,
    states: HashMap<String, State>,
}

/// The breakers of one client, one per key.
#[derive(Default)]
pub(crate) struct Breakers {
    inner: Mutex<Inner>,
}

/// How a call ended, as the breaker counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    /// 4xx answers (and "not found") are the caller's problem, not the service's: they count
    /// as successes, as the SDK's error filter makes them.
    pub(crate) fn of<T>(result: &Result<T, ClientError>) -> Outcome {
        match result {
            Ok(_) | Err(ClientError::NotFound { .. }) => Outcome::Success,
            Err(e) if e.status().is_some_and(|s| (400..500).contains(&s)) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

/// Admission to one call; report its outcome with [`Permit::record`]. Dropped unrecorded (the
/// call was cancelled), a trial call lets the next caller try instead.
pub(crate) struct Permit<'a> {
    breakers: &'a Breakers,
    key: Option<String>,
}

impl Breakers {
    pub(crate) fn set_options(&self, options: BreakerOptions) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.options = options;
        inner.states.clear();
    }

    /// Admits a call to `url` under `key`, or refuses it while the breaker is open.
    pub(crate) fn admit(&self, key: &str, hop: Hop, url: &str) -> Result<Permit<'_>, ClientError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !inner.options.enabled {
            return Ok(Permit { breakers: self, key: None });
        }
        let now = Instant::now();
        let reset = inner.options.reset_timeout;
        let state = inner.states.entry(key.to_owned()).or_insert_with(|| State::Closed(VecDeque::new()));
        match state {
            State::Closed(_) => {}
            State::Open { until } if now >= *until => *state = State::HalfOpen,
            State::Open { .. } | State::HalfOpen => {
                return Err(ClientError::CircuitOpen {
                    hop,
                    url: url.to_owned(),
                    message: format!(
                        "circuit breaker open after repeated failures; no calls for up to {} s",
                        reset.as_secs_f64().ceil()
                    ),
                });
            }
        }
        Ok(Permit { breakers: self, key: Some(key.to_owned()) })
    }
}

impl Permit<'_> {
    pub(crate) fn record(mut self, outcome: Outcome) {
        let Some(key) = self.key.take() else { return };
        let mut inner = self.breakers.inner.lock().unwrap_or_else(|p| p.into_inner());
        let options = inner.options.clone();
        let now = Instant::now();
        let Some(state) = inner.states.get_mut(&key) else { return };
        match state {
            State::HalfOpen | State::Open { .. } => {
                *state = match outcome {
                    Outcome::Success => State::Closed(VecDeque::new()),
                    Outcome::Failure => {
                        tracing::warn!(breaker = %key, "trial call failed; circuit breaker stays open");
                        State::Open { until: now + options.reset_timeout }
                    }
                };
            }
            State::Closed(window) => {
                window.push_back((now, outcome == Outcome::Failure));
                while window.front().is_some_and(|(t, _)| now.duration_since(*t) > options.rolling_window) {
                    window.pop_front();
                }
                let failures = window.iter().filter(|(_, failed)| *failed).count();
                if outcome == Outcome::Failure
                    && window.len() >= options.volume_threshold
                    && failures * 100 > window.len() * options.error_threshold_percent as usize
                {
                    tracing::warn!(
                        breaker = %key, failures, calls = window.len(),
                        "circuit breaker opens for {:?}", options.reset_timeout
                    );
                    *state = State::Open { until: now + options.reset_timeout };
                }
            }
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut inner = self.breakers.inner.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(state @ State::HalfOpen) = inner.states.get_mut(&key) {
                *state = State::Open { until: Instant::now() };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(reset: Duration) -> BreakerOptions {
        BreakerOptions { reset_timeout: reset, ..Default::default() }
    }

    fn call(b: &Breakers, outcome: Outcome) -> bool {
        match b.admit("k", Hop::DestinationService, "http://x") {
            Ok(p) => {
                p.record(outcome);
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn opens_after_the_volume_with_more_than_half_failing() {
        let b = Breakers::default();
        b.set_options(opts(Duration::from_secs(3600)));
        for _ in 0..9 {
            assert!(call(&b, Outcome::Failure));
        }
        // Fewer than 10 calls never open it, however many fail.
        assert!(call(&b, Outcome::Failure));
        assert!(!call(&b, Outcome::Success), "open after 10 failures");
        // Other keys are not affected.
        assert!(b.admit("other", Hop::DestinationService, "http://x").is_ok());
    }

    #[test]
    fn half_failing_is_not_more_than_half() {
        let b = Breakers::default();
        b.set_options(opts(Duration::from_secs(3600)));
        for i in 0..40 {
            assert!(call(&b, if i % 2 == 0 { Outcome::Success } else { Outcome::Failure }));
        }
    }

    #[test]
    fn a_trial_closes_or_reopens() {
        let b = Breakers::default();
        b.set_options(opts(Duration::ZERO));
        for _ in 0..10 {
            call(&b, Outcome::Failure);
        }
        // The open time is over at once: one trial at a time.
        let trial = b.admit("k", Hop::DestinationService, "http://x").unwrap();
        assert!(b.admit("k", Hop::DestinationService, "http://x").is_err());
        trial.record(Outcome::Failure);
        let trial = b.admit("k", Hop::DestinationService, "http://x").unwrap();
        drop(trial);
        // A cancelled trial lets the next caller try; a good one closes the breaker.
        assert!(call(&b, Outcome::Success));
        assert!(call(&b, Outcome::Failure));
        assert!(call(&b, Outcome::Success));
    }

    #[test]
    fn four_hundreds_do_not_count() {
        let e: Result<(), _> = Err(ClientError::Hop {
            hop: Hop::DestinationService,
            url: String::new(),
            status: Some(403),
            message: String::new(),
        });
        assert_eq!(Outcome::of(&e), Outcome::Success);
        let e: Result<(), _> = Err(ClientError::Hop {
            hop: Hop::TokenService,
            url: String::new(),
            status: Some(503),
            message: String::new(),
        });
        assert_eq!(Outcome::of(&e), Outcome::Failure);
    }
}
