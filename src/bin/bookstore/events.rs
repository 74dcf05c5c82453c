//! `bookstore events <stream>`: the events of one stream as stored, decoded. An event that does
//! not decode is listed with the reason in place of its data, the others still shown, and the
//! command then fails saying how many there were.

use anyhow::{Result, bail};
use bookstore::cli::EventsArgs;
use bookstore::config::StoreConfig;
use bookstore::service::ReadEvent;
use serde_json::json;

pub async fn run(config: &StoreConfig, args: EventsArgs) -> Result<()> {
    let Some(stream) = bookstore::domain::canonical_stream(&args.stream) else {
        bail!(
            "{:?} names no stream: expected bookstore::book-<book id> (its delta events) or \
             bookstore::book-fact-<book id> (its facts)",
            args.stream
        );
    };
    let service = crate::books::open(config).await?;
    let events = service.read_stream(&stream).await?;
    let mut undecoded = 0;
    for ReadEvent { event, payload } in &events {
        let metadata = &event.metadata;
        let data = match payload {
            Ok(payload) => Ok(serde_json::to_value(payload)?),
            Err(error) => {
                undecoded += 1;
                Err(error.to_string())
            }
        };
        if args.json {
            let mut line = json!({
                "position": event.position,
                "type": metadata.event_type,
                "version": metadata.aggregate_version,
                "event_id": metadata.event_id,
                "stream": metadata.stream,
                "occurred_at": metadata.occurred_at,
                "correlation_id": metadata.correlation_id,
                "causation_id": metadata.causation_id,
                // The CRC-64-AVRO fingerprint as a hex number (frames hold it little-endian).
                "schema_fingerprint": event.schema_fingerprint.map(|f| format!("{f:016x}")),
            });
            match data {
                Ok(data) => line["data"] = data,
                Err(error) => line["error"] = error.into(),
            }
            println!("{line}");
        } else {
            println!(
                "{:>8}  v{:<3} {:<20} {}  {}",
                event.position,
                metadata.aggregate_version,
                metadata.event_type,
                metadata.occurred_at.to_rfc3339(),
                match data {
                    Ok(data) => data.to_string(),
                    Err(error) => format!("(not decoded: {error})"),
                }
            );
        }
    }
    if undecoded > 0 {
        bail!(
            "{undecoded} of {} events of {} could not be decoded (listed above)",
            events.len(),
            args.stream
        );
    }
    Ok(())
}
