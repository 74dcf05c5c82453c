-- A random identity of this store, drawn once. The relay keys its Kafka transactional id and
-- its checkpoint with it, so two stores publishing to the same topics (a new database, a test
-- store next to the real one) never take each other's checkpoint for their own.
CREATE TABLE store_identity (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    store_id   TEXT NOT NULL
) STRICT;
INSERT INTO store_identity (id, store_id) VALUES (1, lower(hex(randomblob(16))));
