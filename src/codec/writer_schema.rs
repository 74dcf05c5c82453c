//! The checks a writer schema from the registry passes before anything is decoded with it.
//!
//! A registry hands back whatever was registered under an id, and apache-avro 0.22 trusts the
//! schema it decodes with in two ways that a record can turn into a crash of the whole
//! process, not an error:
//! * it decodes recursively, one stack frame per level of nesting, with no bound: under a
//!   recursive schema (a record holding a union of `null` and itself) a record of a few
//!   hundred kilobytes nests deep enough to overflow the thread's stack, which aborts;
//! * it allocates a `fixed` value's declared size before reading it (`vec![0; size]`), without
//!   the allocation limit it applies to strings and arrays, so a `fixed` of 2^60 bytes aborts on
//!   the allocation;
//! * it bounds each array's reservation on its own, not their total: under an array whose
//!   items take no bytes (`null`, a `fixed` of size 0, a record of nothing but such fields,
//!   also when named again by reference), a block count of a few bytes reserves the whole
//!   limit, so a record of a few hundred kilobytes holding many such arrays (nested in another
//!   array, say) asks for terabytes and aborts.
//!
//! None of our contracts recurses, holds a `fixed` or an array, and neither a version of them
//! nor another producer's event needs to, so such a schema is refused up front and every
//! record written under it is a bad record (the projection dead-letters it). apache-avro has no
//! option for any of them, which is why this walk is written here.

use std::collections::{BTreeSet, HashSet};

use apache_avro::Schema;
use apache_avro::schema::SchemaKind;
use apache_avro::schema::{FixedSchema, InnerDecimalSchema, UuidSchema};

use super::avro::MAX_DECODE_ALLOCATION_BYTES;

/// Why a writer schema is refused.
pub fn refusal(schema: &Schema) -> Option<String> {
    Walk::default().schema(schema).err()
}

/// Why a writer schema of one of our records would be read with another meaning than our
/// contract's: a field both have (by name or by one of our field's aliases) whose values are
/// numbers of another kind.
///
/// Avro's resolution and its fingerprint both ignore logical types: a price written as a
/// decimal of scale 4 has our fingerprint and would be read as a decimal of scale 2 (12.9900
/// as 1299.00), a price written as a string would be resolved byte for byte into a decimal of
/// 2 billion, a version written as a timestamp would be read as a version in the trillions.
/// None of them is an error to apache-avro, and a registry's compatibility check lets them
/// through, so they are refused here and the records written under them are bad records. A
/// plain string where we have a `uuid` is not refused: the text is checked as a UUID anyway.
pub fn meaning_mismatch(writer: &Schema, reader: &Schema) -> Option<String> {
    let (Schema::Record(writer), Schema::Record(reader)) = (writer, reader) else {
        return None;
    };
    reader.fields.iter().find_map(|ours| {
        let theirs = writer
            .fields
            .iter()
            .find(|field| field.name == ours.name || ours.aliases.contains(&field.name))?;
        let (written, read) = (meanings(&theirs.schema), meanings(&ours.schema));
        (written != read).then(|| {
            format!(
                "field {} is written as {} where the contract has {}: its values would be read \
                 as other numbers",
                theirs.name,
                describe(&written),
                describe(&read)
            )
        })
    })
}

/// What a value of `schema` means beyond its encoding, for each branch of a union (`null`
/// left out): the logical type, a decimal's with its scale; `None` for a plain value.
fn meanings(schema: &Schema) -> BTreeSet<Option<String>> {
    let branches = match schema {
        Schema::Union(union) => union.variants(),
        other => std::slice::from_ref(other),
    };
    branches
        .iter()
        .filter(|branch| !matches!(branch, Schema::Null))
        .map(|branch| match branch {
            Schema::Decimal(decimal) => Some(format!("a decimal of scale {}", decimal.scale)),
            Schema::Uuid(_) => None,
            other if SchemaKind::from(other).is_primitive() => None,
            Schema::Array(_)
            | Schema::Map(_)
            | Schema::Record(_)
            | Schema::Enum(_)
            | Schema::Fixed(_)
            | Schema::Ref { .. } => None,
            logical => Some(format!("{:?}", SchemaKind::from(logical))),
        })
        .collect()
}

fn describe(meanings: &BTreeSet<Option<String>>) -> String {
    let names: Vec<&str> = meanings
        .iter()
        .map(|meaning| meaning.as_deref().unwrap_or("a plain value"))
        .collect();
    names.join(" or ")
}

/// A depth-first walk of a schema.
#[derive(Default)]
struct Walk {
    /// The full names of the records around the schema being walked.
    enclosing: Vec<String>,
    /// The named types walked so far whose values take no bytes at all (records of nothing
    /// else, `fixed` of size 0), which a reference can name again.
    empty_named: HashSet<String>,
}

impl Walk {
    fn schema(&mut self, schema: &Schema) -> Result<(), String> {
        match schema {
            Schema::Record(record) => {
                let full_name = record.name.fullname(None);
                self.enclosing.push(full_name.clone());
                let fields = record
                    .fields
                    .iter()
                    .try_for_each(|field| self.schema(&field.schema));
                self.enclosing.pop();
                fields?;
                if record
                    .fields
                    .iter()
                    .all(|field| self.takes_no_bytes(&field.schema))
                {
                    self.empty_named.insert(full_name);
                }
                Ok(())
            }
            Schema::Ref { name } => {
                let full_name = name.fullname(None);
                if self.enclosing.contains(&full_name) {
                    return Err(format!(
                        "{full_name} contains itself; recursive schemas are not accepted"
                    ));
                }
                Ok(())
            }
            Schema::Array(array) => {
                self.schema(&array.items)?;
                if self.takes_no_bytes(&array.items) {
                    return Err(
                        "an array whose items take no bytes (null, a fixed of size 0, records of \
                         nothing else) is not accepted: a few bytes of a record could make it \
                         reserve gigabytes"
                            .to_owned(),
                    );
                }
                Ok(())
            }
            Schema::Map(map) => self.schema(&map.types),
            Schema::Union(union) => union
                .variants()
                .iter()
                .try_for_each(|variant| self.schema(variant)),
            Schema::Fixed(fixed) | Schema::Duration(fixed) => self.fixed(fixed),
            Schema::Decimal(decimal) => match &decimal.inner {
                InnerDecimalSchema::Fixed(fixed) => self.fixed(fixed),
                InnerDecimalSchema::Bytes => Ok(()),
            },
            Schema::Uuid(UuidSchema::Fixed(fixed)) => self.fixed(fixed),
            _ => Ok(()),
        }
    }

    fn fixed(&mut self, fixed: &FixedSchema) -> Result<(), String> {
        let full_name = fixed.name.fullname(None);
        if fixed.size > MAX_DECODE_ALLOCATION_BYTES {
            return Err(format!(
                "fixed {full_name} declares {} bytes, more than the \
                 {MAX_DECODE_ALLOCATION_BYTES} a decoded value may take",
                fixed.size
            ));
        }
        if fixed.size == 0 {
            self.empty_named.insert(full_name);
        }
        Ok(())
    }

    /// Whether a value of `schema` is read from no bytes at all. Everything else reads at least
    /// a byte: a number, a length, a count, a union's or an enum's index.
    fn takes_no_bytes(&self, schema: &Schema) -> bool {
        match schema {
            Schema::Null => true,
            Schema::Fixed(fixed) | Schema::Duration(fixed) => fixed.size == 0,
            Schema::Uuid(UuidSchema::Fixed(fixed)) => fixed.size == 0,
            Schema::Decimal(decimal) => {
                matches!(&decimal.inner, InnerDecimalSchema::Fixed(fixed) if fixed.size == 0)
            }
            Schema::Record(record) => record
                .fields
                .iter()
                .all(|field| self.takes_no_bytes(&field.schema)),
            Schema::Ref { name } => self.empty_named.contains(&name.fullname(None)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Schema {
        Schema::parse_str(json).unwrap()
    }

    fn with_field(contract: &str, field: &str, from: &str, to: &str) -> Schema {
        let json = crate::codec::contract::contracts()
            .iter()
            .find(|c| c.event_type() == contract)
            .unwrap()
            .schema_json();
        let field_start = json.find(&format!("\"name\": \"{field}\"")).unwrap();
        let at = field_start + json[field_start..].find(from).unwrap();
        parse(&format!("{}{to}{}", &json[..at], &json[at + from.len()..]))
    }

    fn contract_schema(event_type: &str) -> &'static Schema {
        crate::codec::contract::contracts()
            .iter()
            .find(|c| c.event_type() == event_type)
            .unwrap()
            .schema()
    }

    #[test]
    fn a_price_or_version_written_with_another_meaning_is_refused() {
        let fact = contract_schema("BookFactEvent");
        let scale_four = with_field("BookFactEvent", "price", "\"scale\": 2", "\"scale\": 4");
        let reason = meaning_mismatch(&scale_four, fact).unwrap();
        assert!(
            reason.contains("price") && reason.contains("scale 4") && reason.contains("scale 2"),
            "{reason}"
        );
        let as_text = with_field(
            "BookFactEvent",
            "price",
            r#"{"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}"#,
            r#""string""#,
        );
        assert!(meaning_mismatch(&as_text, fact).is_some());
        let as_time = with_field(
            "BookFactEvent",
            "version",
            r#""long""#,
            r#"{"type": "long", "logicalType": "timestamp-millis"}"#,
        );
        let reason = meaning_mismatch(&as_time, fact).unwrap();
        assert!(reason.contains("version"), "{reason}");
    }

    #[test]
    fn the_same_meanings_under_another_spelling_pass() {
        for contract in crate::codec::contract::contracts() {
            assert_eq!(
                meaning_mismatch(contract.schema(), contract.schema()),
                None,
                "{}",
                contract.event_type()
            );
        }
        let fact = contract_schema("BookFactEvent");
        let wider = with_field(
            "BookFactEvent",
            "price",
            "\"precision\": 12",
            "\"precision\": 16",
        );
        assert_eq!(meaning_mismatch(&wider, fact), None);
        let plain_id = with_field(
            "BookFactEvent",
            "book_id",
            r#"{"type": "string", "logicalType": "uuid"}"#,
            r#""string""#,
        );
        assert_eq!(meaning_mismatch(&plain_id, fact), None);
    }

    #[test]
    fn our_contracts_pass() {
        for contract in crate::codec::contract::contracts() {
            assert_eq!(
                refusal(contract.schema()),
                None,
                "{}",
                contract.event_type()
            );
        }
    }

    #[test]
    fn a_record_holding_itself_is_refused() {
        let schema = parse(
            r#"{"type": "record", "name": "Node", "namespace": "n",
                "fields": [{"name": "next", "type": ["null", "Node"]}]}"#,
        );
        let reason = refusal(&schema).unwrap();
        assert!(reason.contains("n.Node contains itself"), "{reason}");
    }

    #[test]
    fn mutual_recursion_through_a_nested_record_is_refused() {
        let schema = parse(
            r#"{"type": "record", "name": "A", "fields": [
                {"name": "b", "type": {"type": "record", "name": "B", "fields": [
                    {"name": "back", "type": {"type": "array", "items": "A"}}]}}]}"#,
        );
        assert!(refusal(&schema).unwrap().contains("A contains itself"));
    }

    #[test]
    fn a_named_type_used_twice_side_by_side_is_not_recursion() {
        let schema = parse(
            r#"{"type": "record", "name": "R", "fields": [
                {"name": "first", "type": {"type": "record", "name": "Part", "fields": [
                    {"name": "x", "type": "int"}]}},
                {"name": "second", "type": "Part"},
                {"name": "colour", "type": {"type": "enum", "name": "C", "symbols": ["A"]}},
                {"name": "again", "type": ["null", "C"]},
                {"name": "digest", "type": {"type": "fixed", "name": "D", "size": 32}},
                {"name": "old_digest", "type": "D"}]}"#,
        );
        assert_eq!(refusal(&schema), None);
    }

    #[test]
    fn arrays_of_items_that_take_no_bytes_are_refused_wherever_they_are() {
        for items in [
            r#""null""#,
            r#"{"type": "array", "items": "null"}"#,
            r#"{"type": "record", "name": "Nothing", "fields": [{"name": "n", "type": "null"}]}"#,
            r#"{"type": "record", "name": "Empty", "fields": []}"#,
            r#"{"type": "fixed", "name": "Zero", "size": 0}"#,
        ] {
            let schema = parse(&format!(
                r#"{{"type": "record", "name": "R", "fields": [
                    {{"name": "f", "type": {{"type": "array", "items": {items}}}}}]}}"#
            ));
            let reason = refusal(&schema).unwrap_or_else(|| panic!("{items} accepted"));
            assert!(reason.contains("items take no bytes"), "{reason}");
        }
        // Through a reference to a record defined before.
        let schema = parse(
            r#"{"type": "record", "name": "R", "fields": [
                {"name": "first", "type": {"type": "record", "name": "Nothing", "fields": []}},
                {"name": "many", "type": {"type": "array", "items": "Nothing"}}]}"#,
        );
        assert!(refusal(&schema).is_some());
        // Through a reference to a fixed of no bytes defined before, as the items of an array
        // nested in another: each inner array a few bytes, each reserving megabytes.
        let schema = parse(
            r#"{"type": "record", "name": "BookFactEvent", "fields": [
                {"name": "z", "type": {"type": "fixed", "name": "Zero", "size": 0}},
                {"name": "rows", "type": {"type": "array",
                    "items": {"type": "array", "items": "Zero"}}}]}"#,
        );
        let reason = refusal(&schema).expect("an array of a zero-size fixed by reference");
        assert!(reason.contains("items take no bytes"), "{reason}");
    }

    #[test]
    fn arrays_of_items_that_take_a_byte_are_accepted() {
        for items in [
            r#""boolean""#,
            r#"["null", "string"]"#,
            r#"{"type": "record", "name": "Flag", "fields": [{"name": "b", "type": "boolean"}]}"#,
            r#"{"type": "array", "items": "int"}"#,
            r#"{"type": "map", "values": "null"}"#,
        ] {
            let schema = parse(&format!(
                r#"{{"type": "record", "name": "R", "fields": [
                    {{"name": "f", "type": {{"type": "array", "items": {items}}}}}]}}"#
            ));
            assert_eq!(refusal(&schema), None, "{items}");
        }
    }

    #[test]
    fn a_fixed_larger_than_any_decoded_value_is_refused() {
        for fixed in [
            r#"{"type": "fixed", "name": "Huge", "size": 1152921504606846976}"#,
            r#"{"type": "fixed", "name": "Huge", "size": 1152921504606846976,
                "logicalType": "decimal", "precision": 4, "scale": 2}"#,
        ] {
            let schema = parse(&format!(
                r#"{{"type": "record", "name": "R", "fields": [{{"name": "f", "type": {fixed}}}]}}"#
            ));
            let reason = refusal(&schema).unwrap();
            assert!(reason.contains("fixed Huge declares"), "{reason}");
        }
        let just_fits = parse(&format!(
            r#"{{"type": "record", "name": "R", "fields": [{{"name": "f",
                "type": {{"type": "fixed", "name": "F", "size": {MAX_DECODE_ALLOCATION_BYTES}}}}}]}}"#
        ));
        assert_eq!(refusal(&just_fits), None);
    }
}
