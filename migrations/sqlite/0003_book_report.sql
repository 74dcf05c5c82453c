-- The reporting read model, kept by the projection from the fact topic (src/projection/), in the
-- same database as the store: one migration set, one backup, and a batch of rows commits
-- together with the consumer offsets it reflects.

-- One row per book that exists, as the newest fact applied states it. `version` is the
-- aggregate version of that fact: a fact only replaces the row when it is newer.
CREATE TABLE book_report (
    book_id    TEXT PRIMARY KEY NOT NULL,
    title      TEXT NOT NULL,
    author     TEXT NOT NULL,
    -- The canonical decimal text with two places ("15.99"), as in `books`.
    price      TEXT NOT NULL,
    isbn       TEXT,
    version    INTEGER NOT NULL CHECK (version >= 1),
    -- When the book changed (the fact's `ce_time`), RFC 3339 UTC text.
    updated_at TEXT NOT NULL
) STRICT;

-- Serves `list_reports` (by title, then id) without a sort.
CREATE INDEX book_report_listed_by_title ON book_report (title, book_id);

-- Books the projection deleted, and the version of the deletion: a fact at or below it that
-- arrives later (a replay, a rebalance, a rebuild over an uncompacted topic) must not bring the
-- book back.
CREATE TABLE book_report_deleted (
    book_id    TEXT PRIMARY KEY NOT NULL,
    version    INTEGER NOT NULL CHECK (version >= 1),
    deleted_at TEXT NOT NULL
) STRICT;

-- How far each consumer group has applied each partition: the next offset to read. Written in
-- the transaction that writes the rows, so the two never disagree; the projector starts every
-- assigned partition here.
CREATE TABLE projection_offsets (
    consumer_group TEXT NOT NULL,
    topic          TEXT NOT NULL,
    partition      INTEGER NOT NULL CHECK (partition >= 0),
    next_offset    INTEGER NOT NULL CHECK (next_offset >= 0),
    updated_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer_group, topic, partition)
) STRICT;
