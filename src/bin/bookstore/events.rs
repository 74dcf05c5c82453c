//! `bookstore events <stream>`: the events of one stream as stored, decoded.

use anyhow::Result;
use bookstore::cli::EventsArgs;
use bookstore::config::StoreConfig;
use serde_json::json;

pub async fn run(config: &StoreConfig, args: EventsArgs) -> Result<()> {
    let service = crate::books::open(config).await?;
    for (event, payload) in service.read_stream(&args.stream).await? {
        let metadata = &event.metadata;
        if args.json {
            let line = json!({
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
                "data": payload,
            });
            println!("{line}");
        } else {
            println!(
                "{:>8}  v{:<3} {:<20} {}  {}",
                event.position,
                metadata.aggregate_version,
                metadata.event_type,
                metadata.occurred_at.to_rfc3339(),
                serde_json::to_string(&payload)?
            );
        }
    }
    Ok(())
}
