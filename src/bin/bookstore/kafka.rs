//! `bookstore kafka check|provision`.

use anyhow::Result;
use bookstore::cli::KafkaCommand;
use bookstore::config::KafkaConfig;
use bookstore::kafka::provision_topics;

pub async fn run(config: &KafkaConfig, command: KafkaCommand) -> Result<()> {
    match command {
        KafkaCommand::Check => {
            let brokers = config.check_reachable().await?;
            println!(
                "Kafka at {} answers: {brokers} broker(s)",
                config.bootstrap_servers
            );
        }
        KafkaCommand::Provision => {
            let specs = config
                .topics()
                .specs(config.partitions, config.replication_factor);
            for (topic, status) in provision_topics(config, &specs).await? {
                println!("{topic}: {status:?}");
            }
        }
    }
    Ok(())
}
