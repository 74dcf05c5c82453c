-- The book state, the event log that doubles as the transactional outbox, and the position
-- counter that orders the outbox. See src/store/mod.rs for why positions come from one row.
-- STRICT tables: SQLite would otherwise store any value in any column; the store would rather
-- refuse a wrong type at write time than find it when reading.
-- UUIDs are hyphenated text and timestamps RFC 3339 text (UTC), so the file reads well in the
-- sqlite3 shell.

-- Current state of every book. `version` is the optimistic-concurrency token: a save only
-- writes the row while it still holds the version the change was decided against.
CREATE TABLE books (
    book_id     TEXT PRIMARY KEY NOT NULL,
    title       TEXT NOT NULL,
    author      TEXT NOT NULL,
    isbn        TEXT,
    -- The canonical decimal text with two places ("15.99"): exact, unlike REAL.
    price       TEXT NOT NULL,
    description TEXT,
    version     INTEGER NOT NULL CHECK (version >= 1),
    removed     INTEGER NOT NULL DEFAULT 0 CHECK (removed IN (0, 1)),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

-- Serves `list_books` (live books by title, then id) without a sort.
CREATE INDEX books_listed_by_title ON books (title, book_id) WHERE removed = 0;

-- Every event ever committed, in one global order. `position` is gapless (see outbox_head);
-- the relay follows it with `position > last_seen`. As INTEGER PRIMARY KEY it is the rowid,
-- so the table is stored in position order.
CREATE TABLE events (
    position       INTEGER PRIMARY KEY CHECK (position >= 1),
    event_id       TEXT NOT NULL UNIQUE,
    event_type     TEXT NOT NULL,
    stream         TEXT NOT NULL,
    stream_version INTEGER NOT NULL CHECK (stream_version >= 1),
    aggregate_id   TEXT NOT NULL,
    occurred_at    TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id   TEXT NOT NULL,
    traceparent    TEXT,
    payload        BLOB NOT NULL,
    committed_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- Two writers can never both append version n of a stream; also serves `read_stream`.
    UNIQUE (stream, stream_version)
) STRICT;

-- The last position handed out. Each saving transaction increments it as its last step;
-- SQLite has one writer at a time anyway, so appends commit in position order with no gap.
CREATE TABLE outbox_head (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    last_position INTEGER NOT NULL CHECK (last_position >= 0)
) STRICT;
INSERT INTO outbox_head (id, last_position) VALUES (1, 0);

-- How far each relay has published, so it resumes where it stopped.
CREATE TABLE relay_checkpoint (
    name       TEXT PRIMARY KEY NOT NULL,
    position   INTEGER NOT NULL CHECK (position >= 0),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;
