//! The contracts: the `schemas/*.avsc` files compiled into the binary, each parsed, resolved and
//! fingerprinted once per process, with the writer and reader apache-avro needs for it.

use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;

use super::CodecError;
use super::fingerprint::{crc64_avro, parsing_canonical_form};
use crate::domain::{BookAdded, BookDetailsUpdated, BookFactEvent, BookPriceUpdated, BookRemoved};

/// Namespace of every record of the contract.
pub const NAMESPACE: &str = "bookstore.events";

/// Every event type, in the order of the contract files.
pub const EVENT_TYPES: [&str; 5] = [
    BookAdded::TYPE,
    BookPriceUpdated::TYPE,
    BookDetailsUpdated::TYPE,
    BookRemoved::TYPE,
    BookFactEvent::TYPE,
];

/// The schema text of every event type, in the order of [`EVENT_TYPES`].
const SCHEMA_FILES: [&str; 5] = [
    include_str!("../../schemas/BookAdded.avsc"),
    include_str!("../../schemas/BookPriceUpdated.avsc"),
    include_str!("../../schemas/BookDetailsUpdated.avsc"),
    include_str!("../../schemas/BookRemoved.avsc"),
    include_str!("../../schemas/BookFactEvent.avsc"),
];

/// Every version of every record ever published (`schemas/history/`, one entry per file). A
/// single-object frame names its writer schema by fingerprint alone, so a reader must know them
/// all (docs/contracts.md): records written by an earlier or later version of this service sit
/// on the same topics. `tests/codec_contract.rs` fails while a file of the folder is missing.
pub const PUBLISHED_SCHEMAS: [&str; 5] = [
    include_str!("../../schemas/history/BookAdded/v1.avsc"),
    include_str!("../../schemas/history/BookPriceUpdated/v1.avsc"),
    include_str!("../../schemas/history/BookDetailsUpdated/v1.avsc"),
    include_str!("../../schemas/history/BookRemoved/v1.avsc"),
    include_str!("../../schemas/history/BookFactEvent/v1.avsc"),
];

/// The schema of each event type when the outbox began recording which schema wrote each
/// event (`StoredEvent::schema_fingerprint`). Every version before saved its events with these,
/// so an event saved without a fingerprint was written with its type's entry here. They
/// describe data already saved: never change them, also not when a schema changes.
const UNRECORDED_SCHEMA_FINGERPRINTS: [(&str, u64); 5] = [
    (BookAdded::TYPE, 0xb0cd_b8c9_73ba_4f5f),
    (BookPriceUpdated::TYPE, 0xd719_3e63_16e5_8a66),
    (BookDetailsUpdated::TYPE, 0xc15c_b209_35d9_8a62),
    (BookRemoved::TYPE, 0x8951_fbe4_2f74_7fa0),
    (BookFactEvent::TYPE, 0x0a0d_018b_cfc9_94c3),
];

/// The fingerprint of the schema that wrote a saved event's datum: the one recorded with it,
/// or, for an event saved before fingerprints were recorded, the one its type had then.
/// `None` only for an unknown event type without a recorded fingerprint.
pub fn writer_fingerprint(event_type: &str, recorded: Option<u64>) -> Option<u64> {
    recorded.or_else(|| {
        UNRECORDED_SCHEMA_FINGERPRINTS
            .iter()
            .find(|(known, _)| *known == event_type)
            .map(|(_, fingerprint)| *fingerprint)
    })
}

/// Refuses a saved datum whose writer schema (`recorded`, or for an event saved before it was
/// recorded, its type's entry in `UNRECORDED_SCHEMA_FINGERPRINTS`) is not `current`, the
/// schema this version reads and sends `event_type` with. An Avro datum is only readable with
/// the schema that wrote it: read, or sent labelled, with another, consumers misread its bytes.
pub fn check_written_with(
    event_type: &str,
    recorded: Option<u64>,
    current: u64,
) -> Result<(), CodecError> {
    match writer_fingerprint(event_type, recorded) {
        Some(written) if written != current => Err(CodecError::WrittenWithAnotherSchema {
            event_type: event_type.to_owned(),
            written,
            current,
        }),
        _ => Ok(()),
    }
}

/// The contract of one event type: its record schema and how it is identified on the wire.
pub struct Contract {
    event_type: &'static str,
    full_name: String,
    schema_json: &'static str,
    schema: &'static Schema,
    canonical_form: String,
    fingerprint: u64,
    pub(super) writer: GenericDatumWriter<'static>,
    pub(super) reader: GenericDatumReader<'static>,
}

impl Contract {
    /// `BookAdded`, …: the record's simple name, also `EventMetadata::event_type`.
    pub fn event_type(&self) -> &'static str {
        self.event_type
    }

    /// `bookstore.events.BookAdded`, …: the record's full name, also the CloudEvents `type`
    /// and the record part of the registry subject.
    pub fn full_name(&self) -> &str {
        &self.full_name
    }

    /// The schema file as published (with docs and defaults): what is registered.
    pub fn schema_json(&self) -> &'static str {
        self.schema_json
    }

    pub fn schema(&self) -> &'static Schema {
        self.schema
    }

    /// The Avro Parsing Canonical Form, computed as the specification defines it.
    pub fn canonical_form(&self) -> &str {
        &self.canonical_form
    }

    /// CRC-64-AVRO of the canonical form; written little-endian after `C3 01` in single-object
    /// frames.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

impl std::fmt::Debug for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contract")
            .field("full_name", &self.full_name)
            .field("fingerprint", &format_args!("{:#018x}", self.fingerprint))
            .finish_non_exhaustive()
    }
}

/// All contracts, loaded on first use.
pub(crate) fn contracts() -> &'static [Contract] {
    static CONTRACTS: LazyLock<Vec<Contract>> = LazyLock::new(|| {
        EVENT_TYPES
            .into_iter()
            .zip(SCHEMA_FILES)
            .map(|(event_type, schema_json)| load(event_type, schema_json))
            .collect()
    });
    &CONTRACTS
}

/// The contract of `event_type`, if there is one.
pub fn contract(event_type: &str) -> Option<&'static Contract> {
    contracts()
        .iter()
        .find(|contract| contract.event_type == event_type)
}

/// The contract whose canonical form has `fingerprint`.
pub fn contract_for_fingerprint(fingerprint: u64) -> Option<&'static Contract> {
    contracts()
        .iter()
        .find(|contract| contract.fingerprint == fingerprint)
}

/// The contract whose record has the full name `full_name` (`bookstore.events.BookAdded`).
pub fn contract_for_full_name(full_name: &str) -> Option<&'static Contract> {
    contracts()
        .iter()
        .find(|contract| contract.full_name == full_name)
}

/// Parses one embedded schema. The files are part of the build and a unit test loads every one,
/// so a failure here is a broken build, never bad input.
fn load(event_type: &'static str, schema_json: &'static str) -> Contract {
    let broken = |reason: String| -> ! {
        panic!("schemas/{event_type}.avsc is not a valid contract: {reason}")
    };
    // The writer and reader borrow the schema for the life of the process; leaking one schema
    // per event type, once, is what lets them live in a static next to it.
    let schema: &'static Schema = Box::leak(Box::new(
        Schema::parse_str(schema_json).unwrap_or_else(|e| broken(e.to_string())),
    ));
    let full_name = match schema {
        Schema::Record(record) => record.name.fullname(None),
        _ => broken("not a record".into()),
    };
    if full_name != format!("{NAMESPACE}.{event_type}") {
        broken(format!("record is named {full_name}"));
    }
    let canonical_form =
        parsing_canonical_form(schema_json).unwrap_or_else(|e| broken(e.to_string()));
    let writer = GenericDatumWriter::builder(schema)
        .build()
        .unwrap_or_else(|e| broken(e.to_string()));
    let reader = GenericDatumReader::builder(schema)
        .build()
        .unwrap_or_else(|e| broken(e.to_string()));
    Contract {
        event_type,
        full_name,
        schema_json,
        schema,
        fingerprint: crc64_avro(canonical_form.as_bytes()),
        canonical_form,
        writer,
        reader,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails when a schema file changes. Then keep `UNRECORDED_SCHEMA_FINGERPRINTS` as it is
    /// (it describes events already saved) and change this test to expect the new fingerprint
    /// of that one type.
    #[test]
    fn the_schemas_are_those_of_the_events_saved_without_a_fingerprint() {
        for contract in contracts() {
            assert_eq!(
                writer_fingerprint(contract.event_type(), None),
                Some(contract.fingerprint()),
                "{} ({:#018x})",
                contract.event_type(),
                contract.fingerprint()
            );
        }
        assert_eq!(writer_fingerprint("BookLent", None), None);
        assert_eq!(writer_fingerprint("BookLent", Some(7)), Some(7));
        assert_eq!(writer_fingerprint(BookAdded::TYPE, Some(7)), Some(7));
    }

    #[test]
    fn every_contract_loads_with_a_distinct_fingerprint() {
        let contracts = contracts();
        assert_eq!(contracts.len(), EVENT_TYPES.len());
        for contract in contracts {
            assert_eq!(
                contract_for_fingerprint(contract.fingerprint()).map(Contract::event_type),
                Some(contract.event_type())
            );
            assert_eq!(
                contract_for_full_name(contract.full_name()).map(Contract::event_type),
                Some(contract.event_type())
            );
        }
    }
}
