//! How one committed event becomes Kafka records: topic by kind, key = book id, value = the
//! framed Avro datum, CloudEvents headers. A removed book's fact is followed by a tombstone.

use rdkafka::message::{Header, OwnedHeaders};

use crate::codec::headers as h;
use crate::codec::wire::WireFormat;
use crate::codec::{AvroCodec, CodecError, EventCodec};
use crate::domain::{BookFactEvent, EventKind, EventPayload, StoredEvent};
use crate::kafka::Topics;

/// A record ready to hand to the producer.
#[derive(Debug)]
pub struct OutboundRecord<'a> {
    pub topic: &'a str,
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
}

/// Maps events to records; holds what every mapping needs.
#[derive(Debug, Clone)]
pub struct RecordMapper {
    topics: Topics,
    wire: WireFormat,
    codec: AvroCodec,
}

impl RecordMapper {
    pub fn new(topics: Topics, wire: WireFormat) -> Self {
        Self {
            topics,
            wire,
            codec: AvroCodec::new(),
        }
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// The records of `event`, in the order they must be sent: its own record, then, for the
    /// fact of a removed book, a tombstone for the compacted fact topic.
    pub fn records(&self, event: &StoredEvent) -> Result<Vec<OutboundRecord<'_>>, CodecError> {
        let metadata = &event.metadata;
        let key = metadata.aggregate_id.to_string();
        let mut value = Vec::with_capacity(event.payload.len() + 16);
        self.wire
            .frame_into(&metadata.event_type, &event.payload, &mut value)?;
        let topic = match metadata.kind() {
            EventKind::Delta => self.topics.book.as_str(),
            EventKind::Fact => self.topics.book_fact.as_str(),
        };
        let mut records = vec![OutboundRecord {
            topic,
            key: key.clone(),
            value: Some(value),
            headers: headers(event),
        }];
        if metadata.kind() == EventKind::Fact && self.is_removal(event)? {
            records.push(OutboundRecord {
                topic,
                key,
                value: None,
                headers: headers(event),
            });
        }
        Ok(records)
    }

    fn is_removal(&self, event: &StoredEvent) -> Result<bool, CodecError> {
        match self.codec.decode(BookFactEvent::TYPE, &event.payload)? {
            EventPayload::Fact(fact) => Ok(fact.removed),
            EventPayload::Delta(_) => Ok(false),
        }
    }
}

/// CloudEvents binary-mode headers plus position, version, stream and causality.
pub fn headers(event: &StoredEvent) -> OwnedHeaders {
    let metadata = &event.metadata;
    let event_id = metadata.event_id.to_string();
    let ce_type = h::ce_type(&metadata.event_type);
    let time = metadata
        .occurred_at
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let subject = metadata.aggregate_id.to_string();
    let position = event.position.to_string();
    let version = metadata.aggregate_version.to_string();
    let correlation = metadata.correlation_id.to_string();
    let causation = metadata.causation_id.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(13)
        .insert(header(h::CE_SPECVERSION, h::SPEC_VERSION))
        .insert(header(h::CE_ID, &event_id))
        .insert(header(h::CE_TYPE, &ce_type))
        .insert(header(h::CE_SOURCE, h::SOURCE))
        .insert(header(h::CE_TIME, &time))
        .insert(header(h::CE_SUBJECT, &subject))
        .insert(header(h::CONTENT_TYPE, h::CONTENT_TYPE_AVRO))
        .insert(header(h::POSITION, &position))
        .insert(header(h::AGGREGATE_VERSION, &version))
        .insert(header(h::STREAM, &metadata.stream))
        .insert(header(h::CORRELATION_ID, &correlation))
        .insert(header(h::CAUSATION_ID, &causation));
    if let Some(traceparent) = &metadata.traceparent {
        headers = headers.insert(header(h::TRACEPARENT, traceparent));
    }
    headers
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
