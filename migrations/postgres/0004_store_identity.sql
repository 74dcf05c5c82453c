-- A random identity of this store, drawn once. The relay keys its Kafka transactional id and
-- its checkpoint with it, so two stores publishing to the same topics (a new database, a test
-- store next to the real one) never take each other's checkpoint for their own.
CREATE TABLE store_identity (
    id         INTEGER PRIMARY KEY CONSTRAINT store_identity_single_row CHECK (id = 1),
    store_id   TEXT NOT NULL
);
INSERT INTO store_identity (id, store_id) VALUES (1, replace(gen_random_uuid()::text, '-', ''));
