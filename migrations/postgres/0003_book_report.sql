-- The reporting read model, kept by the projection from the fact topic (src/projection/), in the
-- same database schema as the store: one migration set, one backup, and a batch of rows commits
-- together with the consumer offsets it reflects.

-- One row per book that exists, as the newest fact applied states it. `version` is the
-- aggregate version of that fact: a fact only replaces the row when it is newer.
CREATE TABLE book_report (
    book_id    UUID PRIMARY KEY,
    title      TEXT NOT NULL,
    author     TEXT NOT NULL,
    price      NUMERIC(12, 2) NOT NULL CONSTRAINT book_report_price_not_negative CHECK (price >= 0),
    isbn       TEXT,
    version    BIGINT NOT NULL CONSTRAINT book_report_version_positive CHECK (version >= 1),
    -- When the book changed (the fact's `ce_time`).
    updated_at TIMESTAMPTZ NOT NULL
);

-- Serves `list_reports` (by title, then id) without a sort.
CREATE INDEX book_report_listed_by_title ON book_report (title, book_id);

-- Books the projection deleted, and the version of the deletion: a fact at or below it that
-- arrives later (a replay, a rebalance, a rebuild over an uncompacted topic) must not bring the
-- book back.
CREATE TABLE book_report_deleted (
    book_id    UUID PRIMARY KEY,
    version    BIGINT NOT NULL CONSTRAINT book_report_deleted_version_positive CHECK (version >= 1),
    deleted_at TIMESTAMPTZ NOT NULL
);

-- How far each consumer group has applied each partition: the next offset to read. Written in
-- the transaction that writes the rows, so the two never disagree; the projector starts every
-- assigned partition here.
CREATE TABLE projection_offsets (
    consumer_group TEXT NOT NULL,
    topic          TEXT NOT NULL,
    partition      INTEGER NOT NULL CONSTRAINT projection_offsets_partition_not_negative CHECK (partition >= 0),
    next_offset    BIGINT NOT NULL CONSTRAINT projection_offsets_offset_not_negative CHECK (next_offset >= 0),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
