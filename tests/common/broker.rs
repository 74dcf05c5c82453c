//! A Kafka broker of one test's own, for tests that stop and start it (the shared broker must
//! stay up for everyone else), run with the same script developers use.

use std::path::Path;
use std::process::Stdio;

/// A single-node KRaft broker on free ports with state in a temporary folder; stopped on drop.
pub struct PrivateBroker {
    state: tempfile::TempDir,
    port: u16,
    controller_port: u16,
}

impl PrivateBroker {
    /// `kafka.sh <args>` for this broker.
    fn script(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new("bash");
        command
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kafka/kafka.sh"))
            .args(args)
            .env("BOOKSTORE_STATE_DIR", self.state.path())
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_CONTROLLER_PORT", self.controller_port.to_string());
        command
    }

    pub async fn run(&self, action: &str) {
        let status = tokio::process::Command::from(self.script(&[action]))
            .stdout(Stdio::null())
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kafka.sh {action} failed");
    }

    pub async fn start() -> Self {
        let broker = Self::not_started();
        broker.run("start").await;
        broker
    }

    /// Ports and a folder, but no broker yet: `run("start")` starts it.
    pub fn not_started() -> Self {
        Self {
            state: tempfile::tempdir().unwrap(),
            port: super::free_local_port(),
            controller_port: super::free_local_port(),
        }
    }

    /// The broker's own logs (`server.log` and the rest).
    #[allow(dead_code)] // Used by some of the test crates that include this module.
    pub fn logs(&self) -> std::path::PathBuf {
        self.state.path().join("kafka/logs")
    }

    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Lists the broker's hanging transactions whose last write is at least `min_age` old
    /// (`kafka.sh hanging-transactions`, see the README, "Hanging transactions"), and aborts
    /// those of producer `abort` if given; returns what it printed of each one it found
    /// (`hanging: …`, with its coordinator's view) and did (`aborted …`, `could not abort …`,
    /// `ended meanwhile …`).
    #[allow(dead_code)] // Used by some of the test crates that include this module.
    pub async fn hanging_transactions(
        &self,
        min_age: std::time::Duration,
        abort: Option<u64>,
    ) -> Vec<String> {
        let min_age = min_age.as_millis().to_string();
        let producer = abort.map(|producer| producer.to_string());
        let mut args = vec!["hanging-transactions", min_age.as_str()];
        if let Some(producer) = &producer {
            args.extend(["--abort-producer", producer.as_str()]);
        }
        let output = tokio::process::Command::from(self.script(&args))
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "kafka.sh hanging-transactions failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
            .lines()
            .filter(|line| {
                [
                    "hanging: ",
                    "aborted ",
                    "could not abort ",
                    "ended meanwhile ",
                ]
                .iter()
                .any(|prefix| line.starts_with(prefix))
            })
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.script(&["stop"]).stdout(Stdio::null()).status();
    }
}
