//! Parsing Canonical Form and the CRC-64-AVRO (Rabin) fingerprint, exactly as the Avro
//! specification defines them, so our fingerprints equal those of the Java, Python (fastavro)
//! and other implementations.
//!
//! We do not use `apache_avro::Schema::canonical_form` / `fingerprint`: in apache-avro 0.22 the
//! canonical form keeps `precision`, `scale` and `order` and does not reduce a primitive with a
//! logical type (`{"type":"string","logicalType":"uuid"}`) to `"string"`, so any schema with a
//! decimal or uuid gets a fingerprint no other implementation computes. The single-object
//! header would then name a schema nobody else can find.
//!
//! The fingerprint is a `u64`; on the wire (single-object header) it is written little-endian,
//! which is also the byte order apache-avro's `Rabin` digest and fastavro's hex string use.

use std::collections::HashSet;

use serde_json::{Map, Value};
use thiserror::Error;

/// Why a schema text has no canonical form.
#[derive(Debug, Error)]
pub enum CanonicalFormError {
    #[error("schema is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("not an Avro schema: {0}")]
    Shape(String),
}

/// The CRC-64-AVRO fingerprint of a schema's Parsing Canonical Form.
pub fn schema_fingerprint(schema_json: &str) -> Result<u64, CanonicalFormError> {
    Ok(crc64_avro(parsing_canonical_form(schema_json)?.as_bytes()))
}

/// The Parsing Canonical Form of a schema text: full names, only the attributes that matter for
/// reading (`name`, `type`, `fields`, `symbols`, `items`, `values`, `size`) in that order, each
/// named type spelled out once, no white space.
pub fn parsing_canonical_form(schema_json: &str) -> Result<String, CanonicalFormError> {
    let schema: Value = serde_json::from_str(schema_json)?;
    let mut canonical = Canonicalizer::default();
    canonical.write(&schema, None)?;
    Ok(canonical.out)
}

const EMPTY: u64 = 0xC15D_213A_A4D7_A795;

const TABLE: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut fp = i as u64;
        let mut bit = 0;
        while bit < 8 {
            fp = (fp >> 1) ^ (EMPTY & 0u64.wrapping_sub(fp & 1));
            bit += 1;
        }
        table[i] = fp;
        i += 1;
    }
    table
};

/// The 64-bit Rabin fingerprint the Avro specification calls CRC-64-AVRO.
pub fn crc64_avro(bytes: &[u8]) -> u64 {
    bytes.iter().fold(EMPTY, |fp, &byte| {
        (fp >> 8) ^ TABLE[((fp ^ u64::from(byte)) & 0xFF) as usize]
    })
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

#[derive(Default)]
struct Canonicalizer {
    out: String,
    defined: HashSet<String>,
}

impl Canonicalizer {
    fn write(&mut self, schema: &Value, namespace: Option<&str>) -> Result<(), CanonicalFormError> {
        match schema {
            Value::String(name) => self.write_name_or_primitive(name, namespace),
            Value::Array(branches) => {
                self.out.push('[');
                for (i, branch) in branches.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.write(branch, namespace)?;
                }
                self.out.push(']');
                Ok(())
            }
            Value::Object(object) => self.write_object(object, namespace),
            other => Err(shape(format!("unexpected schema {other}"))),
        }
    }

    fn write_name_or_primitive(
        &mut self,
        name: &str,
        namespace: Option<&str>,
    ) -> Result<(), CanonicalFormError> {
        if PRIMITIVES.contains(&name) {
            self.push_string(name);
        } else {
            self.push_string(&full_name(name, namespace));
        }
        Ok(())
    }

    fn write_object(
        &mut self,
        object: &Map<String, Value>,
        namespace: Option<&str>,
    ) -> Result<(), CanonicalFormError> {
        let type_name = match object.get("type") {
            Some(Value::String(type_name)) => type_name.as_str(),
            // `{"type": {...}}` and `{"type": [...]}` wrap a schema without adding anything.
            Some(inner @ (Value::Object(_) | Value::Array(_))) => {
                return self.write(inner, namespace);
            }
            _ => return Err(shape("an object schema needs a \"type\"".into())),
        };
        match type_name {
            "record" | "error" | "enum" | "fixed" => self.write_named(type_name, object, namespace),
            "array" => {
                self.out.push_str(r#"{"type":"array","items":"#);
                self.write(required(object, "items")?, namespace)?;
                self.out.push('}');
                Ok(())
            }
            "map" => {
                self.out.push_str(r#"{"type":"map","values":"#);
                self.write(required(object, "values")?, namespace)?;
                self.out.push('}');
                Ok(())
            }
            // A primitive, with or without a logical type: logical types are not part of the
            // canonical form.
            other => self.write_name_or_primitive(other, namespace),
        }
    }

    fn write_named(
        &mut self,
        type_name: &str,
        object: &Map<String, Value>,
        enclosing: Option<&str>,
    ) -> Result<(), CanonicalFormError> {
        let name = required_str(object, "name")?;
        let namespace = object
            .get("namespace")
            .and_then(Value::as_str)
            .or(enclosing);
        let full = full_name(name, namespace);
        if !self.defined.insert(full.clone()) {
            self.push_string(&full);
            return Ok(());
        }
        let own_namespace = full
            .rsplit_once('.')
            .map(|(namespace, _)| namespace.to_owned());
        self.out.push_str(r#"{"name":"#);
        self.push_string(&full);
        self.out.push_str(r#","type":"#);
        self.push_string(type_name);
        match type_name {
            "enum" => {
                self.out.push_str(r#","symbols":["#);
                let symbols = required_array(object, "symbols")?;
                for (i, symbol) in symbols.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    let symbol = symbol
                        .as_str()
                        .ok_or_else(|| shape("enum symbols must be strings".into()))?;
                    self.push_string(symbol);
                }
                self.out.push(']');
            }
            "fixed" => {
                let size = match required(object, "size")? {
                    Value::Number(size) => size.as_u64(),
                    Value::String(size) => size.trim().parse().ok(),
                    _ => None,
                }
                .ok_or_else(|| shape("fixed size must be a non-negative integer".into()))?;
                self.out.push_str(&format!(r#","size":{size}"#));
            }
            _ => {
                self.out.push_str(r#","fields":["#);
                for (i, field) in required_array(object, "fields")?.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    let field = field
                        .as_object()
                        .ok_or_else(|| shape("record fields must be objects".into()))?;
                    self.out.push_str(r#"{"name":"#);
                    self.push_string(required_str(field, "name")?);
                    self.out.push_str(r#","type":"#);
                    self.write(required(field, "type")?, own_namespace.as_deref())?;
                    self.out.push('}');
                }
                self.out.push(']');
            }
        }
        self.out.push('}');
        Ok(())
    }

    fn push_string(&mut self, text: &str) {
        // serde_json escapes only what JSON requires and keeps other characters as UTF-8,
        // which is what the [STRINGS] rule asks for.
        self.out
            .push_str(&serde_json::to_string(text).unwrap_or_default());
    }
}

fn full_name(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(namespace) if !name.contains('.') && !namespace.is_empty() => {
            format!("{namespace}.{name}")
        }
        _ => name.to_owned(),
    }
}

fn required<'a>(
    object: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a Value, CanonicalFormError> {
    object
        .get(key)
        .ok_or_else(|| shape(format!("missing \"{key}\"")))
}

fn required_str<'a>(
    object: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a str, CanonicalFormError> {
    required(object, key)?
        .as_str()
        .ok_or_else(|| shape(format!("\"{key}\" must be a string")))
}

fn required_array<'a>(
    object: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a Vec<Value>, CanonicalFormError> {
    required(object, key)?
        .as_array()
        .ok_or_else(|| shape(format!("\"{key}\" must be an array")))
}

fn shape(reason: String) -> CanonicalFormError {
    CanonicalFormError::Shape(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From the Avro specification's test data (`share/test/data/schema-tests.txt`):
    /// `"int"` has the CRC-64-AVRO fingerprint 8247732601305521295 = 0x7275d51a3f395c8f;
    /// fastavro 1.13.1 (`fingerprint(parse_schema("int"), "CRC-64-AVRO")`) prints the same
    /// value as its little-endian bytes, "8f5c393f1ad57572".
    #[test]
    fn fingerprint_of_int_matches_the_specification() {
        assert_eq!(
            schema_fingerprint(r#""int""#).unwrap(),
            8_247_732_601_305_521_295
        );
        assert_eq!(
            schema_fingerprint(r#""int""#).unwrap().to_le_bytes(),
            [0x8f, 0x5c, 0x39, 0x3f, 0x1a, 0xd5, 0x75, 0x72]
        );
    }

    #[test]
    fn fingerprint_bytes_equal_apache_avro_rabin_for_primitives() {
        // For primitives both canonical forms agree, so this pins the byte order: apache-avro's
        // `Rabin` digest is the little-endian encoding of our u64.
        use apache_avro::{Schema, rabin::Rabin};
        for primitive in PRIMITIVES {
            let text = format!("\"{primitive}\"");
            let theirs = Schema::parse_str(&text).unwrap().fingerprint::<Rabin>();
            let ours = schema_fingerprint(&text).unwrap();
            assert_eq!(theirs.bytes, ours.to_le_bytes(), "{primitive}");
        }
    }

    /// Expected values computed with fastavro 1.13.1:
    /// `to_parsing_canonical_form(parse_schema(schema))` and
    /// `fingerprint(..., "CRC-64-AVRO")` = "bac440ba024dab13" (little-endian bytes).
    #[test]
    fn canonical_form_and_fingerprint_match_fastavro_for_a_schema_using_every_rule() {
        let schema = r#"{"type": "record", "name": "Outer", "namespace": "kat.test", "doc": "ignored", "fields": [{"name": "id", "type": {"type": "string", "logicalType": "uuid"}, "doc": "x"}, {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}}, {"name": "note", "type": ["null", "string"], "default": null}, {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"], "default": "A"}}, {"name": "kinds", "type": {"type": "array", "items": "Kind"}}, {"name": "inner", "type": {"type": "record", "name": "other.Inner", "fields": [{"name": "hash", "type": {"type": "fixed", "name": "Hash", "size": 4}}, {"name": "tags", "type": {"type": "map", "values": "long"}, "order": "ignore"}]}}, {"name": "again", "type": "other.Inner"}, {"name": "hash2", "type": "other.Hash"}, {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}}]}"#;
        let expected = r#"{"name":"kat.test.Outer","type":"record","fields":[{"name":"id","type":"string"},{"name":"amount","type":"bytes"},{"name":"note","type":["null","string"]},{"name":"kind","type":{"name":"kat.test.Kind","type":"enum","symbols":["A","B"]}},{"name":"kinds","type":{"type":"array","items":"kat.test.Kind"}},{"name":"inner","type":{"name":"other.Inner","type":"record","fields":[{"name":"hash","type":{"name":"other.Hash","type":"fixed","size":4}},{"name":"tags","type":{"type":"map","values":"long"}}]}},{"name":"again","type":"other.Inner"},{"name":"hash2","type":"other.Hash"},{"name":"ts","type":"long"}]}"#;
        assert_eq!(parsing_canonical_form(schema).unwrap(), expected);
        assert_eq!(
            schema_fingerprint(schema).unwrap().to_le_bytes(),
            [0xba, 0xc4, 0x40, 0xba, 0x02, 0x4d, 0xab, 0x13]
        );
    }

    #[test]
    fn apache_avro_canonical_form_keeps_decimal_attributes_which_is_why_we_have_our_own() {
        // If this starts failing, apache-avro follows the specification now and this module
        // could be replaced by `Schema::fingerprint::<Rabin>()`.
        let schema = r#"{"type":"record","name":"R","fields":[{"name":"p","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}}]}"#;
        let theirs = apache_avro::Schema::parse_str(schema)
            .unwrap()
            .canonical_form();
        let ours = parsing_canonical_form(schema).unwrap();
        assert_eq!(
            ours,
            r#"{"name":"R","type":"record","fields":[{"name":"p","type":"bytes"}]}"#
        );
        assert_ne!(theirs, ours);
    }

    #[test]
    fn rejects_what_is_not_a_schema() {
        assert!(parsing_canonical_form("{").is_err());
        assert!(parsing_canonical_form("42").is_err());
        assert!(parsing_canonical_form(r#"{"name":"x"}"#).is_err());
        assert!(parsing_canonical_form(r#"{"type":"record","name":"R"}"#).is_err());
    }
}
