-- The book state, the event log that doubles as the transactional outbox, and the position
-- counter that orders the outbox. See src/store/mod.rs for why positions come from one row.

-- Current state of every book. `version` is the optimistic-concurrency token: a save only
-- writes the row while it still holds the version the change was decided against.
CREATE TABLE books (
    book_id     UUID PRIMARY KEY,
    title       TEXT NOT NULL,
    author      TEXT NOT NULL,
    isbn        TEXT,
    price       NUMERIC(12, 2) NOT NULL CONSTRAINT books_price_not_negative CHECK (price >= 0),
    description TEXT,
    version     BIGINT NOT NULL CONSTRAINT books_version_positive CHECK (version >= 1),
    removed     BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Serves `list_books` (live books by title, then id) without a sort.
CREATE INDEX books_listed_by_title ON books (title, book_id) WHERE NOT removed;

-- Every event ever committed, in one global order. `position` is gapless (see outbox_head);
-- the relay follows it with `position > last_seen`.
CREATE TABLE events (
    position       BIGINT PRIMARY KEY CONSTRAINT events_position_positive CHECK (position >= 1),
    event_id       UUID NOT NULL CONSTRAINT events_event_id_unique UNIQUE,
    event_type     TEXT NOT NULL,
    stream         TEXT NOT NULL,
    stream_version BIGINT NOT NULL CONSTRAINT events_stream_version_positive CHECK (stream_version >= 1),
    aggregate_id   UUID NOT NULL,
    occurred_at    TIMESTAMPTZ NOT NULL,
    correlation_id UUID NOT NULL,
    causation_id   UUID NOT NULL,
    traceparent    TEXT,
    payload        BYTEA NOT NULL,
    committed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Two writers can never both append version n of a stream; also serves `read_stream`.
    CONSTRAINT events_stream_version_unique UNIQUE (stream, stream_version)
);

-- The last position handed out. Each saving transaction increments it as its last step, and
-- the row lock that takes makes appends commit in position order with no gap.
CREATE TABLE outbox_head (
    id            INTEGER PRIMARY KEY CONSTRAINT outbox_head_single_row CHECK (id = 1),
    last_position BIGINT NOT NULL CONSTRAINT outbox_head_not_negative CHECK (last_position >= 0)
);
INSERT INTO outbox_head (id, last_position) VALUES (1, 0);

-- How far each relay has published, so it resumes where it stopped.
CREATE TABLE relay_checkpoint (
    name       TEXT PRIMARY KEY,
    position   BIGINT NOT NULL CONSTRAINT relay_checkpoint_not_negative CHECK (position >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
