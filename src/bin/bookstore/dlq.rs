//! `bookstore dlq list|replay`: the fact records the projection could not apply.

use anyhow::{Result, bail};
use bookstore::cli::DlqCommand;
use bookstore::config::KafkaConfig;
use bookstore::projection::{list_dead_letters, replay_dead_letters};
use bookstore::shutdown::{Shutdown, ShutdownTrigger};

pub async fn run(
    kafka: &KafkaConfig,
    command: DlqCommand,
    (_trigger, stop): (ShutdownTrigger, Shutdown),
) -> Result<()> {
    match command {
        DlqCommand::List(args) => {
            // Only reads: a stop ends it where it stands.
            let mut stopped = stop.clone();
            let letters = tokio::select! {
                letters = list_dead_letters(kafka) => letters?,
                () = stopped.wait() => bail!("interrupted"),
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
                return Ok(());
            }
            for letter in &letters {
                let origin = match (&letter.topic, letter.partition, letter.offset) {
                    (Some(topic), Some(partition), Some(offset)) => {
                        format!("{topic}[{partition}]@{offset}")
                    }
                    _ => "unknown origin".to_owned(),
                };
                let left_out = match (letter.left_out, letter.value_bytes) {
                    (true, Some(bytes)) => format!(" (too large to carry: {bytes} bytes left out)"),
                    (true, None) => " (too large to carry: left out)".to_owned(),
                    (false, _) => String::new(),
                };
                let key = match (&letter.key, letter.key_left_out) {
                    (Some(key), _) => printable(key),
                    (None, Some(bytes)) => format!("({bytes} bytes left out)"),
                    (None, None) => "-".to_owned(),
                };
                println!(
                    "{:>6}  {origin}  key {key}: {}{left_out}",
                    letter.dlq_offset,
                    printable(&letter.reason)
                );
            }
            eprintln!(
                "{} dead letter(s) on {}",
                letters.len(),
                kafka.topics().book_fact_dlq
            );
        }
        DlqCommand::Replay => {
            // A stop ends the replay between two letters, and what it sent back is settled
            // first: dropped at once, a letter could stay behind a newer record of its book.
            let report = replay_dead_letters(kafka, &stop).await?;
            let mut topics: Vec<_> = report.replayed.iter().collect();
            topics.sort();
            for (topic, count) in topics {
                println!("{topic}: {count} replayed");
            }
            println!("replayed {} dead letter(s)", report.total());
            if report.superseded > 0 {
                println!(
                    "skipped {} dead letter(s) whose book has a later record on the topic",
                    report.superseded
                );
            }
            if report.gone > 0 {
                println!(
                    "skipped {} dead letter(s) whose original and book are no longer on the topic",
                    report.gone
                );
            }
            if report.resent_newer > 0 {
                println!(
                    "sent {} record(s) that arrived during the replay again after the letters \
                     of their book, so that the newest stays last",
                    report.resent_newer
                );
            }
            if report.interrupted {
                bail!("interrupted; the next `dlq replay` goes on from there");
            }
        }
    }
    Ok(())
}

/// `text` with its control characters escaped (`\u{1b}`): a key or a reason holds whatever was
/// written to the topics, and a terminal acts on escape sequences.
fn printable(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_shown_escaped_and_the_rest_as_it_is() {
        assert_eq!(printable("\u{1b}[2Jkey\n"), "\\u{1b}[2Jkey\\n");
        assert_eq!(
            printable("the key \"Größe\" is not a book id"),
            "the key \"Größe\" is not a book id"
        );
    }
}
