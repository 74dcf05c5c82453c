-- Which schema wrote each event's payload: the CRC-64-AVRO fingerprint of its Parsing
-- Canonical Form, as a signed 64-bit integer with the fingerprint's bits. The relay refuses to
-- send a datum under another schema than the one that wrote it (after a schema change with
-- events still unpublished). NULL: saved by a version that did not record it; those versions
-- all wrote the schemas of `codec::contract::UNRECORDED_SCHEMA_FINGERPRINTS`.
ALTER TABLE events ADD COLUMN schema_fingerprint BIGINT;
