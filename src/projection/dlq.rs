//! The dead-letter queue `<prefix>.book-fact.dlq`: fact records the projection could not apply.
//!
//! A dead letter is the original record — key, value and headers, byte for byte — plus four
//! headers saying why and where it came from ([`REASON`], [`ORIGIN_TOPIC`],
//! [`ORIGIN_PARTITION`], [`ORIGIN_OFFSET`]). The projector sends it and waits for the
//! acknowledgement before it stores an offset past the record, so a record is never both
//! skipped and missing from the queue; after a crash in between it can be there twice.
//!
//! A record too large to be sent again with those headers (one near the size limit of the
//! producer or of the queue) is dead-lettered without its value and headers: its key, why,
//! where it is, and its size ([`LEFT_OUT`]); and when even its key is too large, without the
//! key too ([`KEY_LEFT_OUT`]). Dropping it, or retrying what can never fit, would leave it
//! skipped or the projection stuck. A replay reads such an original back from where it was.
//! The reason is cut to [`REASON_LIMIT`] bytes for the same cause: some quote the record
//! (a key that is no book id, an undecodable field), and a reason as large as the record would
//! make even the letter without it too large.
//!
//! [`list_dead_letters`] reads the queue from the beginning without joining a group.
//! [`replay_dead_letters`] sends every dead letter not replayed yet back to its original topic,
//! once the cause is fixed (a schema registered, a projector upgraded): it resumes from the
//! offsets of the consumer group `<prefix>.book-fact.dlq-replay` and commits each record's
//! offset right after the record is acknowledged, so each is replayed once (twice at worst if
//! it crashes between the two). Run one replay at a time. A letter whose original a later
//! record of its key follows is not sent back, and a record of its key that arrives while it
//! is sent back is sent again after it (the fact topic is compacted: see [`ReplayPlan`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::time::Instant;
use tracing::warn;

use super::fact::{Rejection, header};
use crate::config::KafkaConfig;
use crate::kafka::{KafkaSetupError, QuietEof, partition_ids_in};
use crate::shutdown::Shutdown;

/// Why the record could not be applied (a sentence).
pub const REASON: &str = "bookstore_dlq_reason";
/// The topic the record was read from.
pub const ORIGIN_TOPIC: &str = "bookstore_dlq_topic";
/// Its partition there, as decimal text.
pub const ORIGIN_PARTITION: &str = "bookstore_dlq_partition";
/// Its offset there, as decimal text.
pub const ORIGIN_OFFSET: &str = "bookstore_dlq_offset";

/// Set when the original value and headers were too large to send along: the value's size
/// in bytes, as decimal text. The original is where the origin headers say.
pub const LEFT_OUT: &str = "bookstore_dlq_left_out";

/// Set when the original key was too large to send along as well: the key's size in bytes, as
/// decimal text.
pub const KEY_LEFT_OUT: &str = "bookstore_dlq_key_left_out";

/// The most bytes of a rejection's text a dead letter carries as its [`REASON`]; the rest is
/// replaced by a note of how much was cut. Enough for every reason that does not quote the
/// record, and for the start of one that does.
pub const REASON_LIMIT: usize = 512;

/// The prefix of every header the dead-letter queue adds; a replay strips them.
const DLQ_HEADER_PREFIX: &str = "bookstore_dlq_";

/// Why the dead-letter queue could not be used. Each text names its cause once (nothing is
/// marked as a `source`, which an error chain printed with `{:#}` would repeat).
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("{0}")]
    Setup(KafkaSetupError),
    #[error("dead-letter queue {topic}: {cause}")]
    Kafka { topic: String, cause: KafkaError },
    #[error(
        "the dead-letter queue {topic} does not exist (is the topic prefix right? the relay, the \
         projector and `bookstore kafka provision` create it)"
    )]
    NoQueue { topic: String },
    #[error("reading {topic} stalled: nothing arrived for {timeout:?} before its end")]
    Timeout { topic: String, timeout: Duration },
    /// Not even the smallest letter (no key, value or headers of the original) fits the
    /// producer's size limit: a setting to fix (`message.max.bytes`), not an outage to wait out.
    #[error(
        "dead-letter queue {topic}: even a letter without the original's key, value and headers \
         is too large for the producer (is message.max.bytes set very low?): {cause}"
    )]
    LetterTooLarge { topic: String, cause: KafkaError },
    #[error(
        "dead letter {dlq_partition}@{dlq_offset} holds only where its original is, and the \
         original at {origin} is gone (retention or compaction): nothing to replay"
    )]
    OriginalGone {
        dlq_partition: i32,
        dlq_offset: i64,
        origin: String,
    },
}

impl From<KafkaSetupError> for DlqError {
    fn from(error: KafkaSetupError) -> Self {
        DlqError::Setup(error)
    }
}

/// Sends dead letters and waits for their acknowledgement.
pub struct DeadLetterSender {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl DeadLetterSender {
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaSetupError> {
        Ok(Self {
            producer: dead_letter_producer(kafka)?,
            topic: kafka.topics().book_fact_dlq,
            timeout: kafka.request_timeout(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends every `(record, rejection)` and returns once all are acknowledged (`acks=all`).
    /// A letter too large to send whole is sent again without the original's value and
    /// headers, and then without its key too (see the module documentation).
    ///
    /// All letters are handed to the producer at once, in the order given, and their
    /// acknowledgements awaited together: a batch of garbage costs a few round trips to the
    /// broker, not one per record (on the local broker, 50 letters one after the other took
    /// 6-11 ms, together 0.3-0.6 ms; a batch of 5,000 would wait most of a second). The
    /// idempotent producer keeps them in order. The first failure is returned; letters already
    /// sent stay in the queue and are sent again with the batch, as after a crash (see the
    /// module doc).
    pub async fn send_all(&self, letters: &[(&OwnedMessage, Rejection)]) -> Result<(), DlqError> {
        futures::future::try_join_all(
            letters
                .iter()
                .map(|(message, rejection)| self.deliver(message, rejection)),
        )
        .await
        .map(drop)
    }

    /// Sends one letter, smaller each time the last was too large, until it is acknowledged.
    async fn deliver(&self, message: &OwnedMessage, rejection: &Rejection) -> Result<(), DlqError> {
        let mut original = Original::Whole;
        loop {
            let cause = match self.send(message, rejection, original).await {
                Ok(()) => return Ok(()),
                Err(cause) if is_too_large(&cause) => cause,
                Err(cause) => return Err(self.error(cause)),
            };
            let Some(smaller) = original.smaller() else {
                return Err(DlqError::LetterTooLarge {
                    topic: self.topic.clone(),
                    cause,
                });
            };
            original = smaller;
            warn!(
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                key_bytes = message.key().map_or(0, <[u8]>::len),
                value_bytes = message.payload().map_or(0, <[u8]>::len),
                letter = ?original,
                "record too large for the dead-letter queue; sending where it is instead"
            );
        }
    }

    async fn send(
        &self,
        message: &OwnedMessage,
        rejection: &Rejection,
        original: Original,
    ) -> Result<(), KafkaError> {
        let headers = dead_letter_headers(message, rejection, original);
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
        if let (Original::Whole | Original::ValueLeftOut, Some(key)) = (original, message.key()) {
            record = record.key(key);
        }
        if let (Original::Whole, Some(value)) = (original, message.payload()) {
            record = record.payload(value);
        }
        self.producer
            .send(record, self.timeout)
            .await
            .map(drop)
            .map_err(|(cause, _)| cause)
    }

    fn error(&self, cause: KafkaError) -> DlqError {
        kafka_error(&self.topic, cause)
    }
}

fn is_too_large(cause: &KafkaError) -> bool {
    cause.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
}

/// How much of the original record a dead letter carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Original {
    /// Key, value and headers.
    Whole,
    /// The key only, and the value's size in [`LEFT_OUT`].
    ValueLeftOut,
    /// Nothing: the value's size in [`LEFT_OUT`], the key's in [`KEY_LEFT_OUT`]. Small enough
    /// for any sensible size limit, since the reason is bounded too.
    KeyLeftOut,
}

impl Original {
    /// The next smaller letter to try when this one is too large.
    fn smaller(self) -> Option<Original> {
        match self {
            Original::Whole => Some(Original::ValueLeftOut),
            Original::ValueLeftOut => Some(Original::KeyLeftOut),
            Original::KeyLeftOut => None,
        }
    }
}

/// The original headers (none if left out), then where the record came from and why it is
/// here.
fn dead_letter_headers(
    message: &OwnedMessage,
    rejection: &Rejection,
    original: Original,
) -> OwnedHeaders {
    let reason = bounded_reason(rejection.to_string());
    let partition = message.partition().to_string();
    let offset = message.offset().to_string();
    let value_bytes = message.payload().map_or(0, <[u8]>::len).to_string();
    let key_bytes = message.key().map_or(0, <[u8]>::len).to_string();
    let headers = match original {
        Original::Whole => original_headers(message),
        Original::ValueLeftOut => OwnedHeaders::new().insert(text_header(LEFT_OUT, &value_bytes)),
        Original::KeyLeftOut => OwnedHeaders::new()
            .insert(text_header(LEFT_OUT, &value_bytes))
            .insert(text_header(KEY_LEFT_OUT, &key_bytes)),
    };
    headers
        .insert(text_header(REASON, &reason))
        .insert(text_header(ORIGIN_TOPIC, message.topic()))
        .insert(text_header(ORIGIN_PARTITION, &partition))
        .insert(text_header(ORIGIN_OFFSET, &offset))
}

/// `reason` cut to [`REASON_LIMIT`] bytes at a character boundary, with a note of how many
/// bytes were cut.
fn bounded_reason(mut reason: String) -> String {
    if reason.len() <= REASON_LIMIT {
        return reason;
    }
    let mut cut = REASON_LIMIT;
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let more = reason.len() - cut;
    reason.truncate(cut);
    reason.push_str(&format!("… ({more} bytes more)"));
    reason
}

/// The record's headers without the ones the dead-letter queue adds.
fn original_headers(message: &OwnedMessage) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for header in original.iter() {
            if !header.key.starts_with(DLQ_HEADER_PREFIX) {
                headers = headers.insert(header);
            }
        }
    }
    headers
}

fn text_header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// A record of the dead-letter queue, as `bookstore dlq list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Where the dead letter itself is.
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    /// Why it could not be applied.
    pub reason: String,
    /// Where the original record was.
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    /// The key as text (lossy), if any.
    pub key: Option<String>,
    /// The size of the original key, when even the key was too large to carry (then `key` is
    /// `None`).
    pub key_left_out: Option<usize>,
    /// The size of the original value; `None` for a tombstone.
    pub value_bytes: Option<usize>,
    /// True when the original was too large to carry: only its key (or the key's size, see
    /// `key_left_out`) and where it is are here.
    pub left_out: bool,
}

impl DeadLetter {
    fn of(message: &OwnedMessage) -> Self {
        Self {
            dlq_partition: message.partition(),
            dlq_offset: message.offset(),
            reason: header(message, REASON)
                .unwrap_or("(no reason given)")
                .to_owned(),
            topic: header(message, ORIGIN_TOPIC).map(str::to_owned),
            partition: header(message, ORIGIN_PARTITION).and_then(|p| p.parse().ok()),
            offset: header(message, ORIGIN_OFFSET).and_then(|o| o.parse().ok()),
            key: message
                .key()
                .map(|key| String::from_utf8_lossy(key).into_owned()),
            key_left_out: header(message, KEY_LEFT_OUT).and_then(|size| size.parse().ok()),
            value_bytes: match header(message, LEFT_OUT) {
                Some(size) => size.parse().ok(),
                None => message.payload().map(<[u8]>::len),
            },
            left_out: header(message, LEFT_OUT).is_some(),
        }
    }
}

/// Every record on the dead-letter queue, oldest first. Joins no group and commits nothing.
pub async fn list_dead_letters(kafka: &KafkaConfig) -> Result<Vec<DeadLetter>, DlqError> {
    let group = format!(
        "{}.dlq-list-{}",
        kafka.topic_prefix,
        uuid::Uuid::new_v4().simple()
    );
    let mut reader = QueueReader::open(kafka, &group, StartAt::Beginning, None).await?;
    let mut letters = Vec::new();
    while let Some(message) = reader.next().await? {
        letters.push(DeadLetter::of(&message));
    }
    Ok(letters)
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Records sent back, per topic.
    pub replayed: HashMap<String, u64>,
    /// Letters not sent back because a later record of their key follows their original on
    /// its topic, or because this replay sent the same original back already (see
    /// [`replay_dead_letters`]).
    pub superseded: u64,
    /// Letters not sent back because neither their original nor any later record of its key
    /// is on the topic any more: compaction removed it with the tombstone that followed it (or
    /// records were deleted by hand). Also a letter that holds only where its original is,
    /// when the original is not there any more.
    pub gone: u64,
    /// Records of a replayed letter's key that arrived on its partition during the replay
    /// (the relay publishing meanwhile) and were sent again after the letter, so that the
    /// newest record of the book stays the last one (see [`ReplayPlan::carry_out`]).
    pub resent_newer: u64,
    /// A stop ended the replay before every letter was dealt with; the next one goes on.
    pub interrupted: bool,
}

impl ReplayReport {
    pub fn total(&self) -> u64 {
        self.replayed.values().sum()
    }
}

/// Sends every dead letter not replayed before back to the topic it came from (its original
/// key, value and headers), committing the replay group's offset after each: a
/// [`ReplayPlan`] prepared and carried out at once. See the module documentation.
///
/// A `stop` ends it between two letters: the letters sent back by then are still settled (see
/// [`ReplayPlan::carry_out`]), and the report says it was interrupted. Before any letter is
/// sent, it ends at once.
pub async fn replay_dead_letters(
    kafka: &KafkaConfig,
    stop: &Shutdown,
) -> Result<ReplayReport, DlqError> {
    let mut stopped = stop.clone();
    let plan = tokio::select! {
        plan = ReplayPlan::prepare(kafka) => plan?,
        () = stopped.wait() => {
            return Ok(ReplayReport {
                interrupted: true,
                ..ReplayReport::default()
            });
        }
    };
    plan.carry_out(kafka, stop).await
}

/// A replay checked and ready to send: which letters are still to be replayed, and where the
/// last record of each one's key was on its original's partition.
///
/// A letter whose original is no longer the last record of its key on its topic is skipped
/// (and counted as superseded): the fact topic is compacted, so a record sent after the newer
/// fact of its book, or after its tombstone, would become the one compaction keeps, and a
/// consumer reading the topic from the beginning (or a `--rebuild`) would get the book's older
/// state back, or a removed book. Facts are whole states, so the newer one already says all the
/// skipped one would. A letter goes back to its original's partition, where the check looked.
/// Letters whose key was left out (theirs cannot be a book's), or whose origin is not on the
/// topic's partitions (a topic deleted or made again since), are sent back unchecked, by key.
#[derive(Debug)]
pub struct ReplayPlan {
    group: String,
    /// The end of every partition of the queue when the letters were read: the letters
    /// checked, and so the only ones sent.
    bounds: HashMap<i32, i64>,
    latest: LatestOfKeys,
}

/// A letter sent back to its original's partition: what [`settle`] checks.
struct SentBack {
    origin: Origin,
    key: Vec<u8>,
    /// The offset of the copy sent.
    copy: i64,
}

/// Rounds of [`settle`] before it gives up (each sends again what arrived during the one
/// before; the relay would have to publish a book again within milliseconds, every round).
const SETTLE_ROUNDS: usize = 3;

impl ReplayPlan {
    /// Reads the letters not replayed yet for where their originals are, then the originals'
    /// partitions from the earliest of them to their end, noting where each letter's key was
    /// last.
    pub async fn prepare(kafka: &KafkaConfig) -> Result<Self, DlqError> {
        let topics = kafka.topics();
        let group = format!("{}-replay", topics.book_fact_dlq);
        let mut reader = QueueReader::open(kafka, &group, StartAt::Committed, None).await?;
        let bounds = reader.bounds.clone();
        let mut wanted = WantedKeys::default();
        while let Some(letter) = reader.next().await? {
            if let Some((origin, key)) = Origin::of(&letter, &topics.book_fact) {
                wanted.add(&origin, key);
            }
        }
        drop(reader);
        let latest = wanted.scan(kafka, &HashSet::new()).await?;
        Ok(Self {
            group,
            bounds,
            latest,
        })
    }

    /// Sends back every letter the plan found still the last record of its key, or could not
    /// check, and skips the others.
    ///
    /// A record of a letter's key may arrive on its partition after [`prepare`](Self::prepare)
    /// read it and before the letter is sent (the relay publishing meanwhile). The letter
    /// would then follow a newer record of its book and become the one compaction keeps. So
    /// once every letter is sent, their partitions are read again, and where a letter sent
    /// back is now the last record of its key although another record of the key came after
    /// its original, that newer record is sent again after it (the same key, value and
    /// headers: a duplicate, which consumers of the topic already tolerate).
    ///
    /// That second step runs whatever ends the first: a `stop` (looked at between letters) or
    /// an error. Each letter's offset is committed once it is sent, so a replay ended before
    /// the step would leave the letters it sent after a newer record of their book for good:
    /// the next replay does not look at them again.
    pub async fn carry_out(
        self,
        kafka: &KafkaConfig,
        stop: &Shutdown,
    ) -> Result<ReplayReport, DlqError> {
        let producer = dead_letter_producer(kafka)?;
        let mut report = ReplayReport::default();
        let mut sent = SentSoFar::default();
        let sending = self
            .send_back(kafka, &producer, stop, &mut report, &mut sent)
            .await;
        if !sent.back.is_empty() {
            match settle(kafka, &producer, &sent.back, sent.copies).await {
                Ok(resent) => report.resent_newer = resent,
                // Sending failed as well: its error says more; this one is logged.
                Err(error) if sending.is_err() => warn!(
                    %error,
                    "could not check the partitions of the letters sent back before the error; \
                     a letter may follow a newer record of its book until the book's next change"
                ),
                Err(error) => return Err(error),
            }
        }
        sending.map(|()| report)
    }

    /// Sends back the letters the plan lets through, until the queue's bounds or a `stop`.
    async fn send_back(
        self,
        kafka: &KafkaConfig,
        producer: &FutureProducer,
        stop: &Shutdown,
        report: &mut ReplayReport,
        sent: &mut SentSoFar,
    ) -> Result<(), DlqError> {
        let Self {
            group,
            bounds,
            latest,
        } = self;
        let topics = kafka.topics();
        let mut reader = QueueReader::open(kafka, &group, StartAt::Committed, Some(bounds)).await?;
        let SentSoFar {
            originals,
            back: sent_back,
            copies,
        } = sent;
        let mut stopped = stop.clone();
        loop {
            // Reading a letter changes nothing yet; from its send to its commit, it runs on.
            let letter = tokio::select! {
                letter = reader.next() => letter?,
                () = stopped.wait() => {
                    report.interrupted = true;
                    return Ok(());
                }
            };
            let Some(letter) = letter else {
                return Ok(());
            };
            let origin = Origin::of(&letter, &topics.book_fact);
            let verdict = match &origin {
                Some((origin, _)) if originals.contains(origin) => Verdict::Superseded,
                Some((origin, key)) => latest.verdict(origin, key),
                None => Verdict::Unchecked,
            };
            match verdict {
                Verdict::Superseded | Verdict::Gone => {
                    reader.commit_past(&letter).await?;
                    if verdict == Verdict::Gone {
                        report.gone += 1;
                    } else {
                        report.superseded += 1;
                    }
                    continue;
                }
                Verdict::Last | Verdict::Unchecked => {}
            }
            let target = header(&letter, ORIGIN_TOPIC)
                .unwrap_or(&topics.book_fact)
                .to_owned();
            let original;
            let message = match header(&letter, LEFT_OUT) {
                Some(_) => match read_original(kafka, &letter, &target).await {
                    Ok(found) => {
                        original = found;
                        &original
                    }
                    // Skipped like a letter checked against the topic and found gone: an
                    // error would stop every later replay at this letter for good.
                    Err(gone @ DlqError::OriginalGone { .. }) => {
                        warn!(%gone, "skipping the dead letter");
                        reader.commit_past(&letter).await?;
                        report.gone += 1;
                        continue;
                    }
                    Err(error) => return Err(error),
                },
                None => &letter,
            };
            let partition = match (verdict, &origin) {
                (Verdict::Last, Some((origin, _))) => Some(origin.partition),
                _ => None,
            };
            let delivered = send_copy(producer, kafka, &target, partition, message).await?;
            reader.commit_past(&letter).await?;
            *report.replayed.entry(target).or_default() += 1;
            if let Some((origin, key)) = origin {
                if verdict == Verdict::Last {
                    copies.insert(
                        (origin.topic.clone(), delivered.partition, delivered.offset),
                        origin.offset,
                    );
                    sent_back.push(SentBack {
                        origin: origin.clone(),
                        key: key.to_vec(),
                        copy: delivered.offset,
                    });
                }
                originals.insert(origin);
            }
        }
    }
}

/// What a replay has sent back so far.
#[derive(Default)]
struct SentSoFar {
    /// Originals sent back: a second letter of one (dead-lettered twice across a crash) is
    /// superseded by the first's copy.
    originals: HashSet<Origin>,
    /// The letters sent back to their original's partition, for [`settle`].
    back: Vec<SentBack>,
    /// Where the copies are (a record there is not one written meanwhile), and the offset of
    /// the record each copies.
    copies: HashMap<(String, i32, i64), i64>,
}

/// Sends again, after the letters sent back, the records of their keys that arrived during the
/// replay (see [`ReplayPlan::carry_out`]), until every letter's partition ends in its book's
/// newest record again; returns how many it sent. `copies` holds where this run's own records
/// are, and the offset of the record each copies.
///
/// A copy the `read_committed` scan has not reached lies behind a transaction still open (the
/// relay's, begun before the copy was written), which may hold a record of the same key: the
/// partition is read again until the copy is visible, for the request timeout at most.
async fn settle(
    kafka: &KafkaConfig,
    producer: &FutureProducer,
    sent_back: &[SentBack],
    mut copies: HashMap<(String, i32, i64), i64>,
) -> Result<u64, DlqError> {
    // Per partition and key, where this run's last copy of it is.
    let mut last_copy: HashMap<(String, i32, Vec<u8>), i64> = HashMap::new();
    for letter in sent_back {
        let at = (
            letter.origin.topic.clone(),
            letter.origin.partition,
            letter.key.clone(),
        );
        let copy = last_copy.entry(at).or_insert(letter.copy);
        *copy = (*copy).max(letter.copy);
    }
    let invisible_until = Instant::now() + kafka.request_timeout();
    let mut resent = 0;
    let mut rounds = 0;
    loop {
        let mut wanted = WantedKeys::default();
        for letter in sent_back {
            wanted.add(&letter.origin, &letter.key);
        }
        let found = wanted
            .scan(kafka, &copies.keys().cloned().collect())
            .await?;
        let mut newer: HashMap<(String, i32, Vec<u8>), OwnedMessage> = HashMap::new();
        let mut invisible = false;
        for ((topic, partition, key), &copy) in &last_copy {
            let seen = found
                .partitions
                .get(&(topic.clone(), *partition))
                .and_then(|keys| keys.get(key));
            let Some(seen) = seen.filter(|seen| seen.last >= copy) else {
                invisible = true;
                continue;
            };
            // The last record is a copy of an older one than a record written meanwhile.
            let copied = copies.get(&(topic.clone(), *partition, seen.last));
            if let (Some(&copied), Some(other)) = (copied, &seen.newest_other)
                && other.offset() > copied
            {
                newer.insert((topic.clone(), *partition, key.clone()), other.clone());
            }
        }
        if newer.is_empty() && !invisible {
            return Ok(resent);
        }
        if newer.is_empty() {
            if Instant::now() >= invisible_until {
                warn!(
                    timeout = ?kafka.request_timeout(),
                    "a transaction kept a replayed letter unreadable; a record of its book in \
                     it may come before the letter (publish the book again to put its newest \
                     state last)"
                );
                return Ok(resent);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        rounds += 1;
        if rounds > SETTLE_ROUNDS {
            warn!(
                rounds = SETTLE_ROUNDS,
                "records of replayed letters' books kept arriving during the replay; a letter \
                 may follow a newer record of its book until the book's next change"
            );
            return Ok(resent);
        }
        for ((topic, partition, key), record) in newer {
            warn!(
                %topic,
                partition,
                offset = record.offset(),
                "a record of a replayed letter's key arrived during the replay; sending it again after the letter"
            );
            let delivered = send_copy(producer, kafka, &topic, Some(partition), &record).await?;
            copies.insert(
                (topic.clone(), delivered.partition, delivered.offset),
                record.offset(),
            );
            last_copy.insert((topic, partition, key), delivered.offset);
            resent += 1;
        }
    }
}

/// Sends `message`'s key, value and headers (without the queue's own) to `topic`, to
/// `partition` where given (else by key), and waits for the acknowledgement.
async fn send_copy(
    producer: &FutureProducer,
    kafka: &KafkaConfig,
    topic: &str,
    partition: Option<i32>,
    message: &OwnedMessage,
) -> Result<Delivery, DlqError> {
    let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(original_headers(message));
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(value) = message.payload() {
        record = record.payload(value);
    }
    producer
        .send(record, kafka.request_timeout())
        .await
        .map_err(|(cause, _)| DlqError::Kafka {
            topic: topic.to_owned(),
            cause,
        })
}

/// What the check of a letter against its original's partition found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The original is still the last record of its key: send it back.
    Last,
    /// A later record of its key follows it.
    Superseded,
    /// Neither it nor a later record of its key is there.
    Gone,
    /// Not checked (no key or origin, or an origin the topic does not have): sent back by key.
    Unchecked,
}

/// Where a dead letter's original is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    topic: String,
    partition: i32,
    offset: i64,
}

impl Origin {
    /// The letter's origin and key, if it names both (its original topic defaulting to
    /// `fact_topic`, as in replay).
    fn of<'l>(letter: &'l OwnedMessage, fact_topic: &str) -> Option<(Origin, &'l [u8])> {
        if header(letter, KEY_LEFT_OUT).is_some() {
            return None;
        }
        let origin = Origin {
            topic: header(letter, ORIGIN_TOPIC)
                .unwrap_or(fact_topic)
                .to_owned(),
            partition: header(letter, ORIGIN_PARTITION)?.parse().ok()?,
            offset: header(letter, ORIGIN_OFFSET)?.parse().ok()?,
        };
        if origin.partition < 0 || origin.offset < 0 {
            return None;
        }
        Some((origin, letter.key()?))
    }
}

/// The keys of the letters' originals, per partition.
#[derive(Debug, Default)]
struct WantedKeys {
    partitions: HashMap<(String, i32), Wanted>,
}

/// The keys wanted of one partition, and the offset of the earliest original there.
#[derive(Debug)]
struct Wanted {
    from: i64,
    keys: HashSet<Vec<u8>>,
}

/// Per partition read and wanted key, what was found of that key.
#[derive(Debug, Default)]
struct LatestOfKeys {
    partitions: HashMap<(String, i32), HashMap<Vec<u8>, Seen>>,
}

/// What a scan found of a key on a partition.
#[derive(Debug)]
struct Seen {
    /// The offset of its last record.
    last: i64,
    /// Its last record that is none of the copies the scan was told of.
    newest_other: Option<OwnedMessage>,
}

impl WantedKeys {
    fn add(&mut self, origin: &Origin, key: &[u8]) {
        let wanted = self
            .partitions
            .entry((origin.topic.clone(), origin.partition))
            .or_insert_with(|| Wanted {
                from: origin.offset,
                keys: HashSet::new(),
            });
        wanted.from = wanted.from.min(origin.offset);
        wanted.keys.insert(key.to_vec());
    }

    /// Reads every partition from its earliest original to its end (as a `read_committed`
    /// reader sees it) and notes what it found of each wanted key, telling the records at
    /// `copies` (topic, partition, offset) apart.
    async fn scan(
        self,
        kafka: &KafkaConfig,
        copies: &HashSet<(String, i32, i64)>,
    ) -> Result<LatestOfKeys, DlqError> {
        let mut by_topic: HashMap<String, HashMap<i32, Wanted>> = HashMap::new();
        for ((topic, partition), wanted) in self.partitions {
            by_topic.entry(topic).or_default().insert(partition, wanted);
        }
        let mut latest = LatestOfKeys::default();
        for (topic, mut partitions) in by_topic {
            // Origins the topic does not have (deleted, or made again with fewer partitions)
            // are not read: their letters go back unchecked, as before there was a check.
            let existing = match partition_ids(kafka, &topic).await {
                Ok(existing) => existing,
                Err(KafkaSetupError::TopicMissing { .. }) => continue,
                Err(error) => return Err(error.into()),
            };
            partitions.retain(|partition, _| existing.contains(partition));
            let read: Vec<i32> = partitions.keys().copied().collect();
            let copies: HashSet<(i32, i64)> = copies
                .iter()
                .filter(|(of, _, _)| *of == topic)
                .map(|&(_, partition, offset)| (partition, offset))
                .collect();
            let mut found = scan_topic(kafka, &topic, partitions, copies).await?;
            for partition in read {
                let keys = found.remove(&partition).unwrap_or_default();
                latest.partitions.insert((topic.clone(), partition), keys);
            }
        }
        Ok(latest)
    }
}

/// [`WantedKeys::scan`] of one topic (a partition's end names no topic).
async fn scan_topic(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: HashMap<i32, Wanted>,
    copies: HashSet<(i32, i64)>,
) -> Result<HashMap<i32, HashMap<Vec<u8>, Seen>>, DlqError> {
    let mut config = kafka.consumer_config(&format!("{}.dlq-scan", kafka.topic_prefix));
    // After the user's options: what the check relies on. An original below the log start
    // (records deleted) reads from the start, and a record no committed reader sees is none.
    config
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    let starts = partitions
        .iter()
        .map(|(&partition, wanted)| (partition, wanted.from));
    let consumer = reader_at(config, topic, starts)?;
    let idle_timeout = kafka.request_timeout();
    let topic = topic.to_owned();
    // The consumer's calls block.
    tokio::task::spawn_blocking(move || {
        let mut latest: HashMap<i32, HashMap<Vec<u8>, Seen>> = HashMap::new();
        let mut open: HashSet<i32> = partitions.keys().copied().collect();
        let mut idle_until = std::time::Instant::now() + idle_timeout;
        while !open.is_empty() {
            if std::time::Instant::now() >= idle_until {
                return Err(DlqError::Timeout {
                    topic,
                    timeout: idle_timeout,
                });
            }
            let message = match consumer.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Ok(message)) => message,
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    open.remove(&partition);
                    idle_until = std::time::Instant::now() + idle_timeout;
                    continue;
                }
                Some(Err(cause)) => return Err(kafka_error(&topic, cause)),
            };
            // Records of a partition read to its end (written since) are no progress: a
            // busy relay must not keep a scan stuck on another partition alive for ever.
            if open.contains(&message.partition()) {
                idle_until = std::time::Instant::now() + idle_timeout;
            }
            let (Some(wanted), Some(key)) = (partitions.get(&message.partition()), message.key())
            else {
                continue;
            };
            if wanted.keys.contains(key) {
                let seen = latest
                    .entry(message.partition())
                    .or_default()
                    .entry(key.to_vec())
                    .or_insert(Seen {
                        last: message.offset(),
                        newest_other: None,
                    });
                seen.last = message.offset();
                if !copies.contains(&(message.partition(), message.offset())) {
                    seen.newest_other = Some(message.detach());
                }
            }
        }
        Ok(latest)
    })
    .await
    .expect("reading the originals' partitions panicked")
}

impl LatestOfKeys {
    /// What the scan says of the original at `origin` with `key`.
    fn verdict(&self, origin: &Origin, key: &[u8]) -> Verdict {
        let Some(keys) = self
            .partitions
            .get(&(origin.topic.clone(), origin.partition))
        else {
            return Verdict::Unchecked;
        };
        match keys.get(key).map(|seen| seen.last) {
            Some(last) if last > origin.offset => Verdict::Superseded,
            Some(last) if last == origin.offset => Verdict::Last,
            // Only older records of the key: the original itself was removed (by hand, as
            // compaction keeps the last record of a key), and nothing followed it.
            Some(_) | None => Verdict::Gone,
        }
    }
}

/// The original of a dead letter that left it out, read back from `topic` where the letter
/// says it was.
async fn read_original(
    kafka: &KafkaConfig,
    letter: &OwnedMessage,
    topic: &str,
) -> Result<OwnedMessage, DlqError> {
    let partition = header(letter, ORIGIN_PARTITION).and_then(|p| p.parse::<i32>().ok());
    let offset = header(letter, ORIGIN_OFFSET).and_then(|o| o.parse::<i64>().ok());
    let gone = |origin: String| DlqError::OriginalGone {
        dlq_partition: letter.partition(),
        dlq_offset: letter.offset(),
        origin,
    };
    let (Some(partition), Some(offset)) = (partition, offset) else {
        return Err(gone(format!("{topic} (no partition or offset given)")));
    };
    let origin = format!("{topic}[{partition}]@{offset}");
    let config = kafka.consumer_config(&format!("{}.dlq-original", kafka.topic_prefix));
    let consumer = reader_at(config, topic, [(partition, offset)])?;
    let timeout = kafka.request_timeout();
    let topic = topic.to_owned();
    // The consumer's calls block.
    let polled = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Ok(message)) => return Ok(Some(message.detach())),
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(None),
                Some(Err(cause)) => return Err(kafka_error(&topic, cause)),
            }
        }
        Err(DlqError::Timeout { topic, timeout })
    })
    .await
    .expect("reading a dead letter's original panicked")?;
    // Compaction or retention may have removed it: then the next record comes instead.
    match polled {
        Some(original) if original.offset() == offset && same_key(letter, &original) => {
            Ok(original)
        }
        _ => Err(gone(origin)),
    }
}

/// Whether `original` has the key `letter` names: the same bytes, or, for a letter that left
/// the key out, the same size.
fn same_key(letter: &OwnedMessage, original: &OwnedMessage) -> bool {
    match header(letter, KEY_LEFT_OUT) {
        Some(size) => size.parse().ok() == Some(original.key().map_or(0, <[u8]>::len)),
        None => original.key() == letter.key(),
    }
}

/// Where a [`QueueReader`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartAt {
    Beginning,
    /// The reader's group's committed offsets (the beginning where there is none).
    Committed,
}

/// Reads the dead-letter queue up to its end as it was when opened, by partition assignment
/// (no group membership, so no rebalance to wait for).
///
/// It gives up when the queue stalls: nothing read for `idle_timeout` while [`next`] waits.
/// Not after a time for the whole read: a long queue (and a replay, which sends every letter
/// between two reads) takes as long as it takes, as long as it moves.
///
/// [`next`]: QueueReader::next
struct QueueReader {
    consumer: Arc<StreamConsumer<QuietEof>>,
    topic: String,
    /// Per partition not read to the end yet: the end offset measured when opened.
    remaining: HashMap<i32, i64>,
    /// What `remaining` was when opened.
    bounds: HashMap<i32, i64>,
    idle_timeout: Duration,
}

impl QueueReader {
    /// Opens the queue at `start`, to be read up to its end now, or up to `until` (the
    /// [`bounds`](Self::bounds) of an earlier reader) where given.
    async fn open(
        kafka: &KafkaConfig,
        group: &str,
        start: StartAt,
        until: Option<HashMap<i32, i64>>,
    ) -> Result<Self, DlqError> {
        let topic = kafka.topics().book_fact_dlq;
        let partitions = match partition_ids(kafka, &topic).await {
            Err(KafkaSetupError::TopicMissing { topic }) => {
                return Err(DlqError::NoQueue { topic });
            }
            other => other?,
        };
        let mut config = kafka.consumer_config(group);
        config.set("enable.partition.eof", "true");
        let consumer: StreamConsumer<QuietEof> = config
            .create_with_context(QuietEof)
            .map_err(|cause| kafka_error(&topic, cause))?;
        let consumer = Arc::new(consumer);
        let timeout = kafka.request_timeout();
        let (ends, starts) = {
            let consumer = consumer.clone();
            let topic = topic.clone();
            tokio::task::spawn_blocking(move || {
                measure_and_place(&consumer, &topic, &partitions, start, timeout)
            })
            .await
            .expect("reading the dead-letter queue's offsets panicked")?
        };
        let ends = until.unwrap_or(ends);
        let mut assignment = TopicPartitionList::new();
        let mut remaining = HashMap::new();
        for (partition, start_offset) in starts {
            let end = ends.get(&partition).copied().unwrap_or(0);
            let already_there = matches!(start_offset, Offset::Offset(next) if next >= end);
            if already_there || end == 0 {
                continue;
            }
            assignment
                .add_partition_offset(&topic, partition, start_offset)
                .map_err(|cause| kafka_error(&topic, cause))?;
            remaining.insert(partition, end);
        }
        let bounds = remaining.clone();
        consumer
            .assign(&assignment)
            .map_err(|cause| kafka_error(&topic, cause))?;
        Ok(Self {
            consumer,
            topic,
            remaining,
            bounds,
            idle_timeout: timeout,
        })
    }

    /// The next record before the end, `None` once every partition is read to its end; an
    /// error when nothing moves for the idle timeout (no record and no partition's end).
    async fn next(&mut self) -> Result<Option<OwnedMessage>, DlqError> {
        // From now: the time the caller spent since the last record is not the queue's.
        let mut idle_until = Instant::now() + self.idle_timeout;
        loop {
            if self.remaining.is_empty() {
                return Ok(None);
            }
            let received = tokio::time::timeout_at(idle_until, self.consumer.recv())
                .await
                .map_err(|_| DlqError::Timeout {
                    topic: self.topic.clone(),
                    timeout: self.idle_timeout,
                })?;
            let message = match received {
                Ok(message) => message.detach(),
                Err(KafkaError::PartitionEOF(partition)) => {
                    if self.remaining.remove(&partition).is_some() {
                        idle_until = Instant::now() + self.idle_timeout;
                    }
                    continue;
                }
                Err(cause) => return Err(kafka_error(&self.topic, cause)),
            };
            // Records of a partition read to its end already (written since it was opened)
            // are no progress: they do not put the idle timeout off.
            let Some(&end) = self.remaining.get(&message.partition()) else {
                continue;
            };
            if message.offset() + 1 >= end {
                self.remaining.remove(&message.partition());
            }
            if message.offset() < end {
                return Ok(Some(message));
            }
        }
    }

    /// Commits the reader's group offset past `message`, synchronously.
    async fn commit_past(&self, message: &OwnedMessage) -> Result<(), DlqError> {
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(
                &self.topic,
                message.partition(),
                Offset::Offset(message.offset() + 1),
            )
            .map_err(|cause| kafka_error(&self.topic, cause))?;
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            consumer.commit(&offsets, rdkafka::consumer::CommitMode::Sync)
        })
        .await
        .expect("committing the replay offset panicked")
        .map_err(|cause| kafka_error(&self.topic, cause))
    }
}

/// A consumer of `config` assigned `topic` at each `(partition, offset)`, that reports the end
/// of each partition.
fn reader_at(
    mut config: rdkafka::ClientConfig,
    topic: &str,
    starts: impl IntoIterator<Item = (i32, i64)>,
) -> Result<BaseConsumer<QuietEof>, DlqError> {
    config.set("enable.partition.eof", "true");
    let consumer: BaseConsumer<QuietEof> = config
        .create_with_context(QuietEof)
        .map_err(|cause| kafka_error(topic, cause))?;
    let mut assignment = TopicPartitionList::new();
    for (partition, offset) in starts {
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(|cause| kafka_error(topic, cause))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|cause| kafka_error(topic, cause))?;
    Ok(consumer)
}

/// The partitions of `topic`.
pub(crate) async fn partition_ids(
    kafka: &KafkaConfig,
    topic: &str,
) -> Result<Vec<i32>, KafkaSetupError> {
    let metadata = kafka.fetch_metadata(Some(topic)).await?;
    partition_ids_in(&metadata, topic).ok_or_else(|| KafkaSetupError::TopicMissing {
        topic: topic.to_owned(),
    })
}

type Placement = (HashMap<i32, i64>, Vec<(i32, Offset)>);

/// The end offset of every partition, and where to start reading each (blocking calls).
fn measure_and_place(
    consumer: &StreamConsumer<QuietEof>,
    topic: &str,
    partitions: &[i32],
    start: StartAt,
    timeout: Duration,
) -> Result<Placement, DlqError> {
    let mut ends = HashMap::new();
    for &partition in partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|cause| kafka_error(topic, cause))?;
        ends.insert(partition, high);
    }
    let starts = match start {
        StartAt::Beginning => partitions
            .iter()
            .map(|&partition| (partition, Offset::Beginning))
            .collect(),
        StartAt::Committed => {
            let mut wanted = TopicPartitionList::new();
            for &partition in partitions {
                wanted.add_partition(topic, partition);
            }
            let committed = consumer
                .committed_offsets(wanted, timeout)
                .map_err(|cause| kafka_error(topic, cause))?;
            committed
                .elements()
                .iter()
                .map(|element| match element.offset() {
                    Offset::Offset(next) => (element.partition(), Offset::Offset(next)),
                    _ => (element.partition(), Offset::Beginning),
                })
                .collect()
        }
    };
    Ok((ends, starts))
}

/// A producer whose sends fail in bounded time (see
/// [`KafkaConfig::dead_letter_producer_config`]).
fn dead_letter_producer(kafka: &KafkaConfig) -> Result<FutureProducer, KafkaSetupError> {
    kafka
        .dead_letter_producer_config()
        .create()
        .map_err(|source| KafkaSetupError::Client {
            bootstrap_servers: kafka.bootstrap_servers.clone(),
            source,
        })
}

fn kafka_error(topic: &str, cause: KafkaError) -> DlqError {
    DlqError::Kafka {
        topic: topic.to_owned(),
        cause,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_reason_is_kept_whole() {
        let reason = "x".repeat(REASON_LIMIT);
        assert_eq!(bounded_reason(reason.clone()), reason);
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary_and_says_how_much_was_cut() {
        // Three-byte characters: the limit falls inside one of them.
        let reason = format!("the key {:?} is not a book id", "€".repeat(300_000));
        let bounded = bounded_reason(reason.clone());
        let (kept, note) = bounded.split_once('…').expect("a note of what was cut");
        assert!(
            kept.len() <= REASON_LIMIT && kept.len() > REASON_LIMIT - 4,
            "{kept}"
        );
        assert!(reason.starts_with(kept));
        assert_eq!(note, format!(" ({} bytes more)", reason.len() - kept.len()));
    }

    #[test]
    fn a_dead_letter_unacknowledged_for_twice_the_request_timeout_fails() {
        let mut kafka = KafkaConfig::new("127.0.0.1:9092");
        kafka.request_timeout_ms = 10_000;
        let config = kafka.dead_letter_producer_config();
        assert_eq!(config.get("message.timeout.ms"), Some("20000"));
        assert_eq!(config.get("acks"), Some("all"));
        kafka.client_options = vec![crate::config::ClientOptions(vec![(
            "message.timeout.ms".to_owned(),
            "90000".to_owned(),
        )])];
        let overridden = kafka.dead_letter_producer_config();
        assert_eq!(overridden.get("message.timeout.ms"), Some("90000"));
    }
}
