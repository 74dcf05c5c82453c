-- Which relay instance may publish: one lease per relay name, held until `expires_at_ms`
-- (epoch milliseconds by the database's clock, so instances need not agree on time) unless its
-- holder renews it.
CREATE TABLE relay_lease (
    name          TEXT PRIMARY KEY,
    holder        TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
