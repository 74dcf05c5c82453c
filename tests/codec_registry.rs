//! The contracts against a real Confluent-compatible schema registry (Apicurio Registry's
//! `ccompat` API in development and CI), named by `SCHEMA_REGISTRY_URL`. Without it these tests
//! FAIL — never skip — and say how to start one.
//!
//! Every test registers under its own topic names, so runs never share subjects.

mod common;

use bookstore::codec::fingerprint::{parsing_canonical_form, schema_fingerprint};
use bookstore::codec::registry::{
    CONTRACT_COMPATIBILITY, Compatibility, SCHEMA_REGISTRY_URL_ENV, subject_for,
};
use bookstore::codec::{
    AvroCodec, CodecError, EVENT_TYPES, EventCodec, FramedDecoder, RegistryClient, RegistryError,
    WireFormat, frame_confluent,
};
use bookstore::domain::{BookFactEvent, BookId, EventPayload, Price};
use uuid::Uuid;

fn registry() -> RegistryClient {
    match RegistryClient::from_env() {
        Ok(client) => client,
        Err(RegistryError::NotConfigured) => panic!(
            "no schema registry for the tests: start one with \
             `deploy/schema-registry/registry.sh start` and set \
             {SCHEMA_REGISTRY_URL_ENV}=http://127.0.0.1:8081/apis/ccompat/v7"
        ),
        Err(error) => panic!("{error}"),
    }
}

/// Topic names no other test uses.
fn topics() -> (String, String) {
    let prefix = format!("codec-test-{}", Uuid::new_v4().simple());
    (format!("{prefix}.book"), format!("{prefix}.book-fact"))
}

fn fact() -> EventPayload {
    EventPayload::Fact(BookFactEvent {
        book_id: BookId::generate(),
        title: "Der Zauberberg".into(),
        author: "Thomas Mann".into(),
        isbn: None,
        price: Price::from_cents(2_450).unwrap(),
        description: Some("Sanatorium in Davos.".into()),
        version: 2,
        removed: false,
    })
}

#[test]
fn registering_all_schemas_returns_one_id_per_event_type_and_again_the_same_ids() {
    let client = registry();
    let codec = AvroCodec::new();
    let (delta_topic, fact_topic) = topics();

    let first = client
        .register_all(&codec, &delta_topic, &fact_topic)
        .unwrap();
    assert_eq!(first.len(), EVENT_TYPES.len());
    for event_type in EVENT_TYPES {
        let id = first.id(event_type).expect("every event type has an id");
        assert_eq!(first.event_type(id), Some(event_type), "ids are distinct");
    }

    let second = client
        .register_all(&codec, &delta_topic, &fact_topic)
        .unwrap();
    assert_eq!(second, first);
}

#[test]
fn a_fetched_schema_is_equivalent_to_the_registered_one() {
    let client = registry();
    let codec = AvroCodec::new();
    let (delta_topic, fact_topic) = topics();
    let registered = client
        .register_all(&codec, &delta_topic, &fact_topic)
        .unwrap();
    for contract in codec.contracts() {
        let id = registered.id(contract.event_type()).unwrap();
        let fetched = client.fetch_schema(id).unwrap();
        assert_eq!(
            parsing_canonical_form(&fetched).unwrap(),
            contract.canonical_form(),
            "{}",
            contract.event_type()
        );
    }
}

#[test]
fn subjects_are_per_record_on_the_delta_topic_and_per_topic_on_the_fact_topic() {
    let client = registry();
    let codec = AvroCodec::new();
    let (delta_topic, fact_topic) = topics();
    let registered = client
        .register_all(&codec, &delta_topic, &fact_topic)
        .unwrap();
    for contract in codec.contracts() {
        let subject = subject_for(contract.event_type(), &delta_topic, &fact_topic);
        // Registering under the documented subject is idempotent, so it must hit the same id.
        let id = client.register(&subject, contract.schema_json()).unwrap();
        assert_eq!(Some(id), registered.id(contract.event_type()), "{subject}");
    }
    assert_eq!(
        subject_for("BookAdded", &delta_topic, &fact_topic),
        format!("{delta_topic}-bookstore.events.BookAdded")
    );
    assert_eq!(
        subject_for("BookFactEvent", &delta_topic, &fact_topic),
        format!("{fact_topic}-value")
    );
}

#[test]
fn confluent_frames_round_trip_and_unknown_ids_are_learned_from_the_registry() {
    let client = registry();
    let codec = AvroCodec::new();
    let (delta_topic, fact_topic) = topics();
    let registered = client
        .register_all(&codec, &delta_topic, &fact_topic)
        .unwrap();

    let event = fact();
    let datum = codec.encode(&event).unwrap();
    let wire = WireFormat::Confluent {
        schemas: registered.clone(),
    };
    let framed = wire.frame(event.event_type(), &datum).unwrap();
    let id = registered.id(event.event_type()).unwrap();
    assert_eq!(framed, frame_confluent(id, &datum));
    assert_eq!(
        FramedDecoder::with_registered(codec, &registered)
            .decode(&framed)
            .unwrap(),
        event
    );

    // A consumer that started without the ids learns them the way it would at run time.
    let mut decoder = FramedDecoder::new(codec);
    let CodecError::UnknownSchemaId(unknown) = decoder.decode(&framed).unwrap_err() else {
        panic!("an id the decoder was not told about is unknown");
    };
    let schema = client.fetch_schema(unknown).unwrap();
    assert_eq!(
        decoder.add_writer_schema(unknown, &schema).unwrap(),
        BookFactEvent::TYPE
    );
    assert_eq!(decoder.decode(&framed).unwrap(), event);
}

/// How the relay finds the id of the schema another version wrote an event with: among the
/// versions of its subject, by fingerprint.
#[test]
fn another_versions_schema_is_found_among_the_subjects_versions_by_its_fingerprint() {
    let client = registry();
    let (delta_topic, fact_topic) = topics();
    let subject = subject_for("BookAdded", &delta_topic, &fact_topic);
    let missing: u64 = 0x0123_4567_89ab_cdef;
    assert_eq!(client.find_by_fingerprint(&subject, missing).unwrap(), None);

    // The older version registered its schema first, as its relay would have at start.
    let older = common::book_added_without_description();
    let older_id = client.register(&subject, &older).unwrap();
    let current_id = client
        .register_all(&AvroCodec::new(), &delta_topic, &fact_topic)
        .unwrap()
        .id("BookAdded")
        .unwrap();
    assert_ne!(older_id, current_id);

    let older_fingerprint = schema_fingerprint(&older).unwrap();
    let current_fingerprint = bookstore::codec::contract::contract("BookAdded")
        .unwrap()
        .fingerprint();
    assert_eq!(
        client
            .find_by_fingerprint(&subject, older_fingerprint)
            .unwrap(),
        Some(older_id)
    );
    assert_eq!(
        client
            .find_by_fingerprint(&subject, current_fingerprint)
            .unwrap(),
        Some(current_id)
    );
    assert_eq!(client.find_by_fingerprint(&subject, missing).unwrap(), None);
}

#[test]
fn an_incompatible_schema_is_refused_and_not_worth_retrying() {
    let client = registry();
    let (_, fact_topic) = topics();
    let subject = format!("{fact_topic}-value");
    let codec = AvroCodec::new();
    let fact_schema = codec.contract(BookFactEvent::TYPE).unwrap().schema_json();
    client.register(&subject, fact_schema).unwrap();
    client
        .set_compatibility(&subject, Compatibility::Backward)
        .unwrap();

    // A new required field without a default breaks BACKWARD compatibility.
    let mut incompatible: serde_json::Value = serde_json::from_str(fact_schema).unwrap();
    incompatible["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "publisher", "type": "string"}));
    let error = client
        .register(&subject, &incompatible.to_string())
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::Status { status: 409, .. }),
        "expected 409 Conflict, got {error}"
    );
    assert!(!error.is_retryable());
}

/// The contract's level refuses what BACKWARD alone lets through: a removed required field,
/// which every consumer still on the old schema would fail to read. An optional field added
/// with a default passes.
#[test]
fn the_contracts_compatibility_refuses_removing_a_required_field() {
    let client = registry();
    let (_, fact_topic) = topics();
    let subject = format!("{fact_topic}-value");
    let fact_schema = AvroCodec::new()
        .contract(BookFactEvent::TYPE)
        .unwrap()
        .schema_json();
    client.register(&subject, fact_schema).unwrap();
    client
        .set_compatibility(&subject, CONTRACT_COMPATIBILITY)
        .unwrap();
    let fields = |schema: &serde_json::Value| -> Vec<serde_json::Value> {
        schema["fields"].as_array().unwrap().clone()
    };

    let mut without_author: serde_json::Value = serde_json::from_str(fact_schema).unwrap();
    let kept: Vec<_> = fields(&without_author)
        .into_iter()
        .filter(|field| field["name"] != "author")
        .collect();
    without_author["fields"] = serde_json::Value::Array(kept);
    let error = client
        .register(&subject, &without_author.to_string())
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::Status { status: 409, .. }),
        "expected 409 Conflict, got {error}"
    );

    let mut with_publisher: serde_json::Value = serde_json::from_str(fact_schema).unwrap();
    let mut extended = fields(&with_publisher);
    extended.insert(
        extended.len() - 1,
        serde_json::json!({"name": "publisher", "type": ["null", "string"], "default": null}),
    );
    with_publisher["fields"] = serde_json::Value::Array(extended);
    client
        .register(&subject, &with_publisher.to_string())
        .unwrap();
}

#[test]
fn an_unknown_id_is_a_404_status_error() {
    let error = registry().fetch_schema(u32::MAX - 7).unwrap_err();
    assert!(
        matches!(error, RegistryError::Status { status: 404, .. }),
        "expected 404, got {error}"
    );
}

#[test]
fn an_unreachable_registry_is_retryable() {
    // Port 9 (discard) on loopback: nothing listens there.
    let client = RegistryClient::new("http://127.0.0.1:9").unwrap();
    let error = client.fetch_schema(1).unwrap_err();
    assert!(
        matches!(error, RegistryError::Unreachable { .. }),
        "{error}"
    );
    assert!(error.is_retryable());
}

/// A producer registers a schema and sends a record framed with it at once; a registry replica
/// behind the one it registered with answers 404 for a while. The projection asks again for a
/// while (its batch held back) rather than dead-letter the record, and every later one of that
/// schema, for good; after its patience it dead-letters them.
#[tokio::test]
async fn a_schema_id_the_registry_does_not_know_is_asked_for_again_before_dead_lettering() {
    use bookstore::projection::FactReader;
    use bookstore::projection::fact::FactOutcome;
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedMessage;
    use std::time::Duration;

    const UNKNOWN: u32 = u32::MAX - 11;
    let book_id = BookId::generate();
    let datum = AvroCodec::new().encode(&fact()).unwrap();
    let framed_with = |id: u32| {
        OwnedMessage::new(
            Some(frame_confluent(id, &datum)),
            Some(book_id.to_string().into_bytes()),
            "t.book-fact".into(),
            Timestamp::NotAvailable,
            0,
            7,
            None,
        )
    };
    let message = framed_with(UNKNOWN);
    // Long enough for the two asks below on a loaded machine (each a registry round trip).
    let patience = Duration::from_secs(3);
    let mut reader = FactReader::new(Some(registry())).with_missing_schema_patience(patience);

    for _ in 0..2 {
        let Err(error) = reader.read(&message).await else {
            panic!("dead-lettered before its patience");
        };
        assert!(
            matches!(error, RegistryError::NotYetKnown { id: UNKNOWN, .. }),
            "{error}"
        );
        assert!(error.is_retryable(), "{error}");
    }
    tokio::time::sleep(patience).await;
    let Ok(FactOutcome::DeadLetter(rejection)) = reader.read(&message).await else {
        panic!("not dead-lettered after the patience");
    };
    let reason = rejection.to_string();
    assert!(reason.contains("not in the registry after"), "{reason}");
    // Remembered: the next record of that schema is dead-lettered at once.
    assert!(matches!(
        reader.read(&message).await,
        Ok(FactOutcome::DeadLetter(_))
    ));
    // Each id has a patience of its own: another one, registered meanwhile on a replica that
    // lags, is asked for again too (the projector reads a whole batch before it holds it
    // back, so the clocks of a batch's unknown ids run together).
    assert!(matches!(
        reader.read(&framed_with(UNKNOWN - 1)).await,
        Err(RegistryError::NotYetKnown { .. })
    ));
}
