//! # bookstore
//!
//! Turns every change of a `Book` into events on Apache Kafka — reliably, in order, with Avro
//! contracts — and keeps a reporting read model up to date from them.
//!
//! ## Data flow
//!
//! ```text
//!  command ──▶ domain (pure) ──▶ store: ONE transaction ──▶ relay ──▶ Kafka ──▶ projection ──▶ BookReport
//!               decide/apply      book row + delta events     outbox      bookstore.book        (read model)
//!                                 + fact event (outbox)       → topics    bookstore.book-fact
//! ```
//!
//! 1. [`domain`] holds the `Book` aggregate. A command is decided against the current state and
//!    raises delta events (`BookAdded`, `BookPriceUpdated`, …); every change also raises a
//!    `BookFactEvent` with the whole book after it. No I/O happens there.
//! 2. [`service`] runs a command: loads the book, lets the domain decide, wraps the events in
//!    envelopes (ids, causality, time), encodes their bodies with the [`codec`] and hands
//!    everything to the [`store`], which writes the book row and all its events in one
//!    transaction (the transactional outbox). Each event gets a gapless position in the global
//!    commit order.
//! 3. The relay follows the outbox by position and publishes delta events to `bookstore.book`
//!    and fact events to `bookstore.book-fact`, keyed by book id, Avro-encoded, with CloudEvents
//!    headers ([`kafka`] sets up the clients and topics).
//! 4. The projection consumes `bookstore.book-fact` and keeps the `BookReport` read model.
//!
//! ## Delivery guarantee
//!
//! A change is either committed with all of its events or not at all, so no event can be lost
//! between the database and the outbox. Positions are assigned in commit order without gaps
//! (see [`store`]), so the relay can follow them without ever skipping one, and every book's
//! events keep their order all the way to its Kafka partition.
//!
//! ## Where things live
//!
//! | module | owns |
//! | --- | --- |
//! | [`domain`] | `Book`, commands, delta and fact events, the event envelope; pure |
//! | [`service`] | running a command against the store (ids, time, retries on conflict) |
//! | [`store`] | the `EventStore` port and its SQLite and PostgreSQL adapters |
//! | [`codec`] | the Avro contracts of `schemas/` and their wire framings |
//! | [`kafka`] | client configuration and topic provisioning |
//! | [`relay`] | the outbox relay: store → Kafka, exactly-once or at-least-once |
//! | [`projection`] | the `BookReport` read model, kept from the fact topic |
//! | [`demo`] | the seed scenario, checked end to end, and demo data |
//! | [`shutdown`] | graceful shutdown handed to every task |
//! | [`config`] | one typed configuration, from flags and environment variables |
//! | [`cli`] | the shape of the `bookstore` command line (run by `src/bin/bookstore/`) |
//! | [`http`] | `bookstore serve`: the dashboard, the JSON API, health and metrics endpoints |
//! | [`telemetry`] | logging setup and the Prometheus recorder |
//! | [`bench`](mod@bench) | `bookstore bench`: every figure measured next to a raw-client baseline |

pub mod bench;
pub mod cli;
pub mod codec;
pub mod config;
pub mod demo;
pub mod domain;
pub mod http;
pub mod kafka;
pub mod projection;
pub mod relay;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod telemetry;
