//! The figures of a bench run: each value with its same-run baseline, the ratio between them
//! and the target it is held against, plus the settings and how busy the machine was.
//!
//! Targets are reported, never enforced: a missed target is a finding, not a failure.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use super::{BenchConfig, StoreKind, median};

/// The unit of a figure's value (and its baseline's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unit {
    #[serde(rename = "events/s")]
    EventsPerSecond,
    #[serde(rename = "saves/s")]
    SavesPerSecond,
    #[serde(rename = "records/s")]
    RecordsPerSecond,
    #[serde(rename = "ms")]
    Milliseconds,
    #[serde(rename = "MiB")]
    Mebibytes,
}

impl Unit {
    pub fn symbol(self) -> &'static str {
        match self {
            Unit::EventsPerSecond => "events/s",
            Unit::SavesPerSecond => "saves/s",
            Unit::RecordsPerSecond => "records/s",
            Unit::Milliseconds => "ms",
            Unit::Mebibytes => "MiB",
        }
    }
}

/// What a figure is compared with, measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// What the baseline does, e.g. "raw transactional producer".
    pub name: String,
    pub value: f64,
    /// More about the baseline's value (e.g. its MB/s), for the table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The spread of a ratio taken round by round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RatioRange {
    pub min: f64,
    pub max: f64,
    pub rounds: usize,
}

/// A goal a figure is held against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "limit")]
pub enum Target {
    /// The ratio to the baseline must be at least this.
    RatioAtLeast(f64),
    /// The value must be at most this (in the figure's unit).
    ValueAtMost(f64),
}

impl Target {
    pub fn is_met(self, figure: &Figure) -> bool {
        match self {
            Target::RatioAtLeast(limit) => figure.ratio.is_some_and(|ratio| ratio >= limit),
            Target::ValueAtMost(limit) => figure.value <= limit,
        }
    }

    pub fn describe(self, unit: Unit) -> String {
        match self {
            Target::RatioAtLeast(limit) => format!("≥ {limit:.2}×"),
            Target::ValueAtMost(limit) => format!("≤ {limit} {}", unit.symbol()),
        }
    }
}

/// One measured value.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable name, e.g. `sqlite_relay_exactly_once`; the key in the JSON `figures` map.
    pub key: String,
    /// What was measured, e.g. "relay drain, exactly-once".
    pub measurement: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreKind>,
    pub value: f64,
    pub unit: Unit,
    /// More about the value (MB/s, percentiles, sample count), for the table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    /// `value / baseline.value`; or, for figures measured round by round against their
    /// baseline ([`Figure::against_rounds`]), the median of the rounds' ratios.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// The lowest and highest of the rounds' ratios, when the ratio was taken round by round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_range: Option<RatioRange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_met: Option<bool>,
    /// Supporting numbers (timings split by cause, sample counts), in the JSON only.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

impl Figure {
    pub fn new(
        key: impl Into<String>,
        measurement: impl Into<String>,
        value: f64,
        unit: Unit,
    ) -> Self {
        Self {
            key: key.into(),
            measurement: measurement.into(),
            store: None,
            value,
            unit,
            detail: None,
            baseline: None,
            ratio: None,
            ratio_range: None,
            target: None,
            target_met: None,
            extra: BTreeMap::new(),
        }
    }

    pub fn store(mut self, store: StoreKind) -> Self {
        self.store = Some(store);
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn against(mut self, name: impl Into<String>, value: f64, detail: Option<String>) -> Self {
        self.ratio = (value > 0.0).then(|| self.value / value);
        self.baseline = Some(Baseline {
            name: name.into(),
            value,
            detail,
        });
        self
    }

    /// Compares round by round: each of `rounds` is this figure's value and its baseline's,
    /// measured back to back. The baseline shown is the median of the baselines (the figure's
    /// value should be the median of the values); the ratio is the median of the rounds'
    /// ratios, with their range.
    ///
    /// Why not the ratio of the two medians: the machines this runs on drift. On the 2-core
    /// virtual machine of `docs/benchmarks.md` the same CPU-bound loop took 0.99 to 1.70 s
    /// within a minute, and a raw producer's rate varied 3× between rounds of one run; two
    /// medians can then come from rounds of different speed, while a ratio within one round
    /// compares like with like.
    pub fn against_rounds(
        self,
        name: impl Into<String>,
        rounds: &[(f64, f64)],
        detail: Option<String>,
    ) -> Self {
        let baselines: Vec<f64> = rounds.iter().map(|(_, baseline)| *baseline).collect();
        let mut figure = self.against(name, median(&baselines), detail);
        let ratios: Vec<f64> = rounds
            .iter()
            .filter(|(_, baseline)| *baseline > 0.0)
            .map(|(value, baseline)| value / baseline)
            .collect();
        if !ratios.is_empty() {
            figure.ratio = Some(median(&ratios));
            figure.ratio_range = Some(RatioRange {
                min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
                max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                rounds: ratios.len(),
            });
        }
        figure
    }

    pub fn target(mut self, target: Target) -> Self {
        self.target_met = Some(target.is_met(&self));
        self.target = Some(target);
        self
    }

    pub fn extra(mut self, name: &str, value: f64) -> Self {
        self.extra.insert(name.to_owned(), value);
        self
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub settings: Settings,
    pub machine: Machine,
    pub figures: Vec<Figure>,
}

/// The sizes a run used, printed with the figures.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub stores: Vec<StoreKind>,
    pub relay_events: u64,
    pub batch_size: usize,
    pub batch_linger_ms: u64,
    pub rounds: usize,
    pub broker_warm_up_events: u64,
    pub writers: usize,
    pub updates_per_book: usize,
    pub writer_seconds: f64,
    pub append_events: u64,
    pub latency_events_per_second: u32,
    pub latency_saves_per_second: u32,
    pub latency_seconds: f64,
    pub backlog_events: u64,
    pub backlog_store: StoreKind,
    /// "exactly-once" or "at-least-once".
    pub backlog_delivery: &'static str,
    pub topic_partitions: i32,
}

/// How busy the machine was: the load average before and after, and the CPU count.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub load_average_before: Option<f64>,
    pub load_average_after: Option<f64>,
    /// Partitions on the broker at the start, every topic's together.
    pub broker_partitions: Option<usize>,
}

impl BenchReport {
    pub fn new(config: &BenchConfig) -> Self {
        Self {
            settings: Settings {
                stores: config.stores.clone(),
                relay_events: config.relay_events,
                batch_size: config.batch_size,
                batch_linger_ms: config.batch_linger_ms,
                rounds: config.rounds,
                broker_warm_up_events: config.broker_warm_up_events,
                writers: config.writers,
                updates_per_book: config.updates_per_book,
                writer_seconds: config.writer_duration.as_secs_f64(),
                append_events: config.append_events,
                latency_events_per_second: config.latency_events_per_second,
                latency_saves_per_second: config.latency_events_per_second / 2,
                latency_seconds: config.latency_duration.as_secs_f64(),
                backlog_events: config.backlog_events,
                backlog_store: config.backlog_store,
                backlog_delivery: super::mode_label(config.backlog_delivery),
                topic_partitions: config.kafka.partitions,
            },
            machine: Machine {
                cpus: std::thread::available_parallelism().map_or(1, usize::from),
                load_average_before: load_average(),
                load_average_after: None,
                broker_partitions: None,
            },
            figures: vec![],
        }
    }

    pub fn push(&mut self, figure: Figure) {
        self.figures.push(figure);
    }

    pub(crate) fn finish(&mut self) {
        self.machine.load_average_after = load_average();
    }

    pub fn figure(&self, key: &str) -> Option<&Figure> {
        self.figures.iter().find(|figure| figure.key == key)
    }

    /// The figure `<first store>_<suffix>`: headline figures come from the first store measured.
    fn headline(&self, suffix: &str) -> Option<&Figure> {
        let store = self.settings.stores.first()?;
        self.figure(&format!("{store}_{suffix}"))
    }

    /// One JSON object: the headline keys first (`null` when not measured), then every figure
    /// by key, the settings and the machine.
    pub fn to_json(&self) -> Value {
        let ratio = |suffix: &str| self.headline(suffix).and_then(|figure| figure.ratio);
        let value = |suffix: &str| self.headline(suffix).map(|figure| figure.value);
        let figures: serde_json::Map<String, Value> = self
            .figures
            .iter()
            .map(|figure| (figure.key.clone(), json!(figure)))
            .collect();
        json!({
            "relay_vs_producer_ratio": ratio("relay_exactly_once"),
            "relay_at_least_once_vs_producer_ratio": ratio("relay_at_least_once"),
            "exactly_once_vs_at_least_once_ratio": ratio("relay_exactly_once_vs_at_least_once"),
            "writers_with_relay_ratio": ratio("writers_with_relay"),
            "projection_vs_consumer_ratio": ratio("projection"),
            "commit_to_ack_p99_ms": value("commit_to_ack_p99"),
            "commit_to_report_p99_ms": value("commit_to_report_p99"),
            "append_events_per_second": value("append_x1"),
            "relay_backlog_rss_mib": self.figure("relay_backlog_rss").map(|figure| figure.value),
            "headline_store": self.settings.stores.first(),
            "figures": figures,
            "settings": self.settings,
            "machine": self.machine,
        })
    }
}

/// The one-minute load average, from /proc/loadavg (Linux only).
fn load_average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_and_target_follow_the_baseline() {
        let figure = Figure::new("x", "x", 80.0, Unit::EventsPerSecond)
            .against("raw", 100.0, None)
            .target(Target::RatioAtLeast(0.8));
        assert_eq!(figure.ratio, Some(0.8));
        assert_eq!(figure.target_met, Some(true));
        let missed =
            Figure::new("y", "y", 30.0, Unit::Milliseconds).target(Target::ValueAtMost(25.0));
        assert_eq!(missed.target_met, Some(false));
    }

    #[test]
    fn a_ratio_taken_round_by_round_is_the_median_of_the_rounds() {
        // The machine slowed down during round 2, and during round 3's baseline only. The
        // medians of values (80) and baselines (60) would say 1.33; the rounds say 0.8.
        let rounds = [(80.0, 100.0), (40.0, 50.0), (90.0, 60.0)];
        let figure = Figure::new("x", "x", 80.0, Unit::EventsPerSecond)
            .against_rounds("raw", &rounds, None)
            .target(Target::RatioAtLeast(0.8));
        assert_eq!(figure.baseline.as_ref().map(|b| b.value), Some(60.0));
        assert_eq!(figure.ratio, Some(0.8));
        assert_eq!(
            figure.ratio_range,
            Some(RatioRange {
                min: 0.8,
                max: 1.5,
                rounds: 3
            })
        );
        assert_eq!(figure.target_met, Some(true));
    }

    #[test]
    fn rounds_with_a_zero_baseline_are_left_out_of_the_ratio() {
        let figure = Figure::new("x", "x", 1.0, Unit::EventsPerSecond).against_rounds(
            "raw",
            &[(1.0, 0.0)],
            None,
        );
        assert_eq!(figure.ratio, None);
        assert_eq!(figure.ratio_range, None);
    }

    #[test]
    fn a_zero_baseline_gives_no_ratio() {
        let figure = Figure::new("x", "x", 1.0, Unit::EventsPerSecond).against("raw", 0.0, None);
        assert_eq!(figure.ratio, None);
    }
}
