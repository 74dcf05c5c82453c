"""Writes tests/interop/fastavro_vectors.json: one datum per record of `schemas/`, written by
fastavro from the `.avsc` files alone, for `tests/codec_contract.rs` to decode. Run it again
(python3 tests/interop/make_vectors.py) only when a schema gains a version; the file is
committed, so the test needs no Python."""

import io
import json
import pathlib
import uuid
from decimal import Decimal

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

ROOT = pathlib.Path(__file__).resolve().parents[2]
BOOK = uuid.UUID("0190f5c4-6b3a-7cc1-9f1e-2f1d3c4b5a69")

RECORDS = {
    "BookAdded": {
        "book_id": BOOK,
        "title": "Dune \u2014 \u00e4\u00f6\u00fc \U0001d11e",
        "author": "Frank Herbert",
        "isbn": "9780441013593",
        "price": Decimal("12.99"),
        "description": "Line one\nLine two\twith a tab",
    },
    "BookPriceUpdated": {
        "book_id": BOOK,
        "old_price": Decimal("9999999999.99"),
        "new_price": Decimal("0.00"),
    },
    "BookDetailsUpdated": {
        "book_id": BOOK,
        "title": "Dune Messiah",
        "author": "Frank Herbert",
        "isbn": None,
        "description": None,
        "changed": ["TITLE", "ISBN", "DESCRIPTION"],
    },
    "BookRemoved": {"book_id": BOOK, "title": "Dune Messiah", "author": "Frank Herbert"},
    "BookFactEvent": {
        "book_id": BOOK,
        "title": "Dune Messiah",
        "author": "Frank Herbert",
        "isbn": None,
        "price": Decimal("0.01"),
        "description": None,
        "version": 9007199254740993,
        "removed": True,
    },
}


def main():
    vectors = []
    for name, record in RECORDS.items():
        schema = parse_schema(json.loads((ROOT / "schemas" / f"{name}.avsc").read_text()))
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema, record)
        canonical = to_parsing_canonical_form(schema)
        vectors.append(
            {
                "record": name,
                "datum_hex": out.getvalue().hex(),
                # fastavro's spelling: the 8 bytes of the single-object header, in frame order.
                "fingerprint_hex": fingerprint(canonical, "CRC-64-AVRO"),
            }
        )
    document = {"writer": f"fastavro {fastavro.__version__}", "vectors": vectors}
    path = ROOT / "tests" / "interop" / "fastavro_vectors.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
