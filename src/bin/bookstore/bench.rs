//! `bookstore bench`: builds the bench configuration from the flags, runs the library's
//! measurements and prints the figures, as one table (each figure beside its baseline, the
//! ratio and the target) or, with `--json`, as one JSON object.

use std::time::Duration;

use anyhow::{Context, Result};
use bookstore::bench::{BenchConfig, BenchReport, Figure, Unit};
use bookstore::cli::BenchArgs;
use bookstore::config::KafkaConfig;
use bookstore::shutdown::ShutdownTrigger;

pub async fn run(kafka: &KafkaConfig, args: BenchArgs) -> Result<()> {
    let json = args.json;
    let config = config_from(kafka, args)?;
    let (trigger, shutdown) = ShutdownTrigger::new();
    trigger.on_signals();
    let report = bookstore::bench::run(&config, shutdown).await?;
    if json {
        println!("{}", serde_json::to_string(&report.to_json())?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn config_from(kafka: &KafkaConfig, args: BenchArgs) -> Result<BenchConfig> {
    let seconds = |value: f64, flag: &str| {
        Duration::try_from_secs_f64(value).with_context(|| format!("{flag} {value}"))
    };
    let mut config = BenchConfig::new(kafka.clone());
    config.stores = args.stores;
    config.only = args.only;
    config.postgres_url = args.postgres_url;
    config.work_dir = args.work_dir;
    config.relay_events = args.relay_events;
    config.batch_size = args.batch_size;
    config.batch_linger_ms = args.batch_linger_ms;
    config.rounds = args.rounds;
    config.broker_warm_up_events = args.broker_warm_up_events;
    config.writers = args.writers;
    config.updates_per_book = args.updates_per_book;
    config.writer_duration = seconds(args.writer_seconds, "--writer-seconds")?;
    config.append_events = args.append_events;
    config.latency_events_per_second = args.latency_rate;
    config.latency_duration = seconds(args.latency_seconds, "--latency-seconds")?;
    config.backlog_events = args.backlog_events;
    config.backlog_store = args.backlog_store;
    config.backlog_delivery = args.backlog_delivery;
    config.relay_wrapper = args
        .relay_wrapper
        .map(|wrapper| wrapper.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    config.relay_program =
        Some(std::env::current_exe().context("locating the bookstore executable")?);
    Ok(config)
}

/// The report as a table: one row per figure, a second line for its details.
fn render(report: &BenchReport) -> String {
    let settings = &report.settings;
    let machine = &report.machine;
    let load = |value: Option<f64>| value.map_or("?".to_owned(), |load| format!("{load:.2}"));
    let mut out = format!(
        "bookstore bench: {} CPUs, load average {} before, {} after; \
         broker with {} partitions, warmed with {} events\n\
         relay backlog {} events, batch {}, median of {} rounds (ratios: median of the \
         rounds' ratios, their range in brackets); {} writers; \
         latency at {} events/s ({} saves/s) for {} s; RSS backlog {} events ({})\n\n",
        machine.cpus,
        load(machine.load_average_before),
        load(machine.load_average_after),
        machine
            .broker_partitions
            .map_or("?".to_owned(), |partitions| partitions.to_string()),
        settings.broker_warm_up_events,
        settings.relay_events,
        settings.batch_size,
        settings.rounds,
        settings.writers,
        settings.latency_events_per_second,
        settings.latency_saves_per_second,
        settings.latency_seconds,
        settings.backlog_events,
        settings.backlog_store,
    );
    let rows: Vec<[String; 7]> = report.figures.iter().map(row).collect();
    let header = [
        "measurement",
        "store",
        "figure",
        "baseline",
        "baseline figure",
        "ratio",
        "target",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|cell| cell.chars().count());
    for cells in &rows {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    out.push_str(&line(&header, &widths));
    for (cells, figure) in rows.iter().zip(&report.figures) {
        out.push_str(&line(cells, &widths));
        if let Some(detail) = details(figure) {
            out.push_str(&format!("    ↳ {detail}\n"));
        }
    }
    out
}

fn line(cells: &[String; 7], widths: &[usize; 7]) -> String {
    let mut text = String::new();
    for (cell, width) in cells.iter().zip(widths) {
        let pad = width.saturating_sub(cell.chars().count());
        text.push_str(cell);
        text.push_str(&" ".repeat(pad + 2));
    }
    text.truncate(text.trim_end().len());
    text.push('\n');
    text
}

fn row(figure: &Figure) -> [String; 7] {
    let store = figure
        .store
        .map(|store| store.to_string())
        .unwrap_or_default();
    let (baseline, baseline_value) = match &figure.baseline {
        Some(baseline) => (baseline.name.clone(), amount(baseline.value, figure.unit)),
        None => (String::new(), String::new()),
    };
    let ratio = match (figure.ratio, figure.ratio_range) {
        (Some(ratio), Some(range)) => format!("{ratio:.2}× ({:.2}-{:.2})", range.min, range.max),
        (Some(ratio), None) => format!("{ratio:.2}×"),
        (None, _) => String::new(),
    };
    let target = match (figure.target, figure.target_met) {
        (Some(target), Some(met)) => {
            let verdict = if met { "met" } else { "MISSED" };
            format!("{} {verdict}", target.describe(figure.unit))
        }
        _ => String::new(),
    };
    [
        figure.measurement.clone(),
        store,
        amount(figure.value, figure.unit),
        baseline,
        baseline_value,
        ratio,
        target,
    ]
}

fn details(figure: &Figure) -> Option<String> {
    let baseline = figure.baseline.as_ref().and_then(|b| b.detail.as_deref());
    match (figure.detail.as_deref(), baseline) {
        (Some(detail), Some(baseline)) => Some(format!("{detail}; baseline {baseline}")),
        (Some(detail), None) => Some(detail.to_owned()),
        (None, Some(baseline)) => Some(format!("baseline {baseline}")),
        (None, None) => None,
    }
}

fn amount(value: f64, unit: Unit) -> String {
    match unit {
        Unit::Milliseconds | Unit::Mebibytes => format!("{value:.1} {}", unit.symbol()),
        _ => format!("{} {}", thousands(value), unit.symbol()),
    }
}

/// 12345.6 → "12,346".
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 {
        grouped.insert(0, '-');
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(0.0), "0");
    }
}
