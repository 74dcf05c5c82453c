//! Avro contracts: the event bodies as Avro datums, and the framings they travel in on Kafka.
//!
//! The schemas in `schemas/*.avsc` are the public contract (one self-contained record schema
//! per event type, namespace `bookstore.events`; `docs/contracts.md` explains them to other
//! teams). They are compiled into the binary and `tests/codec_contract.rs` fails if the Rust
//! types and the files drift apart.
//!
//! | module | owns |
//! | --- | --- |
//! | [`contract`] | the embedded schemas, parsed once, with canonical forms and fingerprints |
//! | [`fingerprint`] | Parsing Canonical Form and CRC-64-AVRO, as the Avro specification defines them |
//! | [`avro`] | [`AvroCodec`]: events to Avro datums (no framing) and back |
//! | [`wire`] | the Kafka value framings (single-object, Confluent) and [`FramedDecoder`] |
//! | [`writer_schema`] | what a writer schema from the registry must pass before it decodes anything |
//! | [`registry`] | a Confluent-compatible schema registry client and the subject names |
//! | [`headers`] | the Kafka header names the relay writes and the projection reads |
//!
//! Encoding runs once per event in the write path, so every schema is parsed, resolved and
//! fingerprinted once per process; encoding an event never touches the schema text again.

pub mod avro;
pub mod contract;
pub mod fingerprint;
pub mod headers;
pub mod registry;
pub mod wire;
pub mod writer_schema;

use thiserror::Error;

use crate::domain::{EventPayload, StoredEvent};

pub use avro::AvroCodec;
pub use contract::{Contract, EVENT_TYPES, NAMESPACE};
pub use registry::{RegisteredSchemas, RegistryClient, RegistryError};
pub use wire::{
    Frame, FramedDecoder, WireFormat, frame_confluent, frame_single_object, parse_frame,
};

/// At most this many characters of a record's content go into an error about it: such errors
/// become dead-letter reasons (headers of a few hundred bytes) and log lines, whatever the
/// record holds.
pub const EXCERPT_CHARS: usize = 48;

/// The start of `text`, for an error about it.
pub fn excerpt(text: &str) -> String {
    cut_to(text, EXCERPT_CHARS)
}

/// `text` up to `max_chars` characters, with `…` where it was cut.
pub fn cut_to(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The first bytes of `bytes` in hexadecimal, and their count when there are more.
pub fn bytes_excerpt(bytes: &[u8]) -> String {
    const SHOWN: usize = 16;
    match bytes.get(..SHOWN) {
        Some(start) if bytes.len() > SHOWN => format!("{start:02x?}… ({} bytes)", bytes.len()),
        _ => format!("{bytes:02x?}"),
    }
}

/// Turns events into Avro datums (no framing) and back.
pub trait EventCodec: Send + Sync {
    /// The Avro binary datum of `event` under its record schema.
    fn encode(&self, event: &EventPayload) -> Result<Vec<u8>, CodecError>;

    /// The CRC-64-AVRO fingerprint of the schema `encode` writes `event_type` with: the
    /// outbox keeps it next to each datum (see [`crate::domain::NewEvent`]).
    fn schema_fingerprint(&self, event_type: &str) -> Result<u64, CodecError>;

    /// Reads a datum written under the record schema named `event_type`.
    fn decode(&self, event_type: &str, datum: &[u8]) -> Result<EventPayload, CodecError>;

    /// Reads a saved event's datum, refusing one written with another schema than this
    /// codec's (see [`contract::check_written_with`]).
    fn decode_saved(&self, event: &StoredEvent) -> Result<EventPayload, CodecError> {
        let event_type = &event.metadata.event_type;
        let current = self.schema_fingerprint(event_type)?;
        contract::check_written_with(event_type, event.schema_fingerprint, current)?;
        self.decode(event_type, &event.payload)
    }
}

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),
    #[error("could not encode {event_type}: {reason}")]
    Encode { event_type: String, reason: String },
    #[error("could not decode {event_type}: {reason}")]
    Decode { event_type: String, reason: String },
    /// The bytes of a Kafka value are not a frame this service understands.
    #[error("invalid frame: {0}")]
    Frame(#[from] FrameError),
    /// A single-object frame names a schema none of the contracts has.
    #[error("no known schema has the fingerprint {0:#018x}")]
    UnknownFingerprint(u64),
    /// A Confluent frame names a registry id this decoder has not been told about; fetch the
    /// schema (`RegistryClient::fetch_schema`), add it with `FramedDecoder::add_writer_schema`
    /// and decode again.
    #[error("schema id {0} is not known to this decoder")]
    UnknownSchemaId(u32),
    /// A saved datum was written with another schema than the one this version sends its event
    /// type under: a schema changed while events written with the old one were unpublished.
    #[error(
        "the {event_type} datum was written with the schema of fingerprint {written:#018x}, but \
         this version reads and sends {event_type} with the schema {current:#018x}; read or \
         labelled with a schema that did not write it, its bytes are misread. Only the version \
         that saved it reads and publishes it correctly (see docs/contracts.md, \"Changing a \
         schema\")"
    )]
    WrittenWithAnotherSchema {
        event_type: String,
        written: u64,
        current: u64,
    },
    /// A writer schema (from the registry) that cannot stand for any event type.
    #[error("unusable writer schema: {0}")]
    WriterSchema(String),
}

/// Why bytes are not a valid frame. Every case names what was expected, so a poison message in
/// a log says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("the value is empty")]
    Empty,
    #[error("a {format} frame needs at least {needed} bytes, got {got}")]
    Truncated {
        format: &'static str,
        needed: usize,
        got: usize,
    },
    #[error(
        "unknown magic byte(s) {found}: expected 0xC3 0x01 (Avro single-object) or 0x00 (Confluent)"
    )]
    UnknownMagic { found: String },
}
