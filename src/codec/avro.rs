//! `AvroCodec`: the [`EventCodec`] of the contracts — an event to the Avro binary datum of its
//! record schema (no framing) and back.
//!
//! Values are built by hand as `apache_avro::types::Value`s in schema field order, because the
//! logical types need care that serde would hide: a price is `Value::Decimal` holding the
//! big-endian two's complement of `Price::cents()` (minimal length, as Java's
//! `BigInteger::toByteArray` writes it), a book id is `Value::Uuid` (written as hyphenated text).
//! Every value is validated against its schema before it is written.
//!
//! Decoding never panics and never trusts the input: a datum must fill its schema exactly
//! (trailing bytes are an error), every field must have the type the schema says, and prices
//! and ids are checked as the domain checks them.
//!
//! Two quirks of apache-avro 0.22 are worked around here, each covered by a test:
//! * its reader takes the end of the input in the middle of a string for `null`, and at the
//!   start of a union for the union's first branch (`null` in our optional fields), so a datum
//!   cut short before a trailing optional field would decode "successfully". `DatumInput`
//!   reports the end of the datum as an error of another kind, which the reader passes on;
//! * schema resolution refuses a `bytes` decimal whose byte length could not hold `precision`
//!   digits — for decimal(12, 2) every minimally encoded price under 2^39 cents (fewer than six
//!   bytes), i.e. nearly all of them — so before resolving we widen decimals to 16 bytes (same
//!   value, sign-extended).

use std::io::{self, Read};

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::{Decimal, Schema};

use super::contract::{self, Contract, EVENT_TYPES};
use super::{CodecError, EventCodec, bytes_excerpt, excerpt};
use crate::domain::{
    BookAdded, BookDetailsUpdated, BookEvent, BookFactEvent, BookId, BookPriceUpdated, BookRemoved,
    DetailField, EventPayload, Price,
};

/// Upper bound of one allocation while decoding (apache-avro allocates a string's declared
/// length before reading it). Far above any valid event — a Kafka message is at most 1 MiB by
/// default — so that a garbage length fails fast instead of reserving up to apache-avro's
/// default of 512 MiB. The setting is process-wide; this codec is the process's only Avro user.
pub const MAX_DECODE_ALLOCATION_BYTES: usize = 16 * 1024 * 1024;

/// The symbol `BookDetailField` readers see in place of a field added to the enum after their
/// schema version. It is never written.
pub const UNKNOWN_DETAIL_FIELD: &str = "UNKNOWN";

/// The Avro codec of the contracts in `schemas/`. Cheap to construct and to copy: the schemas
/// are parsed once per process and shared.
#[derive(Clone, Copy)]
pub struct AvroCodec {
    contracts: &'static [Contract],
}

impl Default for AvroCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for AvroCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.contracts).finish()
    }
}

impl AvroCodec {
    pub fn new() -> Self {
        apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION_BYTES);
        Self {
            contracts: contract::contracts(),
        }
    }

    /// Every event type, in the order of the contract files.
    pub fn event_types(&self) -> &'static [&'static str] {
        &EVENT_TYPES
    }

    /// Every contract, in the order of [`Self::event_types`].
    pub fn contracts(&self) -> &'static [Contract] {
        self.contracts
    }

    pub fn contract(&self, event_type: &str) -> Option<&'static Contract> {
        contract::contract(event_type)
    }

    /// The record schema of `event_type`.
    pub fn schema(&self, event_type: &str) -> Option<&'static Schema> {
        self.contract(event_type).map(Contract::schema)
    }

    /// The Parsing Canonical Form of `event_type`'s schema.
    pub fn canonical_form(&self, event_type: &str) -> Option<&'static str> {
        self.contract(event_type).map(Contract::canonical_form)
    }

    /// The CRC-64-AVRO fingerprint of `event_type`'s schema.
    pub fn fingerprint(&self, event_type: &str) -> Option<u64> {
        self.contract(event_type).map(Contract::fingerprint)
    }

    /// The event type whose schema has `fingerprint`.
    pub fn event_type_for_fingerprint(&self, fingerprint: u64) -> Option<&'static str> {
        contract::contract_for_fingerprint(fingerprint).map(Contract::event_type)
    }

    /// Appends the datum of `event` to `out`, so a caller framing many events can reuse one
    /// buffer.
    pub fn encode_into(&self, event: &EventPayload, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let event_type = event.event_type();
        let contract = self.known(event_type)?;
        let value = to_value(event)?;
        contract
            .writer
            .write_value_ref(out, &value)
            .map(|_| ())
            .map_err(|error| CodecError::Encode {
                event_type: event_type.to_owned(),
                reason: error.to_string(),
            })
    }

    /// Reads a datum written under `writer_schema` — an older or newer version of
    /// `event_type`'s schema, fetched from the registry — resolving it to our schema by the
    /// Avro rules (fields matched by name, defaults for fields the writer lacked).
    pub fn decode_with_writer_schema(
        &self,
        event_type: &str,
        writer_schema: &Schema,
        datum: &[u8],
    ) -> Result<EventPayload, CodecError> {
        let contract = self.known(event_type)?;
        let reader = GenericDatumReader::builder(writer_schema)
            .build()
            .map_err(|error| CodecError::WriterSchema(error.to_string()))?;
        let written = read_datum(contract, &reader, datum)?;
        let value = widen_decimals(written)
            .resolve(contract.schema())
            .map_err(|error| decode_error(contract, format!("cannot resolve: {error}")))?;
        from_value(contract.event_type(), value)
    }

    fn known(&self, event_type: &str) -> Result<&'static Contract, CodecError> {
        self.contract(event_type)
            .ok_or_else(|| CodecError::UnknownEventType(event_type.to_owned()))
    }
}

impl EventCodec for AvroCodec {
    fn encode(&self, event: &EventPayload) -> Result<Vec<u8>, CodecError> {
        let mut datum = Vec::with_capacity(128);
        self.encode_into(event, &mut datum)?;
        Ok(datum)
    }

    fn schema_fingerprint(&self, event_type: &str) -> Result<u64, CodecError> {
        self.known(event_type).map(Contract::fingerprint)
    }

    fn decode(&self, event_type: &str, datum: &[u8]) -> Result<EventPayload, CodecError> {
        let contract = self.known(event_type)?;
        if event_type == BookFactEvent::TYPE {
            return read_fact(contract, datum).map(EventPayload::Fact);
        }
        let value = read_datum(contract, &contract.reader, datum)?;
        from_value(contract.event_type(), value)
    }
}

/// Reads one value that must fill `datum` exactly.
fn read_datum(
    contract: &Contract,
    reader: &GenericDatumReader<'_>,
    datum: &[u8],
) -> Result<Value, CodecError> {
    read_whole(contract, datum, |input| reader.read_value(input))
}

/// Runs `read` on `datum`, which must consume it exactly.
fn read_whole<T>(
    contract: &Contract,
    datum: &[u8],
    read: impl FnOnce(&mut DatumInput<'_>) -> apache_avro::AvroResult<T>,
) -> Result<T, CodecError> {
    let mut input = DatumInput { rest: datum };
    let value = read(&mut input).map_err(|error| decode_error(contract, error.to_string()))?;
    if !input.rest.is_empty() {
        return Err(decode_error(
            contract,
            format!("{} bytes left after the record", input.rest.len()),
        ));
    }
    Ok(value)
}

/// Reads a fact written with our own schema; same guarantees as [`read_datum`] +
/// [`from_value`] (a test reads the same data, whole, cut short and corrupted, both ways).
///
/// Why by hand and not through apache-avro: the projection reads every fact on the topic
/// (several per book when a backlog is caught up), on the thread that polls the consumer. The
/// `Value` tree costs a `String` per field name and a box per union; apache-avro's serde
/// reader, used before this, still took 0.5 µs per fact on an idle core (field names matched
/// as text, every byte read through `io::Read`), 40 % of that thread's time in a catch-up. The
/// layout of one record of fixed schema is simple: zig-zag varints, length-prefixed bytes,
/// union branch indexes, and one byte per boolean. Facts written under another schema (found
/// through the registry) still go through apache-avro's schema resolution.
fn read_fact(contract: &Contract, datum: &[u8]) -> Result<BookFactEvent, CodecError> {
    let invalid = |reason: String| decode_error(contract, reason);
    let mut input = FactCursor { rest: datum };
    let book_id = input.string("book_id").map_err(invalid)?;
    // As apache-avro reads a `uuid` (and Java's and Python's readers): not through
    // `BookId::from_str`, which trims what people type.
    let book_id = uuid::Uuid::parse_str(book_id)
        .map(BookId::from)
        .map_err(|_| invalid(format!("book_id is not a UUID: {:?}", excerpt(book_id))))?;
    let title = input.string("title").map_err(invalid)?.to_owned();
    let author = input.string("author").map_err(invalid)?.to_owned();
    let isbn = input.optional_string("isbn").map_err(invalid)?;
    let price = input.bytes("price").map_err(invalid)?;
    let cents = from_twos_complement(price)
        .ok_or_else(|| invalid(format!("price is out of range: {}", bytes_excerpt(price))))?;
    let price = Price::from_cents(cents).map_err(|error| invalid(format!("price: {error}")))?;
    let description = input.optional_string("description").map_err(invalid)?;
    let version = input.long("version").map_err(invalid)?;
    let version =
        u64::try_from(version).map_err(|_| invalid(format!("version is negative: {version}")))?;
    let removed = input.boolean("removed").map_err(invalid)?;
    if !input.rest.is_empty() {
        return Err(invalid(format!(
            "{} bytes left after the record",
            input.rest.len()
        )));
    }
    Ok(BookFactEvent {
        book_id,
        title,
        author,
        isbn,
        price,
        description,
        version,
        removed,
    })
}

/// The unread rest of a `BookFactEvent` datum, read field by field in schema order (Avro's
/// binary encoding: <https://avro.apache.org/docs/1.12.0/specification/#binary-encoding>).
/// Errors are the reason, naming the field.
struct FactCursor<'a> {
    rest: &'a [u8],
}

impl<'a> FactCursor<'a> {
    fn take(&mut self, field: &str, len: usize) -> Result<&'a [u8], String> {
        if len > self.rest.len() {
            return Err(format!("the datum ends inside `{field}`"));
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    /// A `long`: zig-zag coded, 7 bits a byte, at most 10 bytes (as apache-avro reads it).
    fn long(&mut self, field: &str) -> Result<i64, String> {
        let mut unsigned = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = self.take(field, 1)?[0];
            unsigned |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(((unsigned >> 1) as i64) ^ -((unsigned & 1) as i64));
            }
        }
        Err(format!(
            "`{field}` has a variable-length integer over 10 bytes"
        ))
    }

    fn bytes(&mut self, field: &str) -> Result<&'a [u8], String> {
        let len = self.long(field)?;
        let len = usize::try_from(len).map_err(|_| format!("`{field}` has length {len}"))?;
        self.take(field, len)
    }

    fn string(&mut self, field: &str) -> Result<&'a str, String> {
        let bytes = self.bytes(field)?;
        std::str::from_utf8(bytes).map_err(|error| format!("`{field}` is not UTF-8: {error}"))
    }

    /// A `["null", "string"]` union: branch 0 is null, branch 1 a string.
    fn optional_string(&mut self, field: &str) -> Result<Option<String>, String> {
        match self.long(field)? {
            0 => Ok(None),
            1 => self.string(field).map(|text| Some(text.to_owned())),
            branch => Err(format!("`{field}` has no union branch {branch}")),
        }
    }

    fn boolean(&mut self, field: &str) -> Result<bool, String> {
        match self.take(field, 1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(format!("`{field}` is a boolean, found byte {byte:#04x}")),
        }
    }
}

/// The bytes of one datum, read so that running out of them is an error the Avro reader passes
/// on (`InvalidData`), never the `UnexpectedEof` it would turn into a `null`.
struct DatumInput<'a> {
    rest: &'a [u8],
}

impl Read for DatumInput<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.rest.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the datum ends before the record does",
            ));
        }
        let n = buf.len().min(self.rest.len());
        let (read, rest) = self.rest.split_at(n);
        buf[..n].copy_from_slice(read);
        self.rest = rest;
        Ok(n)
    }
}

/// Bytes a decimal is widened to before resolution: enough for 38 digits.
const RESOLVABLE_DECIMAL_BYTES: usize = 16;

/// `value` with every decimal sign-extended to [`RESOLVABLE_DECIMAL_BYTES`] (see the module
/// header for why).
fn widen_decimals(value: Value) -> Value {
    match value {
        Value::Decimal(decimal) => match Vec::<u8>::try_from(&decimal) {
            Ok(bytes) if bytes.len() < RESOLVABLE_DECIMAL_BYTES => {
                let sign = if bytes.first().is_some_and(|byte| byte & 0x80 != 0) {
                    0xFF
                } else {
                    0x00
                };
                let mut wide = vec![sign; RESOLVABLE_DECIMAL_BYTES - bytes.len()];
                wide.extend_from_slice(&bytes);
                Value::Decimal(Decimal::from(wide))
            }
            _ => Value::Decimal(decimal),
        },
        Value::Record(fields) => Value::Record(
            fields
                .into_iter()
                .map(|(name, value)| (name, widen_decimals(value)))
                .collect(),
        ),
        Value::Union(branch, inner) => Value::Union(branch, Box::new(widen_decimals(*inner))),
        Value::Array(items) => Value::Array(items.into_iter().map(widen_decimals).collect()),
        Value::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(key, value)| (key, widen_decimals(value)))
                .collect(),
        ),
        other => other,
    }
}

fn decode_error(contract: &Contract, reason: String) -> CodecError {
    CodecError::Decode {
        event_type: contract.event_type().to_owned(),
        reason,
    }
}

/// The Avro value of `event`: a record with exactly the fields of its schema, in schema order.
pub fn to_value(event: &EventPayload) -> Result<Value, CodecError> {
    let fields = match event {
        EventPayload::Delta(BookEvent::Added(added)) => vec![
            field("book_id", uuid(added.book_id)),
            field("title", string(&added.title)),
            field("author", string(&added.author)),
            field("isbn", optional_string(added.isbn.as_deref())),
            field("price", price(added.price)),
            field("description", optional_string(added.description.as_deref())),
        ],
        EventPayload::Delta(BookEvent::PriceUpdated(update)) => vec![
            field("book_id", uuid(update.book_id)),
            field("old_price", price(update.old_price)),
            field("new_price", price(update.new_price)),
        ],
        EventPayload::Delta(BookEvent::DetailsUpdated(update)) => vec![
            field("book_id", uuid(update.book_id)),
            field("title", string(&update.title)),
            field("author", string(&update.author)),
            field("isbn", optional_string(update.isbn.as_deref())),
            field(
                "description",
                optional_string(update.description.as_deref()),
            ),
            field("changed", detail_fields(&update.changed)),
        ],
        EventPayload::Delta(BookEvent::Removed(removed)) => vec![
            field("book_id", uuid(removed.book_id)),
            field("title", string(&removed.title)),
            field("author", string(&removed.author)),
        ],
        EventPayload::Fact(fact) => vec![
            field("book_id", uuid(fact.book_id)),
            field("title", string(&fact.title)),
            field("author", string(&fact.author)),
            field("isbn", optional_string(fact.isbn.as_deref())),
            field("price", price(fact.price)),
            field("description", optional_string(fact.description.as_deref())),
            field("version", version(fact.version)?),
            field("removed", Value::Boolean(fact.removed)),
        ],
    };
    Ok(Value::Record(fields))
}

/// The event a record value of `event_type` states. Fails, never panics, on any value that is
/// not what the schema and the domain promise.
pub fn from_value(event_type: &str, value: Value) -> Result<EventPayload, CodecError> {
    let mut record = Record::new(event_type, value)?;
    let payload = match event_type {
        BookAdded::TYPE => EventPayload::Delta(BookEvent::Added(BookAdded {
            book_id: record.book_id("book_id")?,
            title: record.string("title")?,
            author: record.string("author")?,
            isbn: record.optional_string("isbn")?,
            price: record.price("price")?,
            description: record.optional_string("description")?,
        })),
        BookPriceUpdated::TYPE => EventPayload::Delta(BookEvent::PriceUpdated(BookPriceUpdated {
            book_id: record.book_id("book_id")?,
            old_price: record.price("old_price")?,
            new_price: record.price("new_price")?,
        })),
        BookDetailsUpdated::TYPE => {
            EventPayload::Delta(BookEvent::DetailsUpdated(BookDetailsUpdated {
                book_id: record.book_id("book_id")?,
                title: record.string("title")?,
                author: record.string("author")?,
                isbn: record.optional_string("isbn")?,
                description: record.optional_string("description")?,
                changed: record.detail_fields("changed")?,
            }))
        }
        BookRemoved::TYPE => EventPayload::Delta(BookEvent::Removed(BookRemoved {
            book_id: record.book_id("book_id")?,
            title: record.string("title")?,
            author: record.string("author")?,
        })),
        BookFactEvent::TYPE => EventPayload::Fact(BookFactEvent {
            book_id: record.book_id("book_id")?,
            title: record.string("title")?,
            author: record.string("author")?,
            isbn: record.optional_string("isbn")?,
            price: record.price("price")?,
            description: record.optional_string("description")?,
            version: record.version("version")?,
            removed: record.boolean("removed")?,
        }),
        other => return Err(CodecError::UnknownEventType(other.to_owned())),
    };
    Ok(payload)
}

/// The symbol of `field` in the `BookDetailField` enum.
pub fn detail_field_symbol(field: DetailField) -> &'static str {
    match field {
        DetailField::Title => "TITLE",
        DetailField::Author => "AUTHOR",
        DetailField::Isbn => "ISBN",
        DetailField::Description => "DESCRIPTION",
    }
}

fn field(name: &str, value: Value) -> (String, Value) {
    (name.to_owned(), value)
}

fn uuid(book_id: BookId) -> Value {
    Value::Uuid(book_id.as_uuid())
}

fn string(text: &str) -> Value {
    Value::String(text.to_owned())
}

/// `["null", "string"]`: branch 0 is null, branch 1 the text.
fn optional_string(text: Option<&str>) -> Value {
    match text {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(text) => Value::Union(1, Box::new(string(text))),
    }
}

fn price(price: Price) -> Value {
    Value::Decimal(Decimal::from(twos_complement(price.cents())))
}

fn version(version: u64) -> Result<Value, CodecError> {
    i64::try_from(version)
        .map(Value::Long)
        .map_err(|_| CodecError::Encode {
            event_type: BookFactEvent::TYPE.to_owned(),
            reason: format!("version {version} does not fit an Avro long"),
        })
}

fn detail_fields(fields: &[DetailField]) -> Value {
    Value::Array(
        fields
            .iter()
            .map(|field| Value::String(detail_field_symbol(*field).to_owned()))
            .collect(),
    )
}

/// The shortest big-endian two's complement of `value` (at least one byte), as Java's
/// `BigInteger::toByteArray` and the Avro decimal logical type have it.
pub fn twos_complement(value: i64) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let redundant = bytes
        .windows(2)
        .take_while(|pair| {
            (pair[0] == 0x00 && pair[1] & 0x80 == 0) || (pair[0] == 0xFF && pair[1] & 0x80 != 0)
        })
        .count();
    bytes[redundant..].to_vec()
}

/// The value of big-endian two's complement bytes of any length, if it fits an `i64`.
pub fn from_twos_complement(bytes: &[u8]) -> Option<i64> {
    let (&first, _) = bytes.split_first()?;
    let sign = if first & 0x80 == 0 { 0x00 } else { 0xFF };
    let significant = bytes
        .iter()
        .position(|&byte| byte != sign)
        .map_or(&bytes[bytes.len() - 1..], |start| &bytes[start..]);
    // Keep one sign byte if the first significant byte would read with the wrong sign.
    let needs_sign_byte = (significant[0] & 0x80 != 0) != (sign == 0xFF);
    if significant.len() + usize::from(needs_sign_byte) > 8 {
        return None;
    }
    let mut buffer = [sign; 8];
    buffer[8 - significant.len()..].copy_from_slice(significant);
    Some(i64::from_be_bytes(buffer))
}

/// The fields of a decoded record, taken out one by one by name.
struct Record<'a> {
    event_type: &'a str,
    fields: Vec<(String, Value)>,
}

impl<'a> Record<'a> {
    fn new(event_type: &'a str, value: Value) -> Result<Self, CodecError> {
        match value {
            Value::Record(fields) => Ok(Self { event_type, fields }),
            other => Err(Self::error_for(
                event_type,
                format!("expected a record, got {other:?}"),
            )),
        }
    }

    fn take(&mut self, name: &str) -> Result<Value, CodecError> {
        self.fields
            .iter_mut()
            .find(|(field, _)| field == name)
            .map(|(_, value)| std::mem::replace(value, Value::Null))
            .ok_or_else(|| self.error(format!("field {name} is missing")))
    }

    fn book_id(&mut self, name: &str) -> Result<BookId, CodecError> {
        match self.take(name)? {
            Value::Uuid(uuid) => Ok(BookId::new(uuid)),
            Value::String(text) => text
                .parse()
                .map_err(|_| self.error(format!("{name} is not a UUID: {:?}", excerpt(&text)))),
            other => Err(self.unexpected(name, "a UUID", &other)),
        }
    }

    fn string(&mut self, name: &str) -> Result<String, CodecError> {
        match self.take(name)? {
            Value::String(text) => Ok(text),
            other => Err(self.unexpected(name, "a string", &other)),
        }
    }

    fn optional_string(&mut self, name: &str) -> Result<Option<String>, CodecError> {
        match self.take(name)? {
            Value::Union(0, inner) if matches!(*inner, Value::Null) => Ok(None),
            Value::Union(1, inner) => match *inner {
                Value::String(text) => Ok(Some(text)),
                other => Err(self.unexpected(name, "a string", &other)),
            },
            other => Err(self.unexpected(name, "null or a string", &other)),
        }
    }

    fn price(&mut self, name: &str) -> Result<Price, CodecError> {
        let bytes = match self.take(name)? {
            Value::Decimal(decimal) => Vec::<u8>::try_from(&decimal)
                .map_err(|error| self.error(format!("{name}: {error}")))?,
            Value::Bytes(bytes) => bytes,
            other => return Err(self.unexpected(name, "a decimal", &other)),
        };
        let cents = from_twos_complement(&bytes).ok_or_else(|| {
            self.error(format!("{name} is out of range: {}", bytes_excerpt(&bytes)))
        })?;
        Price::from_cents(cents).map_err(|error| self.error(format!("{name}: {error}")))
    }

    fn version(&mut self, name: &str) -> Result<u64, CodecError> {
        match self.take(name)? {
            Value::Long(version) => u64::try_from(version)
                .map_err(|_| self.error(format!("{name} is negative: {version}"))),
            other => Err(self.unexpected(name, "a long", &other)),
        }
    }

    fn boolean(&mut self, name: &str) -> Result<bool, CodecError> {
        match self.take(name)? {
            Value::Boolean(flag) => Ok(flag),
            other => Err(self.unexpected(name, "a boolean", &other)),
        }
    }

    /// The changed fields. A symbol this version does not know (`UNKNOWN`, what resolution
    /// gives for a field added to the enum later) is left out: the event's values are still
    /// right, only that one change is not named.
    fn detail_fields(&mut self, name: &str) -> Result<Vec<DetailField>, CodecError> {
        let items = match self.take(name)? {
            Value::Array(items) => items,
            other => return Err(self.unexpected(name, "an array", &other)),
        };
        let mut fields = Vec::with_capacity(items.len());
        for item in items {
            let symbol = match item {
                Value::Enum(_, symbol) | Value::String(symbol) => symbol,
                other => return Err(self.unexpected(name, "an enum symbol", &other)),
            };
            let known = DetailField::ALL
                .into_iter()
                .find(|field| detail_field_symbol(*field) == symbol);
            match known {
                Some(field) => fields.push(field),
                None if symbol == UNKNOWN_DETAIL_FIELD => {}
                None => {
                    return Err(self.error(format!(
                        "{name} has an unknown symbol {:?}",
                        excerpt(&symbol)
                    )));
                }
            }
        }
        Ok(fields)
    }

    fn unexpected(&self, name: &str, expected: &str, found: &Value) -> CodecError {
        self.error(format!(
            "{name} must be {expected}, found {}",
            excerpt(&format!("{found:?}"))
        ))
    }

    fn error(&self, reason: String) -> CodecError {
        Self::error_for(self.event_type, reason)
    }

    fn error_for(event_type: &str, reason: String) -> CodecError {
        CodecError::Decode {
            event_type: event_type.to_owned(),
            reason,
        }
    }
}

/// Whether a `BookFactEvent` datum (as stored, unframed) describes a removed book, without
/// decoding it.
///
/// Why by hand: the relay must know it for every fact it publishes (a removal is followed by a
/// tombstone), and decoding the whole datum through apache-avro's `Value` for one boolean
/// was 7 % of the relay's CPU. In the contract `removed` is the record's last field and a
/// boolean, which Avro writes as one byte, 0 or 1: so it is the datum's last byte. The test
/// `removed_is_the_last_field_of_the_fact_contract` fails if the contract ever changes that.
pub fn fact_is_removal(datum: &[u8]) -> Result<bool, CodecError> {
    match datum.last() {
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        last => Err(CodecError::Decode {
            event_type: BookFactEvent::TYPE.to_owned(),
            reason: format!("the last byte (`removed`) must be 0 or 1, found {last:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_is_the_last_field_of_the_fact_contract() {
        let contract = super::super::contract::contract(BookFactEvent::TYPE).unwrap();
        let Schema::Record(record) = contract.schema() else {
            panic!("BookFactEvent is a record");
        };
        let last = record.fields.last().unwrap();
        assert_eq!(last.name, "removed");
        assert_eq!(last.schema, Schema::Boolean);
    }

    #[test]
    fn a_fact_datum_tells_its_removal_by_its_last_byte() {
        let codec = AvroCodec::new();
        for removed in [false, true] {
            let fact = BookFactEvent {
                book_id: BookId::generate(),
                title: "Dune".into(),
                author: "Frank Herbert".into(),
                isbn: None,
                price: "9.99".parse().unwrap(),
                description: Some("desert".into()),
                version: 7,
                removed,
            };
            let datum = codec.encode(&EventPayload::Fact(fact)).unwrap();
            assert_eq!(fact_is_removal(&datum).unwrap(), removed);
        }
        assert!(fact_is_removal(&[]).is_err());
        assert!(fact_is_removal(&[0x02]).is_err());
    }

    /// Both ways of reading a fact: by hand straight from the datum (what `decode` does) and
    /// the `Value` tree every other event goes through.
    fn read_fact_both_ways(
        datum: &[u8],
    ) -> (
        Result<BookFactEvent, CodecError>,
        Result<EventPayload, CodecError>,
    ) {
        let contract = super::super::contract::contract(BookFactEvent::TYPE).unwrap();
        let direct = read_fact(contract, datum);
        let through_value = read_datum(contract, &contract.reader, datum)
            .and_then(|value| from_value(BookFactEvent::TYPE, value));
        (direct, through_value)
    }

    #[test]
    fn a_fact_reads_the_same_by_hand_as_through_a_value_tree() {
        let codec = AvroCodec::new();
        let facts = [
            BookFactEvent {
                book_id: BookId::generate(),
                title: "Dune".into(),
                author: "Frank Herbert".into(),
                isbn: Some("9780441172719".into()),
                price: "15.99".parse().unwrap(),
                description: Some("déserts, épices ☀".into()),
                version: 1,
                removed: false,
            },
            BookFactEvent {
                book_id: BookId::generate(),
                title: "t".repeat(200),
                author: "a".into(),
                isbn: None,
                price: "0".parse().unwrap(),
                description: None,
                version: u64::try_from(i64::MAX).unwrap(),
                removed: true,
            },
        ];
        for fact in facts {
            let datum = codec.encode(&EventPayload::Fact(fact.clone())).unwrap();
            let (direct, through_value) = read_fact_both_ways(&datum);
            assert_eq!(direct.unwrap(), fact);
            assert_eq!(
                codec.decode(BookFactEvent::TYPE, &datum).unwrap(),
                EventPayload::Fact(fact.clone())
            );
            assert_eq!(through_value.unwrap(), EventPayload::Fact(fact));
            // Cut short anywhere, or with a byte too many: an error both ways, never a fact.
            for end in 0..datum.len() {
                let (direct, through_value) = read_fact_both_ways(&datum[..end]);
                assert!(direct.is_err(), "cut at {end} read as {direct:?}");
                assert!(through_value.is_err(), "cut at {end}");
            }
            let mut longer = datum.clone();
            longer.push(0);
            let (direct, through_value) = read_fact_both_ways(&longer);
            assert!(direct.is_err() && through_value.is_err());
            // Every single corrupted byte: the same verdict both ways.
            for at in 0..datum.len() {
                for flip in [0x01, 0x80, 0xFF] {
                    let mut corrupt = datum.clone();
                    corrupt[at] ^= flip;
                    let (direct, through_value) = read_fact_both_ways(&corrupt);
                    match (direct, through_value) {
                        (Ok(direct), Ok(through_value)) => {
                            assert_eq!(EventPayload::Fact(direct), through_value, "byte {at}");
                        }
                        (Err(_), Err(_)) => {}
                        (direct, through_value) => panic!(
                            "byte {at} ^ {flip:#x}: by hand {direct:?}, value tree {through_value:?}"
                        ),
                    }
                }
            }
        }
    }

    /// Other spellings of a UUID in `book_id`: the same verdict both ways (a padded one was read
    /// by hand, where apache-avro, Java and Python refuse it).
    #[test]
    fn a_fact_s_book_id_is_read_as_strictly_by_hand_as_through_a_value_tree() {
        let codec = AvroCodec::new();
        let fact = BookFactEvent {
            book_id: BookId::generate(),
            title: "Dune".into(),
            author: "Frank Herbert".into(),
            isbn: None,
            price: "15.99".parse().unwrap(),
            description: None,
            version: 3,
            removed: false,
        };
        let datum = codec.encode(&EventPayload::Fact(fact.clone())).unwrap();
        let id = fact.book_id.to_string();
        // The datum starts with the id: its length (zig-zag, one byte), then its 36 bytes.
        assert_eq!(datum[0], 72);
        let rest = &datum[37..];
        for spelling in [
            format!(" {id}"),
            format!("{id}\n"),
            format!("{id}\u{3000}"),
            id.to_uppercase(),
            id.replace('-', ""),
            format!("{{{id}}}"),
        ] {
            let mut respelled = vec![u8::try_from(spelling.len() * 2).unwrap()];
            respelled.extend_from_slice(spelling.as_bytes());
            respelled.extend_from_slice(rest);
            match read_fact_both_ways(&respelled) {
                (Ok(direct), Ok(through_value)) => {
                    assert_eq!(EventPayload::Fact(direct), through_value, "{spelling:?}");
                }
                (Err(_), Err(_)) => {}
                (direct, through_value) => {
                    panic!("{spelling:?}: by hand {direct:?}, value tree {through_value:?}")
                }
            }
        }
    }

    #[test]
    fn twos_complement_is_minimal_like_java_big_integer() {
        assert_eq!(twos_complement(0), [0x00]);
        assert_eq!(twos_complement(1), [0x01]);
        assert_eq!(twos_complement(127), [0x7F]);
        assert_eq!(twos_complement(128), [0x00, 0x80]);
        assert_eq!(twos_complement(1299), [0x05, 0x13]);
        assert_eq!(twos_complement(-1), [0xFF]);
        assert_eq!(twos_complement(-128), [0x80]);
        assert_eq!(twos_complement(-129), [0xFF, 0x7F]);
        assert_eq!(
            twos_complement(999_999_999_999),
            [0x00, 0xE8, 0xD4, 0xA5, 0x0F, 0xFF]
        );
    }

    #[test]
    fn twos_complement_reads_back_at_any_length() {
        for value in [
            0,
            1,
            127,
            128,
            1299,
            -1,
            -128,
            -129,
            999_999_999_999,
            i64::MAX,
            i64::MIN,
        ] {
            assert_eq!(from_twos_complement(&twos_complement(value)), Some(value));
        }
        // Padded with sign bytes, as some writers do.
        assert_eq!(from_twos_complement(&[0x00, 0x00, 0x05, 0x13]), Some(1299));
        assert_eq!(from_twos_complement(&[0xFF; 12]), Some(-1));
        assert_eq!(from_twos_complement(&[0; 12]), Some(0));
        assert_eq!(
            from_twos_complement(&[0x00, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            None
        );
        assert_eq!(from_twos_complement(&[]), None);
    }

    #[test]
    fn unknown_detail_field_symbols_are_left_out() {
        let value = Value::Array(vec![
            Value::Enum(0, UNKNOWN_DETAIL_FIELD.into()),
            Value::Enum(1, "TITLE".into()),
        ]);
        let mut record = Record {
            event_type: BookDetailsUpdated::TYPE,
            fields: vec![("changed".into(), value)],
        };
        assert_eq!(
            record.detail_fields("changed").unwrap(),
            [DetailField::Title]
        );
    }
}
