//! The Avro contract: every event survives encode and decode, the `schemas/*.avsc` files and
//! the Rust types cannot drift apart, the framings are byte-exact, and no input — garbage,
//! truncated, unknown — makes the codec panic.

use std::collections::BTreeSet;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{EnumSchema, RecordSchema};
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use bookstore::codec::avro::{UNKNOWN_DETAIL_FIELD, detail_field_symbol, to_value};
use bookstore::codec::fingerprint::{parsing_canonical_form, schema_fingerprint};
use bookstore::codec::wire::SINGLE_OBJECT_MAGIC;
use bookstore::codec::{
    AvroCodec, CodecError, EVENT_TYPES, EventCodec, Frame, FrameError, FramedDecoder,
    RegisteredSchemas, WireFormat, frame_confluent, frame_single_object, parse_frame,
};
use bookstore::domain::{
    BookAdded, BookDetailsUpdated, BookEvent, BookFactEvent, BookId, BookPriceUpdated, BookRemoved,
    DetailField, EventPayload, Price,
};
use proptest::prelude::*;
use uuid::Uuid;

fn book_id() -> BookId {
    BookId::new(Uuid::parse_str("0190f5c4-6b3a-7cc1-9f1e-2f1d3c4b5a69").unwrap())
}

fn price(text: &str) -> Price {
    text.parse().unwrap()
}

/// One event of every type with every optional field set.
fn fully_populated() -> Vec<EventPayload> {
    vec![
        EventPayload::Delta(BookEvent::Added(BookAdded {
            book_id: book_id(),
            title: "Dune".into(),
            author: "Frank Herbert".into(),
            isbn: Some("9780441013593".into()),
            price: price("12.99"),
            description: Some("Desert planet.\nSpice.".into()),
        })),
        EventPayload::Delta(BookEvent::PriceUpdated(BookPriceUpdated {
            book_id: book_id(),
            old_price: price("12.99"),
            new_price: price("9.50"),
        })),
        EventPayload::Delta(BookEvent::DetailsUpdated(BookDetailsUpdated {
            book_id: book_id(),
            title: "Dune Messiah".into(),
            author: "Frank Herbert".into(),
            isbn: Some("9780593098233".into()),
            description: Some("The sequel.".into()),
            changed: DetailField::ALL.to_vec(),
        })),
        EventPayload::Delta(BookEvent::Removed(BookRemoved {
            book_id: book_id(),
            title: "Dune".into(),
            author: "Frank Herbert".into(),
        })),
        EventPayload::Fact(BookFactEvent {
            book_id: book_id(),
            title: "Dune".into(),
            author: "Frank Herbert".into(),
            isbn: Some("9780441013593".into()),
            price: price("12.99"),
            description: Some("Desert planet.".into()),
            version: 3,
            removed: false,
        }),
    ]
}

/// Edge cases: absent optional fields, the smallest and largest prices, non-ASCII text.
fn edge_cases() -> Vec<EventPayload> {
    vec![
        EventPayload::Delta(BookEvent::Added(BookAdded {
            book_id: BookId::generate(),
            title: "Les Misérables — 悲惨世界 📚".into(),
            author: "Фёдор Достоевский".into(),
            isbn: None,
            price: Price::ZERO,
            description: None,
        })),
        EventPayload::Delta(BookEvent::PriceUpdated(BookPriceUpdated {
            book_id: BookId::generate(),
            old_price: Price::ZERO,
            new_price: price("9999999999.99"),
        })),
        EventPayload::Delta(BookEvent::DetailsUpdated(BookDetailsUpdated {
            book_id: BookId::generate(),
            title: "Ωμέγα".into(),
            author: "Zoë".into(),
            isbn: None,
            description: None,
            changed: vec![DetailField::Isbn, DetailField::Description],
        })),
        EventPayload::Delta(BookEvent::Removed(BookRemoved {
            book_id: BookId::generate(),
            title: "ß".into(),
            author: "\u{1F600}".into(),
        })),
        EventPayload::Fact(BookFactEvent {
            book_id: BookId::generate(),
            title: "x".into(),
            author: "y".into(),
            isbn: None,
            price: price("9999999999.99"),
            description: None,
            version: u64::try_from(i64::MAX).unwrap(),
            removed: true,
        }),
    ]
}

fn record(schema: &Schema) -> &RecordSchema {
    match schema {
        Schema::Record(record) => record,
        other => panic!("not a record schema: {other:?}"),
    }
}

fn detail_field_enum(codec: &AvroCodec) -> &EnumSchema {
    let changed = record(codec.schema(BookDetailsUpdated::TYPE).unwrap())
        .fields
        .iter()
        .find(|field| field.name == "changed")
        .expect("BookDetailsUpdated has a changed field");
    match &changed.schema {
        Schema::Array(array) => match array.items.as_ref() {
            Schema::Enum(symbols) => symbols,
            other => panic!("changed items are not an enum: {other:?}"),
        },
        other => panic!("changed is not an array: {other:?}"),
    }
}

#[test]
fn every_event_type_round_trips_through_encode_and_decode() {
    let codec = AvroCodec::new();
    for event in fully_populated().into_iter().chain(edge_cases()) {
        let datum = codec.encode(&event).unwrap();
        let decoded = codec.decode(event.event_type(), &datum).unwrap();
        assert_eq!(decoded, event);
    }
}

#[test]
fn samples_cover_every_event_type() {
    let covered: BTreeSet<_> = fully_populated()
        .iter()
        .map(EventPayload::event_type)
        .collect();
    assert_eq!(covered, EVENT_TYPES.into_iter().collect());
}

#[test]
fn the_schemas_folder_holds_exactly_one_file_per_event_type() {
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let files: BTreeSet<String> = std::fs::read_dir(folder)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".avsc"))
        .collect();
    let expected = EVENT_TYPES
        .iter()
        .map(|event_type| format!("{event_type}.avsc"))
        .collect();
    assert_eq!(files, expected);
}

/// The drift test: a field added to a Rust event but not to its `.avsc` (or the other way
/// round) fails here, naming the event type.
#[test]
fn schema_fields_equal_the_rust_fields_and_what_the_codec_writes() {
    let codec = AvroCodec::new();
    for event in fully_populated() {
        let event_type = event.event_type();
        let schema = codec.schema(event_type).unwrap();
        let schema_fields: Vec<&str> = record(schema)
            .fields
            .iter()
            .map(|field| field.name.as_str())
            .collect();

        let Value::Record(written) = to_value(&event).unwrap() else {
            panic!("{event_type}: the codec writes a record");
        };
        let written: Vec<&str> = written.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            written, schema_fields,
            "{event_type}: codec fields vs schema fields"
        );

        let serde_json::Value::Object(rust_fields) = serde_json::to_value(&event).unwrap() else {
            panic!("{event_type}: a Rust event serializes to an object");
        };
        let rust_fields: BTreeSet<&str> = rust_fields.keys().map(String::as_str).collect();
        let schema_field_set: BTreeSet<&str> = schema_fields.iter().copied().collect();
        assert_eq!(
            rust_fields, schema_field_set,
            "{event_type}: Rust fields vs schema fields"
        );
    }
}

#[test]
fn encoded_values_validate_against_the_published_files() {
    let codec = AvroCodec::new();
    for event in fully_populated().into_iter().chain(edge_cases()) {
        let event_type = event.event_type();
        let path = format!("{}/schemas/{event_type}.avsc", env!("CARGO_MANIFEST_DIR"));
        let schema = Schema::parse_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let value = to_value(&event).unwrap();
        assert!(value.validate(&schema), "{event_type}");
        // And the codec's datum reads back, with the file alone, as that very value.
        let datum = codec.encode(&event).unwrap();
        let read = GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut datum.as_slice())
            .unwrap();
        assert!(read.validate(&schema), "{event_type}");
        assert_eq!(
            bookstore::codec::avro::from_value(event_type, read).unwrap(),
            event
        );
    }
}

#[test]
fn every_field_and_record_is_documented_and_optional_fields_default_to_null() {
    let codec = AvroCodec::new();
    for contract in codec.contracts() {
        let record = record(contract.schema());
        assert!(record.doc.is_some(), "{} has no doc", contract.full_name());
        for field in &record.fields {
            assert!(
                field.doc.is_some(),
                "{}.{} has no doc",
                contract.full_name(),
                field.name
            );
            if let Schema::Union(union) = &field.schema {
                assert_eq!(
                    union.variants(),
                    [Schema::Null, Schema::String],
                    "{}.{}",
                    contract.full_name(),
                    field.name
                );
                assert_eq!(
                    field.default,
                    Some(serde_json::Value::Null),
                    "{}",
                    field.name
                );
            }
        }
    }
}

#[test]
fn absent_rust_options_are_exactly_the_nullable_schema_fields() {
    let codec = AvroCodec::new();
    for event in edge_cases() {
        let event_type = event.event_type();
        let serde_json::Value::Object(rust_fields) = serde_json::to_value(&event).unwrap() else {
            panic!("{event_type}: a Rust event serializes to an object");
        };
        for field in &record(codec.schema(event_type).unwrap()).fields {
            let nullable = matches!(field.schema, Schema::Union(_));
            let absent = rust_fields[&field.name].is_null();
            assert_eq!(nullable, absent, "{event_type}.{}", field.name);
        }
    }
}

#[test]
fn detail_field_symbols_are_the_domain_fields_plus_unknown_as_default() {
    let codec = AvroCodec::new();
    let detail_field = detail_field_enum(&codec);
    let mut expected = vec![UNKNOWN_DETAIL_FIELD.to_owned()];
    expected.extend(DetailField::ALL.map(|field| detail_field_symbol(field).to_owned()));
    assert_eq!(detail_field.symbols, expected);
    assert_eq!(detail_field.default.as_deref(), Some(UNKNOWN_DETAIL_FIELD));
    for field in DetailField::ALL {
        assert_eq!(detail_field_symbol(field), field.as_str().to_uppercase());
    }
}

#[test]
fn money_fields_are_decimals_with_the_precision_and_scale_of_price() {
    let codec = AvroCodec::new();
    let mut money_fields = 0;
    for contract in codec.contracts() {
        for field in &record(contract.schema()).fields {
            if let Schema::Decimal(decimal) = &field.schema {
                assert_eq!(
                    decimal.precision,
                    Price::PRECISION as usize,
                    "{}",
                    field.name
                );
                assert_eq!(decimal.scale, Price::SCALE as usize, "{}", field.name);
                money_fields += 1;
            }
        }
    }
    assert_eq!(
        money_fields, 4,
        "price (BookAdded, BookFactEvent), old_price, new_price"
    );
}

#[test]
fn a_price_is_the_big_endian_twos_complement_of_its_cents() {
    let codec = AvroCodec::new();
    let event = EventPayload::Delta(BookEvent::PriceUpdated(BookPriceUpdated {
        book_id: book_id(),
        old_price: price("12.99"),
        new_price: price("0.00"),
    }));
    let datum = codec.encode(&event).unwrap();
    // book_id: length 36 (zigzag 72 = 0x48) + text; old_price: length 2 + 0x05 0x13 (1299);
    // new_price: length 1 + 0x00.
    let mut expected = vec![0x48];
    expected.extend_from_slice(book_id().to_string().as_bytes());
    expected.extend_from_slice(&[0x04, 0x05, 0x13, 0x02, 0x00]);
    assert_eq!(datum, expected);
}

/// From the Avro specification's test data: the CRC-64-AVRO fingerprint of `"int"` is
/// 8247732601305521295 (0x7275d51a3f395c8f); fastavro 1.13.1
/// `fingerprint(parse_schema("int"), "CRC-64-AVRO")` prints its little-endian bytes
/// "8f5c393f1ad57572".
#[test]
fn crc_64_avro_known_answer_for_int() {
    let fingerprint = schema_fingerprint(r#""int""#).unwrap();
    assert_eq!(fingerprint, 0x7275_d51a_3f39_5c8f);
    assert_eq!(
        frame_single_object(fingerprint, &[]),
        [0xC3, 0x01, 0x8f, 0x5c, 0x39, 0x3f, 0x1a, 0xd5, 0x75, 0x72]
    );
}

#[test]
fn contract_fingerprints_are_of_the_spec_canonical_form_of_the_files() {
    let codec = AvroCodec::new();
    for contract in codec.contracts() {
        let canonical = parsing_canonical_form(contract.schema_json()).unwrap();
        assert_eq!(contract.canonical_form(), canonical);
        assert!(!canonical.contains("logicalType") && !canonical.contains("doc"));
        assert_eq!(
            Some(contract.fingerprint()),
            schema_fingerprint(contract.schema_json()).ok()
        );
        assert_eq!(
            codec.event_type_for_fingerprint(contract.fingerprint()),
            Some(contract.event_type())
        );
    }
}

#[test]
fn single_object_frames_start_with_c3_01_and_the_little_endian_fingerprint() {
    let codec = AvroCodec::new();
    let decoder = FramedDecoder::new(codec);
    for event in fully_populated() {
        let event_type = event.event_type();
        let datum = codec.encode(&event).unwrap();
        let framed = WireFormat::SingleObject.frame(event_type, &datum).unwrap();
        let fingerprint = codec.fingerprint(event_type).unwrap();
        assert_eq!(framed[..2], SINGLE_OBJECT_MAGIC);
        assert_eq!(framed[2..10], fingerprint.to_le_bytes());
        assert_eq!(framed[10..], datum[..]);
        assert_eq!(framed, frame_single_object(fingerprint, &datum));
        assert_eq!(
            parse_frame(&framed).unwrap(),
            Frame::SingleObject {
                fingerprint,
                datum: &datum
            }
        );
        assert_eq!(decoder.decode(&framed).unwrap(), event);
    }
}

#[test]
fn confluent_frames_round_trip_with_the_registered_ids() {
    let codec = AvroCodec::new();
    let mut schemas = RegisteredSchemas::default();
    for (id, event_type) in (100..).zip(EVENT_TYPES) {
        schemas.insert(event_type, id);
    }
    let wire = WireFormat::Confluent {
        schemas: schemas.clone(),
    };
    let decoder = FramedDecoder::with_registered(codec, &schemas);
    for event in fully_populated() {
        let event_type = event.event_type();
        let datum = codec.encode(&event).unwrap();
        let framed = wire.frame(event_type, &datum).unwrap();
        let id = schemas.id(event_type).unwrap();
        assert_eq!(framed, frame_confluent(id, &datum));
        assert_eq!(framed[0], 0x00);
        assert_eq!(framed[1..5], id.to_be_bytes());
        assert_eq!(
            parse_frame(&framed).unwrap(),
            Frame::Confluent {
                schema_id: id,
                datum: &datum
            }
        );
        assert_eq!(decoder.decode(&framed).unwrap(), event);
    }
}

#[test]
fn malformed_frames_are_refused_with_a_clear_error() {
    assert!(matches!(
        parse_frame(&[]),
        Err(CodecError::Frame(FrameError::Empty))
    ));
    assert!(matches!(
        parse_frame(&[0xC3, 0x01, 0xAA]),
        Err(CodecError::Frame(FrameError::Truncated {
            format: "single-object",
            ..
        }))
    ));
    assert!(matches!(
        parse_frame(&[0x00, 0x00, 0x01]),
        Err(CodecError::Frame(FrameError::Truncated {
            format: "Confluent",
            ..
        }))
    ));
    assert!(matches!(
        parse_frame(b"garbage"),
        Err(CodecError::Frame(FrameError::UnknownMagic { .. }))
    ));
    assert!(matches!(
        parse_frame(&[0xC3, 0x00, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err(CodecError::Frame(FrameError::UnknownMagic { .. }))
    ));
    // A header alone is a valid frame with an empty datum: decoding it is what fails.
    assert!(parse_frame(&frame_confluent(1, &[])).is_ok());
}

#[test]
fn unknown_fingerprints_and_schema_ids_are_named_in_the_error() {
    let decoder = FramedDecoder::new(AvroCodec::new());
    let error = decoder
        .decode(&frame_single_object(0x0123_4567_89ab_cdef, &[0x00]))
        .unwrap_err();
    assert!(matches!(
        error,
        CodecError::UnknownFingerprint(0x0123_4567_89ab_cdef)
    ));
    assert_eq!(
        error.to_string(),
        "no known schema has the fingerprint 0x0123456789abcdef"
    );
    let error = decoder.decode(&frame_confluent(4711, &[0x00])).unwrap_err();
    assert!(matches!(error, CodecError::UnknownSchemaId(4711)));
}

#[test]
fn unknown_event_types_are_refused() {
    let codec = AvroCodec::new();
    assert!(matches!(
        codec.decode("BookBurned", &[]),
        Err(CodecError::UnknownEventType(name)) if name == "BookBurned"
    ));
    assert!(codec.schema("BookBurned").is_none());
}

#[test]
fn every_truncation_of_a_valid_datum_is_refused() {
    let codec = AvroCodec::new();
    for event in fully_populated().into_iter().chain(edge_cases()) {
        let datum = codec.encode(&event).unwrap();
        for end in 0..datum.len() {
            let result = codec.decode(event.event_type(), &datum[..end]);
            assert!(
                matches!(result, Err(CodecError::Decode { .. })),
                "{} cut to {end} of {} bytes decoded as {result:?}",
                event.event_type(),
                datum.len()
            );
        }
    }
}

#[test]
fn trailing_bytes_after_the_record_are_refused() {
    let codec = AvroCodec::new();
    let event = &fully_populated()[0];
    let mut datum = codec.encode(event).unwrap();
    datum.push(0);
    let error = codec.decode(event.event_type(), &datum).unwrap_err();
    assert!(error.to_string().contains("1 bytes left"), "{error}");
}

#[test]
fn values_the_domain_forbids_are_refused_on_decode() {
    let codec = AvroCodec::new();
    let schema = codec.schema(BookPriceUpdated::TYPE).unwrap();
    let writer = GenericDatumWriter::builder(schema).build().unwrap();
    let negative = Value::Record(vec![
        ("book_id".into(), Value::Uuid(book_id().as_uuid())),
        ("old_price".into(), Value::Decimal(vec![0xFFu8].into())),
        ("new_price".into(), Value::Decimal(vec![0x01u8].into())),
    ]);
    let datum = writer.write_value_to_vec(negative).unwrap();
    let error = codec.decode(BookPriceUpdated::TYPE, &datum).unwrap_err();
    assert!(error.to_string().contains("old_price"), "{error}");

    let too_precise = Value::Record(vec![
        ("book_id".into(), Value::Uuid(book_id().as_uuid())),
        ("old_price".into(), Value::Decimal(vec![0x01u8].into())),
        // 10^12 cents: one digit more than decimal(12, 2) allows.
        (
            "new_price".into(),
            Value::Decimal(vec![0x00, 0xE8, 0xD4, 0xA5, 0x10, 0x00].into()),
        ),
    ]);
    let datum = writer.write_value_to_vec(too_precise).unwrap();
    assert!(codec.decode(BookPriceUpdated::TYPE, &datum).is_err());
}

/// Written by an older producer whose `BookAdded` had no `description`: read with the default.
#[test]
fn an_older_writer_schema_resolves_with_defaults() {
    let older = Schema::parse_str(
        r#"{"type":"record","name":"BookAdded","namespace":"bookstore.events","fields":[
            {"name":"book_id","type":{"type":"string","logicalType":"uuid"}},
            {"name":"title","type":"string"},
            {"name":"author","type":"string"},
            {"name":"isbn","type":["null","string"],"default":null},
            {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}}
        ]}"#,
    )
    .unwrap();
    let datum = GenericDatumWriter::builder(&older)
        .build()
        .unwrap()
        .write_value_to_vec(Value::Record(vec![
            ("book_id".into(), Value::Uuid(book_id().as_uuid())),
            ("title".into(), Value::String("Dune".into())),
            ("author".into(), Value::String("Frank Herbert".into())),
            ("isbn".into(), Value::Union(0, Box::new(Value::Null))),
            ("price".into(), Value::Decimal(vec![0x05u8, 0x13].into())),
        ]))
        .unwrap();
    let decoded = AvroCodec::new()
        .decode_with_writer_schema(BookAdded::TYPE, &older, &datum)
        .unwrap();
    assert_eq!(
        decoded,
        EventPayload::Delta(BookEvent::Added(BookAdded {
            book_id: book_id(),
            title: "Dune".into(),
            author: "Frank Herbert".into(),
            isbn: None,
            price: price("12.99"),
            description: None,
        }))
    );
}

/// Written by a newer producer that added a field and a `BookDetailField` symbol, registered
/// under a new id: the decoder learns the schema and reads what it knows.
#[test]
fn a_newer_writer_schema_with_a_new_field_and_symbol_is_read_through_the_registry_path() {
    let newer_json = r#"{"type":"record","name":"BookDetailsUpdated","namespace":"bookstore.events","fields":[
        {"name":"book_id","type":{"type":"string","logicalType":"uuid"}},
        {"name":"title","type":"string"},
        {"name":"author","type":"string"},
        {"name":"isbn","type":["null","string"],"default":null},
        {"name":"description","type":["null","string"],"default":null},
        {"name":"changed","type":{"type":"array","items":{"type":"enum","name":"BookDetailField",
            "symbols":["UNKNOWN","TITLE","AUTHOR","ISBN","DESCRIPTION","PUBLISHER"],"default":"UNKNOWN"}}},
        {"name":"publisher","type":["null","string"],"default":null}
    ]}"#;
    let newer = Schema::parse_str(newer_json).unwrap();
    let datum = GenericDatumWriter::builder(&newer)
        .build()
        .unwrap()
        .write_value_to_vec(Value::Record(vec![
            ("book_id".into(), Value::Uuid(book_id().as_uuid())),
            ("title".into(), Value::String("Dune".into())),
            ("author".into(), Value::String("Frank Herbert".into())),
            ("isbn".into(), Value::Union(0, Box::new(Value::Null))),
            ("description".into(), Value::Union(0, Box::new(Value::Null))),
            (
                "changed".into(),
                Value::Array(vec![
                    Value::Enum(1, "TITLE".into()),
                    Value::Enum(5, "PUBLISHER".into()),
                ]),
            ),
            (
                "publisher".into(),
                Value::Union(1, Box::new(Value::String("Ace".into()))),
            ),
        ]))
        .unwrap();

    let mut decoder = FramedDecoder::new(AvroCodec::new());
    let framed = frame_confluent(77, &datum);
    assert!(matches!(
        decoder.decode(&framed),
        Err(CodecError::UnknownSchemaId(77))
    ));
    assert_eq!(
        decoder.add_writer_schema(77, newer_json).unwrap(),
        BookDetailsUpdated::TYPE
    );
    let EventPayload::Delta(BookEvent::DetailsUpdated(decoded)) = decoder.decode(&framed).unwrap()
    else {
        panic!("not a BookDetailsUpdated");
    };
    assert_eq!(decoded.title, "Dune");
    assert_eq!(decoded.changed, [DetailField::Title]);
}

#[test]
fn writer_schemas_of_foreign_records_are_refused() {
    let mut decoder = FramedDecoder::new(AvroCodec::new());
    let error = decoder
        .add_writer_schema(1, r#"{"type":"record","name":"other.Thing","fields":[]}"#)
        .unwrap_err();
    assert!(matches!(error, CodecError::WriterSchema(_)), "{error}");
    assert!(decoder.add_writer_schema(2, "not json").is_err());
}

fn any_event_type() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(EVENT_TYPES.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        event_type in any_event_type(),
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = AvroCodec::new().decode(event_type, &bytes);
    }

    #[test]
    fn decoding_arbitrary_frames_never_panics(
        magic in prop_oneof![
            Just(vec![]),
            Just(vec![0x00]),
            Just(vec![0xC3, 0x01]),
            proptest::collection::vec(any::<u8>(), 0..3),
        ],
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let codec = AvroCodec::new();
        let mut schemas = RegisteredSchemas::default();
        schemas.insert(BookAdded::TYPE, 1);
        let decoder = FramedDecoder::with_registered(codec, &schemas);
        let mut value = magic;
        value.extend_from_slice(&bytes);
        let _ = decoder.decode(&value);
    }

    /// Valid framing, random datum: exercises the Avro reader behind a real fingerprint.
    #[test]
    fn decoding_arbitrary_datums_behind_real_fingerprints_never_panics(
        event_type in any_event_type(),
        bytes in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let codec = AvroCodec::new();
        let framed = frame_single_object(codec.fingerprint(event_type).unwrap(), &bytes);
        let _ = FramedDecoder::new(codec).decode(&framed);
    }

    #[test]
    fn flipping_any_byte_of_a_valid_datum_never_panics(
        index in any::<prop::sample::Index>(),
        flip in 1u8..=255,
        which in 0usize..5,
    ) {
        let codec = AvroCodec::new();
        let event = &fully_populated()[which];
        let mut datum = codec.encode(event).unwrap();
        let at = index.index(datum.len());
        datum[at] ^= flip;
        let _ = codec.decode(event.event_type(), &datum);
    }
}

/// `schemas/history/<Record>/v<n>.avsc`: every published version of the record, numbered from
/// 1 without gaps, in order.
fn published_versions(record: &str) -> Vec<(String, serde_json::Value)> {
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas/history")
        .join(record);
    let mut versions: Vec<(u32, String, serde_json::Value)> = std::fs::read_dir(&folder)
        .unwrap_or_else(|error| panic!("{}: {error}", folder.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let number = name
                .strip_prefix('v')
                .and_then(|rest| rest.strip_suffix(".avsc"))
                .and_then(|number| number.parse().ok())
                .unwrap_or_else(|| panic!("{}: not v<n>.avsc", path.display()));
            let json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            (number, format!("{record}/{name}"), json)
        })
        .collect();
    versions.sort_by_key(|(number, ..)| *number);
    let numbers: Vec<u32> = versions.iter().map(|(number, ..)| *number).collect();
    let expected: Vec<u32> = (1..=u32::try_from(numbers.len()).unwrap()).collect();
    assert_eq!(numbers, expected, "{}: versions 1 to n", folder.display());
    versions
        .into_iter()
        .map(|(_, name, json)| (name, json))
        .collect()
}

/// The schema without its `doc` texts, which a version may change freely.
fn without_docs(json: &serde_json::Value) -> serde_json::Value {
    match json {
        serde_json::Value::Object(map) => map
            .iter()
            .filter(|(key, _)| *key != "doc")
            .map(|(key, value)| (key.clone(), without_docs(value)))
            .collect(),
        serde_json::Value::Array(items) => items.iter().map(without_docs).collect(),
        other => other.clone(),
    }
}

/// Every `(precision, scale)` of a decimal in the schema, in order.
fn decimals(json: &serde_json::Value, found: &mut Vec<(u64, u64)>) {
    match json {
        serde_json::Value::Object(map) => {
            if map.get("logicalType").and_then(|t| t.as_str()) == Some("decimal") {
                let number = |key: &str| map.get(key).and_then(serde_json::Value::as_u64);
                found.push((number("precision").unwrap(), number("scale").unwrap_or(0)));
            }
            map.values().for_each(|value| decimals(value, found));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| decimals(item, found)),
        _ => {}
    }
}

/// The evolution rules of docs/contracts.md, enforced: the current file of every record is its
/// latest published version (docs aside), every version reads what every other wrote
/// (FULL_TRANSITIVE, by apache-avro's resolution rules), and no decimal's precision or scale
/// ever changes (the Parsing Canonical Form, and so the fingerprint, leaves them out). A change
/// to a schema fails here until it is added to `schemas/history/` as the next version.
#[test]
fn every_schema_is_its_latest_published_version_and_compatible_with_all_others() {
    let codec = AvroCodec::new();
    for contract in codec.contracts() {
        let record = contract.full_name().rsplit('.').next().unwrap().to_owned();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas")
            .join(format!("{record}.avsc"));
        let current: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let versions = published_versions(&record);
        let (latest_name, latest) = versions.last().expect("at least version 1");
        assert_eq!(
            without_docs(latest),
            without_docs(&current),
            "{} differs from its latest published version {latest_name}: add it to \
             schemas/history/{record}/ as the next version",
            path.display()
        );
        let mut expected_decimals = Vec::new();
        decimals(&current, &mut expected_decimals);
        let parsed: Vec<(String, Schema)> = versions
            .iter()
            .map(|(name, json)| (name.clone(), Schema::parse(json).unwrap()))
            .collect();
        for (name, json) in &versions {
            let mut found = Vec::new();
            decimals(json, &mut found);
            assert_eq!(
                found, expected_decimals,
                "{name}: precision or scale changed"
            );
        }
        for (a_name, a) in &parsed {
            for (b_name, b) in &parsed {
                if let Err(error) =
                    apache_avro::schema_compatibility::SchemaCompatibility::can_read(a, b)
                {
                    panic!("{b_name} cannot read what {a_name} wrote: {error}");
                }
            }
        }
    }
}

/// The check above catches what the rules forbid and lets through what they allow.
#[test]
fn the_compatibility_check_refuses_a_removed_required_field_and_allows_an_added_optional_one() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/BookAdded.avsc");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let with_fields = |edit: &dyn Fn(&mut Vec<serde_json::Value>)| {
        let mut json = original.clone();
        edit(json["fields"].as_array_mut().unwrap());
        Schema::parse(&json).unwrap()
    };
    let original = Schema::parse(&original).unwrap();
    let check = |writer: &Schema, reader: &Schema| {
        apache_avro::schema_compatibility::SchemaCompatibility::can_read(writer, reader).is_ok()
    };

    let without_author = with_fields(&|fields| fields.retain(|f| f["name"] != "author"));
    assert!(check(&without_author, &without_author));
    assert!(
        !check(&without_author, &original),
        "a reader that needs author read data without it"
    );

    let with_publisher = with_fields(&|fields| {
        fields.push(serde_json::json!({
            "name": "publisher", "type": ["null", "string"], "default": null
        }));
    });
    assert!(check(&with_publisher, &original) && check(&original, &with_publisher));

    let publisher_required = with_fields(&|fields| {
        fields.push(serde_json::json!({"name": "publisher", "type": "string"}));
    });
    assert!(
        !check(&original, &publisher_required),
        "a required field without a default read old data"
    );
}

/// The other direction of `tests/interop/read_topics.py` (fastavro reads what the service
/// wrote): datums fastavro wrote from the `.avsc` files alone (`tests/interop/make_vectors.py`,
/// committed as `fastavro_vectors.json`) decode to the events they hold, the service writes the
/// very same bytes for them, and fastavro's fingerprints are the service's in frame order.
#[test]
fn datums_fastavro_wrote_decode_and_encode_back_byte_for_byte() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop/fastavro_vectors.json");
    let document: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let title = "Dune \u{2014} \u{e4}\u{f6}\u{fc} \u{1d11e}";
    let expected = [
        EventPayload::Delta(BookEvent::Added(BookAdded {
            book_id: book_id(),
            title: title.into(),
            author: "Frank Herbert".into(),
            isbn: Some("9780441013593".into()),
            price: price("12.99"),
            description: Some("Line one\nLine two\twith a tab".into()),
        })),
        EventPayload::Delta(BookEvent::PriceUpdated(BookPriceUpdated {
            book_id: book_id(),
            old_price: price("9999999999.99"),
            new_price: price("0.00"),
        })),
        EventPayload::Delta(BookEvent::DetailsUpdated(BookDetailsUpdated {
            book_id: book_id(),
            title: "Dune Messiah".into(),
            author: "Frank Herbert".into(),
            isbn: None,
            description: None,
            changed: vec![
                DetailField::Title,
                DetailField::Isbn,
                DetailField::Description,
            ],
        })),
        EventPayload::Delta(BookEvent::Removed(BookRemoved {
            book_id: book_id(),
            title: "Dune Messiah".into(),
            author: "Frank Herbert".into(),
        })),
        EventPayload::Fact(BookFactEvent {
            book_id: book_id(),
            title: "Dune Messiah".into(),
            author: "Frank Herbert".into(),
            isbn: None,
            price: price("0.01"),
            description: None,
            version: 9_007_199_254_740_993,
            removed: true,
        }),
    ];
    let codec = AvroCodec::new();
    let vectors = document["vectors"].as_array().unwrap();
    assert_eq!(vectors.len(), expected.len());
    let decode_hex = |text: &str| -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap())
            .collect()
    };
    for (vector, event) in vectors.iter().zip(expected) {
        let event_type = event.event_type();
        assert_eq!(vector["record"], event_type);
        let datum = decode_hex(vector["datum_hex"].as_str().unwrap());
        assert_eq!(
            codec.decode(event_type, &datum).unwrap(),
            event,
            "{event_type}"
        );
        assert_eq!(codec.encode(&event).unwrap(), datum, "{event_type}");
        let fingerprint = codec.fingerprint(event_type).unwrap();
        assert_eq!(
            decode_hex(vector["fingerprint_hex"].as_str().unwrap()),
            fingerprint.to_le_bytes(),
            "{event_type}"
        );
    }
}

/// Every published version, with the fingerprint it was published with. A published version
/// never changes (consumers decode with it), so its file must keep that fingerprint; a new
/// version is added here as it is published. Version 1 of each is what the service wrote
/// before the outbox recorded fingerprints (`writer_fingerprint` without one).
const PUBLISHED: [(&str, u64); 5] = [
    ("BookAdded/v1.avsc", 0xb0cd_b8c9_73ba_4f5f),
    ("BookPriceUpdated/v1.avsc", 0xd719_3e63_16e5_8a66),
    ("BookDetailsUpdated/v1.avsc", 0xc15c_b209_35d9_8a62),
    ("BookRemoved/v1.avsc", 0x8951_fbe4_2f74_7fa0),
    ("BookFactEvent/v1.avsc", 0x0a0d_018b_cfc9_94c3),
];

#[test]
fn published_versions_never_change() {
    let history = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/history");
    let mut files = BTreeSet::new();
    for record in std::fs::read_dir(&history).unwrap() {
        let record = record.unwrap();
        for version in std::fs::read_dir(record.path()).unwrap() {
            let version = version.unwrap();
            files.insert(format!(
                "{}/{}",
                record.file_name().to_string_lossy(),
                version.file_name().to_string_lossy()
            ));
        }
    }
    let listed: BTreeSet<String> = PUBLISHED
        .iter()
        .map(|(file, _)| (*file).to_owned())
        .collect();
    assert_eq!(
        files, listed,
        "schemas/history/ and PUBLISHED list different versions"
    );
    // What the decoder knows of them (single-object frames name their writer by fingerprint).
    let known: BTreeSet<u64> = bookstore::codec::contract::PUBLISHED_SCHEMAS
        .iter()
        .map(|json| schema_fingerprint(json).unwrap())
        .collect();
    let published: BTreeSet<u64> = PUBLISHED
        .iter()
        .map(|(_, fingerprint)| *fingerprint)
        .collect();
    assert_eq!(
        known, published,
        "contract::PUBLISHED_SCHEMAS must embed every file of schemas/history/"
    );
    for (file, published) in PUBLISHED {
        let json = std::fs::read_to_string(history.join(file)).unwrap();
        assert_eq!(
            schema_fingerprint(&json).unwrap(),
            published,
            "{file} changed after it was published"
        );
        let record = file.split('/').next().unwrap();
        if file.ends_with("/v1.avsc") {
            assert_eq!(
                bookstore::codec::contract::writer_fingerprint(record, None),
                Some(published),
                "{file}"
            );
        }
    }
}

/// Single-object frames name their writer schema by fingerprint alone, so a reader must know
/// every published version (docs/contracts.md). A record written with another version than
/// this build's is resolved to this build's schema, once the decoder knows that version.
#[test]
fn a_single_object_record_written_with_another_published_version_is_read() {
    let codec = AvroCodec::new();
    let contract = bookstore::codec::contract::contract("BookAdded").unwrap();
    let mut older: serde_json::Value = serde_json::from_str(contract.schema_json()).unwrap();
    older["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|field| field["name"] != "description");
    let older = older.to_string();
    let added = EventPayload::Delta(BookEvent::Added(BookAdded {
        book_id: BookId::generate(),
        title: "Dune".into(),
        author: "Frank Herbert".into(),
        isbn: None,
        price: Price::ZERO,
        description: None,
    }));
    // `description` is the last field, and its null one byte: without it, the older datum.
    let datum = codec.encode(&added).unwrap();
    let (null, written_before) = datum.split_last().unwrap();
    assert_eq!(*null, 0);
    let framed = frame_single_object(schema_fingerprint(&older).unwrap(), written_before);

    let unknown = FramedDecoder::new(AvroCodec::new()).decode(&framed);
    assert!(
        matches!(unknown, Err(CodecError::UnknownFingerprint(_))),
        "{unknown:?}"
    );
    let mut decoder = FramedDecoder::new(AvroCodec::new());
    assert_eq!(decoder.add_published_version(&older).unwrap(), "BookAdded");
    assert_eq!(decoder.decode(&framed).unwrap(), added);
    // This build's own records still read as before.
    let current = frame_single_object(contract.fingerprint(), &datum);
    assert_eq!(decoder.decode(&current).unwrap(), added);
}
