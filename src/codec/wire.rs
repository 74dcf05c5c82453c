//! The framings an Avro datum travels in as a Kafka record value, and [`FramedDecoder`], which
//! turns a framed value back into an event.
//!
//! * **Single-object** (Avro specification, used without a schema registry):
//!   `C3 01` + the CRC-64-AVRO fingerprint of the writer schema, 8 bytes little-endian + datum.
//! * **Confluent** (used with a Confluent-compatible registry): `00` + the registry's schema
//!   id, 4 bytes big-endian + datum.
//!
//! The first byte tells them apart, so a reader handles both and a producer can switch from one
//! to the other without a flag day.

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::Schema;

use super::avro::AvroCodec;
use super::contract::{self, Contract};
use super::registry::RegisteredSchemas;
use super::{CodecError, EventCodec, FrameError};
use crate::domain::EventPayload;

/// The first two bytes of a single-object frame.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// Magic plus fingerprint.
pub const SINGLE_OBJECT_HEADER_LEN: usize = 10;
/// The first byte of a Confluent frame.
pub const CONFLUENT_MAGIC: u8 = 0x00;
/// Magic plus schema id.
pub const CONFLUENT_HEADER_LEN: usize = 5;

/// How the relay frames datums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireFormat {
    /// Avro single-object encoding; readers identify the schema by its fingerprint.
    SingleObject,
    /// Confluent framing with the ids the registry gave our schemas at startup.
    Confluent { schemas: RegisteredSchemas },
}

impl WireFormat {
    /// Appends the frame of `datum`, written under `event_type`'s schema, to `out`.
    pub fn frame_into(
        &self,
        event_type: &str,
        datum: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        match self {
            WireFormat::SingleObject => {
                let contract = contract::contract(event_type)
                    .ok_or_else(|| CodecError::UnknownEventType(event_type.to_owned()))?;
                write_single_object(contract.fingerprint(), datum, out);
            }
            WireFormat::Confluent { schemas } => {
                let id = schemas
                    .id(event_type)
                    .ok_or_else(|| CodecError::UnknownEventType(event_type.to_owned()))?;
                write_confluent(id, datum, out);
            }
        }
        Ok(())
    }

    /// The frame of `datum`, written under `event_type`'s schema.
    pub fn frame(&self, event_type: &str, datum: &[u8]) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(SINGLE_OBJECT_HEADER_LEN + datum.len());
        self.frame_into(event_type, datum, &mut out)?;
        Ok(out)
    }
}

/// `C3 01` + `fingerprint` little-endian + `datum`.
pub fn frame_single_object(fingerprint: u64, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SINGLE_OBJECT_HEADER_LEN + datum.len());
    write_single_object(fingerprint, datum, &mut out);
    out
}

/// Appends `C3 01` + `fingerprint` little-endian + `datum` to `out`.
pub fn write_single_object(fingerprint: u64, datum: &[u8], out: &mut Vec<u8>) {
    out.reserve(SINGLE_OBJECT_HEADER_LEN + datum.len());
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(datum);
}

/// `00` + `schema_id` big-endian + `datum`.
pub fn frame_confluent(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONFLUENT_HEADER_LEN + datum.len());
    write_confluent(schema_id, datum, &mut out);
    out
}

/// Appends `00` + `schema_id` big-endian + `datum` to `out`.
pub fn write_confluent(schema_id: u32, datum: &[u8], out: &mut Vec<u8>) {
    out.reserve(CONFLUENT_HEADER_LEN + datum.len());
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
}

/// A framed value taken apart: which schema wrote the datum, and the datum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    SingleObject { fingerprint: u64, datum: &'a [u8] },
    Confluent { schema_id: u32, datum: &'a [u8] },
}

impl<'a> Frame<'a> {
    pub fn datum(&self) -> &'a [u8] {
        match self {
            Frame::SingleObject { datum, .. } | Frame::Confluent { datum, .. } => datum,
        }
    }
}

/// Takes a framed value apart, telling the framings apart by the first byte.
pub fn parse_frame(bytes: &[u8]) -> Result<Frame<'_>, CodecError> {
    match bytes {
        [] => Err(FrameError::Empty.into()),
        [CONFLUENT_MAGIC, rest @ ..] => {
            let (id, datum) = split_header::<4>(rest, "Confluent", CONFLUENT_HEADER_LEN)?;
            Ok(Frame::Confluent {
                schema_id: u32::from_be_bytes(id),
                datum,
            })
        }
        [0xC3] => Err(truncated("single-object", SINGLE_OBJECT_HEADER_LEN, 1)),
        [0xC3, 0x01, rest @ ..] => {
            let (fingerprint, datum) =
                split_header::<8>(rest, "single-object", SINGLE_OBJECT_HEADER_LEN)?;
            Ok(Frame::SingleObject {
                fingerprint: u64::from_le_bytes(fingerprint),
                datum,
            })
        }
        [0xC3, second, ..] => Err(unknown_magic(&[0xC3, *second])),
        [first, ..] => Err(unknown_magic(&[*first])),
    }
}

fn split_header<'a, const N: usize>(
    rest: &'a [u8],
    format: &'static str,
    header_len: usize,
) -> Result<([u8; N], &'a [u8]), CodecError> {
    let got = header_len - N + rest.len();
    let (header, datum) = rest
        .split_first_chunk::<N>()
        .ok_or_else(|| truncated(format, header_len, got))?;
    Ok((*header, datum))
}

fn truncated(format: &'static str, needed: usize, got: usize) -> CodecError {
    FrameError::Truncated {
        format,
        needed,
        got,
    }
    .into()
}

fn unknown_magic(bytes: &[u8]) -> CodecError {
    let found = bytes
        .iter()
        .map(|byte| format!("{byte:#04x}"))
        .collect::<Vec<_>>()
        .join(" ");
    FrameError::UnknownMagic { found }.into()
}

/// Decodes framed Kafka values into events.
///
/// Single-object frames are looked up in the fingerprints of the contracts and of every other
/// published version (`schemas/history/`, and any added with
/// [`FramedDecoder::add_published_version`]). Confluent frames are
/// looked up in the registry ids this decoder was given: our own (from
/// [`RegisteredSchemas`]) and any writer schema added later with
/// [`FramedDecoder::add_writer_schema`] — typically after a [`CodecError::UnknownSchemaId`],
/// by fetching the schema from the registry, which happens when a newer producer registered a
/// new version. Data written under another version is resolved to our schema by the Avro rules.
#[derive(Debug, Clone)]
pub struct FramedDecoder {
    codec: AvroCodec,
    by_id: HashMap<u32, WriterSchema>,
    /// Published versions of our records other than this build's, for single-object frames.
    by_fingerprint: HashMap<u64, WriterSchema>,
}

/// The published versions (`schemas/history/`) other than this build's schemas, parsed once.
static OTHER_PUBLISHED_VERSIONS: LazyLock<HashMap<u64, WriterSchema>> = LazyLock::new(|| {
    contract::PUBLISHED_SCHEMAS
        .iter()
        .map(|json| {
            // Part of the build, and checked by tests/codec_contract.rs: never bad input.
            writer_schema(json).unwrap_or_else(|error| panic!("a published schema: {error}"))
        })
        .filter(|(_, writer)| matches!(writer, WriterSchema::Other { .. }))
        .collect()
});

#[derive(Debug, Clone)]
enum WriterSchema {
    /// One of our contracts, exactly (same canonical form): no resolution needed.
    Ours(&'static Contract),
    /// Another version of one of our records.
    Other {
        event_type: &'static str,
        schema: Box<Schema>,
    },
}

impl FramedDecoder {
    /// A decoder of single-object frames; Confluent frames need ids, see
    /// [`Self::with_registered`].
    pub fn new(codec: AvroCodec) -> Self {
        Self {
            codec,
            by_id: HashMap::new(),
            by_fingerprint: OTHER_PUBLISHED_VERSIONS.clone(),
        }
    }

    /// A decoder of both framings, knowing the ids of our own schemas.
    pub fn with_registered(codec: AvroCodec, schemas: &RegisteredSchemas) -> Self {
        let by_id = schemas
            .iter()
            .filter_map(|(event_type, id)| {
                contract::contract(event_type).map(|contract| (id, WriterSchema::Ours(contract)))
            })
            .collect();
        Self {
            by_id,
            ..Self::new(codec)
        }
    }

    /// Teaches the decoder the writer schema a registry has under `schema_id`. It must be a
    /// version of one of our records (same full name) that passes
    /// [`writer_schema::refusal`](super::writer_schema::refusal); returns that record's event
    /// type.
    pub fn add_writer_schema(
        &mut self,
        schema_id: u32,
        schema_json: &str,
    ) -> Result<&'static str, CodecError> {
        let (_, writer) = writer_schema(schema_json)?;
        let event_type = writer.event_type();
        self.by_id.insert(schema_id, writer);
        Ok(event_type)
    }

    /// Teaches the decoder another version of one of our records for single-object frames
    /// (which name it by fingerprint), under the same checks as
    /// [`add_writer_schema`](Self::add_writer_schema); the versions of `schemas/history/` are
    /// known already. Returns that record's event type.
    pub fn add_published_version(&mut self, schema_json: &str) -> Result<&'static str, CodecError> {
        let (fingerprint, writer) = writer_schema(schema_json)?;
        let event_type = writer.event_type();
        self.by_fingerprint.insert(fingerprint, writer);
        Ok(event_type)
    }

    /// The event in a framed value.
    pub fn decode(&self, value: &[u8]) -> Result<EventPayload, CodecError> {
        match parse_frame(value)? {
            Frame::SingleObject { fingerprint, datum } => {
                match self.codec.event_type_for_fingerprint(fingerprint) {
                    Some(event_type) => self.codec.decode(event_type, datum),
                    None => match self.by_fingerprint.get(&fingerprint) {
                        Some(writer) => self.decode_written_with(writer, datum),
                        None => Err(CodecError::UnknownFingerprint(fingerprint)),
                    },
                }
            }
            Frame::Confluent { schema_id, datum } => match self.by_id.get(&schema_id) {
                Some(writer) => self.decode_written_with(writer, datum),
                None => Err(CodecError::UnknownSchemaId(schema_id)),
            },
        }
    }

    fn decode_written_with(
        &self,
        writer: &WriterSchema,
        datum: &[u8],
    ) -> Result<EventPayload, CodecError> {
        match writer {
            WriterSchema::Ours(contract) => self.codec.decode(contract.event_type(), datum),
            WriterSchema::Other { event_type, schema } => self
                .codec
                .decode_with_writer_schema(event_type, schema, datum),
        }
    }
}

/// A writer schema of one of our records, with its fingerprint: the record's contract when it
/// is the same schema, else the schema itself. It must be a version of one of our records (same
/// full name) that passes [`writer_schema::refusal`](super::writer_schema::refusal).
fn writer_schema(schema_json: &str) -> Result<(u64, WriterSchema), CodecError> {
    let schema = Schema::parse_str(schema_json)
        .map_err(|error| CodecError::WriterSchema(error.to_string()))?;
    if let Some(reason) = super::writer_schema::refusal(&schema) {
        return Err(CodecError::WriterSchema(reason));
    }
    let full_name = match &schema {
        Schema::Record(record) => record.name.fullname(None),
        _ => return Err(CodecError::WriterSchema("not a record schema".into())),
    };
    let contract = contract::contract_for_full_name(&full_name).ok_or_else(|| {
        CodecError::WriterSchema(format!("{full_name} is none of our event types"))
    })?;
    // Checked whatever the fingerprint: it ignores logical types, so ours does not tell.
    if let Some(reason) = super::writer_schema::meaning_mismatch(&schema, contract.schema()) {
        return Err(CodecError::WriterSchema(reason));
    }
    let fingerprint = super::fingerprint::schema_fingerprint(schema_json)
        .map_err(|error| CodecError::WriterSchema(error.to_string()))?;
    let writer = if fingerprint == contract.fingerprint() {
        WriterSchema::Ours(contract)
    } else {
        WriterSchema::Other {
            event_type: contract.event_type(),
            schema: Box::new(schema),
        }
    };
    Ok((fingerprint, writer))
}

impl WriterSchema {
    fn event_type(&self) -> &'static str {
        match self {
            WriterSchema::Ours(contract) => contract.event_type(),
            WriterSchema::Other { event_type, .. } => event_type,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_headers_report_what_they_needed() {
        let error = parse_frame(&[0xC3, 0x01, 1, 2]).unwrap_err();
        assert!(matches!(
            error,
            CodecError::Frame(FrameError::Truncated {
                needed: 10,
                got: 4,
                ..
            })
        ));
        let error = parse_frame(&[0x00, 1]).unwrap_err();
        assert!(matches!(
            error,
            CodecError::Frame(FrameError::Truncated {
                needed: 5,
                got: 2,
                ..
            })
        ));
        let error = parse_frame(&[0xC3]).unwrap_err();
        assert!(matches!(
            error,
            CodecError::Frame(FrameError::Truncated {
                needed: 10,
                got: 1,
                ..
            })
        ));
    }

    #[test]
    fn unknown_magic_names_the_bytes() {
        let error = parse_frame(b"{\"json\": true}").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid frame: unknown magic byte(s) 0x7b: expected 0xC3 0x01 (Avro single-object) or 0x00 (Confluent)"
        );
        let error = parse_frame(&[0xC3, 0x02, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert!(error.to_string().contains("0xc3 0x02"), "{error}");
    }

    #[test]
    fn a_recursive_version_of_a_contract_is_refused_before_it_can_decode() {
        // Decoding under this schema recursed once per nesting level: a datum nesting 200,000
        // facts overflowed the stack and aborted the process.
        let recursive = r#"{"type": "record", "name": "BookFactEvent",
            "namespace": "bookstore.events", "fields": [
                {"name": "book_id", "type": {"type": "string", "logicalType": "uuid"}},
                {"name": "next", "type": ["null", "BookFactEvent"], "default": null}]}"#;
        let mut decoder = FramedDecoder::new(AvroCodec::new());
        let error = decoder.add_writer_schema(7, recursive).unwrap_err();
        assert!(error.to_string().contains("contains itself"), "{error}");
        assert!(matches!(
            decoder.decode(&[0, 0, 0, 0, 7, 0]),
            Err(CodecError::UnknownSchemaId(7))
        ));
    }

    /// Our fingerprint, another scale: taken for ours, its prices were read 100 times too
    /// high (12.9900 as 1299.00).
    #[test]
    fn a_fact_schema_with_our_fingerprint_but_another_price_scale_is_refused() {
        let ours = include_str!("../../schemas/BookFactEvent.avsc");
        let scale_four = ours.replace("\"scale\": 2", "\"scale\": 4");
        assert_eq!(
            super::super::fingerprint::schema_fingerprint(&scale_four).unwrap(),
            super::super::fingerprint::schema_fingerprint(ours).unwrap(),
            "the fingerprint leaves logical types out"
        );
        let mut decoder = FramedDecoder::new(AvroCodec::new());
        let error = decoder.add_writer_schema(7, &scale_four).unwrap_err();
        assert!(error.to_string().contains("price"), "{error}");
        assert_eq!(decoder.add_writer_schema(8, ours).unwrap(), "BookFactEvent");
    }
}
