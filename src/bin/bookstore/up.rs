//! `bookstore up`: relay, projector and dashboard in one process, optionally fed with demo
//! data, until Ctrl-C/SIGTERM. The first part to fail stops the others.

use anyhow::{Context, Result, anyhow};
use bookstore::cli::UpArgs;
use bookstore::codec::AvroCodec;
use bookstore::config::{KafkaConfig, StoreConfig};
use bookstore::demo::{DemoPace, feed_demo_data};
use bookstore::http::{self, HttpState};
use bookstore::projection::{ProjectionMode, default_group, kafka_projector};
use bookstore::relay::{RunMode, kafka_relay};
use bookstore::service::BookService;
use bookstore::shutdown::{Shutdown, ShutdownTrigger};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{error, info};

pub async fn run(
    store_config: &StoreConfig,
    kafka: &KafkaConfig,
    args: UpArgs,
    (trigger, mut shutdown): (ShutdownTrigger, Shutdown),
) -> Result<()> {
    let metrics = bookstore::telemetry::prometheus_handle()?;
    if let Some(addr) = args.metrics_addr {
        bookstore::telemetry::install_metrics(addr)?;
    }
    let opened = crate::unless_stopped(&shutdown, crate::open_store(store_config)).await?;
    let Some(store) = opened else {
        return Ok(());
    };
    let relay_id = args
        .relay
        .relay_id
        .clone()
        .unwrap_or_else(|| format!("{}.relay", kafka.topic_prefix));
    if args.metrics_addr.is_some() {
        // As in `bookstore relay`: the backlog gauges stay true while the relay cannot
        // publish. The dashboard's `/metrics` refreshes them itself at each scrape.
        tokio::spawn(super::relay::refresh_progress_gauges(
            store.clone(),
            relay_id.clone(),
        ));
    }
    // Started together with the broker (compose, an orchestrator), it waits for it.
    if !kafka.wait_until_reachable(&mut shutdown).await? {
        return Ok(());
    }
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| default_group(&kafka.topic_prefix));
    let projection = args.projection_config(group);
    // Provisioning topics and registering schemas can take up to the request timeout each; a
    // signal meanwhile stops at once (nothing has started that would need finishing).
    let set_up = async {
        let relay = kafka_relay(store.clone(), kafka, &args.relay).await?;
        let projector = kafka_projector(store.clone(), kafka, projection).await?;
        anyhow::Ok((relay, projector))
    };
    let Some((relay, projector)) = crate::unless_stopped(&shutdown, set_up).await? else {
        return Ok(());
    };
    // The lag gauge of `/metrics` is measured by a task of its own, as in `bookstore project`.
    super::project::spawn_lag_gauge_refresh(store.clone(), kafka, projector.group())?;
    let state = HttpState::new(store.clone(), metrics)
        .with_relay_id(relay_id)
        .with_kafka_readiness(kafka.clone());
    let listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("listening on {}", args.addr))?;
    let url = format!("http://{}/", listener.local_addr()?);

    let mut parts: JoinSet<(&str, Result<()>)> = JoinSet::new();
    let stop = shutdown.clone();
    parts.spawn(async move {
        (
            "relay",
            relay
                .run(RunMode::Follow, stop)
                .await
                .map(drop)
                .map_err(Into::into),
        )
    });
    let stop = shutdown.clone();
    parts.spawn(async move {
        let outcome = projector.run(ProjectionMode::Follow, stop).await;
        ("projector", outcome.map(drop).map_err(Into::into))
    });
    let stop = shutdown.clone();
    parts.spawn(async move {
        let outcome = http::serve(listener, http::router(state), stop).await;
        ("dashboard", outcome.map_err(Into::into))
    });
    if args.demo_data {
        let service = BookService::new(store.clone(), AvroCodec::new());
        let stop = shutdown.clone();
        parts.spawn(async move {
            feed_demo_data(&service, DemoPace::default(), stop).await;
            ("demo data", Ok(()))
        });
    }
    println!("bookstore is up: dashboard at {url} (Ctrl-C to stop)");

    let mut failure = None;
    while let Some(joined) = parts.join_next().await {
        // A panic is a failure like any other: the other parts still stop gracefully.
        let (part, outcome) = joined.unwrap_or_else(|join| ("a part", Err(anyhow!("{join}"))));
        match outcome {
            Ok(()) => info!(part, "stopped"),
            Err(error) => {
                error!(part, "failed: {error:#}");
                failure.get_or_insert(error.context(format!("{part} failed")));
            }
        }
        // Whatever ended first, the others stop too: half a pipeline is not "up".
        trigger.trigger();
    }
    failure.map_or(Ok(()), Err)
}
