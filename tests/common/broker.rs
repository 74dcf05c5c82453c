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
        let [port, controller_port] = super::free_local_ports();
        Self {
            state: tempfile::tempdir().unwrap(),
            port,
            controller_port,
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
    /// (`kafka.sh hanging-transactions`, see the README, "Hanging transactions"), and ends
    /// those of one producer if `end` says so; returns what it printed of each one it found
    /// (`hanging: …`, with its coordinator's view) and did (`aborted …`, `committed …`,
    /// `could not …`, `ended meanwhile …`, `no hanging transaction of producer …`).
    #[allow(dead_code)] // Used by some of the test crates that include this module.
    pub async fn hanging_transactions(
        &self,
        min_age: std::time::Duration,
        end: Option<(EndHanging, u64)>,
    ) -> Vec<String> {
        let min_age = min_age.as_millis().to_string();
        let end = end.map(|(how, producer)| {
            let flag = match how {
                EndHanging::Abort => "--abort-producer",
                EndHanging::Commit => "--commit-producer",
            };
            (flag, producer.to_string())
        });
        let mut args = vec!["hanging-transactions", min_age.as_str()];
        if let Some((flag, producer)) = &end {
            args.extend([*flag, producer.as_str()]);
        }
        // Exit status 3: a commit could not be made, which its lines say.
        self.script_output(&args, &[0, 3])
            .await
            .lines()
            .filter(|line| {
                [
                    "hanging: ",
                    "aborted ",
                    "committed ",
                    "could not ",
                    "ended meanwhile ",
                    "no hanging transaction of producer ",
                ]
                .iter()
                .any(|prefix| line.starts_with(prefix))
            })
            .map(str::to_owned)
            .collect()
    }

    /// Runs `kafka.sh` with `args` and returns what it printed, failing unless it exited with
    /// one of `statuses`.
    #[allow(dead_code)] // Used by some of the test crates that include this module.
    async fn script_output(&self, args: &[&str], statuses: &[i32]) -> String {
        let output = tokio::process::Command::from(self.script(args))
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output
                .status
                .code()
                .is_some_and(|code| statuses.contains(&code)),
            "kafka.sh {} failed ({}): {stdout}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Leaves a transaction of `transactional_id` open on `topic`'s `partition`, holding one
    /// record with `value`, that its coordinator knows nothing of (`kafka.sh
    /// orphan-transaction`): the state a lost marker leaves. Returns its producer id.
    #[allow(dead_code)] // Used by some of the test crates that include this module.
    pub async fn orphan_transaction(
        &self,
        topic: &str,
        partition: i32,
        transactional_id: &str,
        value: &str,
    ) -> u64 {
        let partition = partition.to_string();
        let args = [
            "orphan-transaction",
            topic,
            &partition,
            transactional_id,
            value,
        ];
        let stdout = self.script_output(&args, &[0]).await;
        // "orphan: <topic>-<partition> producer <id> epoch <epoch> at offset <offset>"
        stdout
            .lines()
            .find_map(|line| line.strip_prefix("orphan: "))
            .and_then(|line| line.split(" producer ").nth(1))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no producer id in {stdout}"))
    }
}

/// How `kafka.sh hanging-transactions` ends one producer's hanging transactions.
#[allow(dead_code)] // Used by some of the test crates that include this module.
#[derive(Debug, Clone, Copy)]
pub enum EndHanging {
    /// With an abort marker: for a transaction its producer never committed.
    Abort,
    /// As committed: for one whose commit Kafka accepted but never marked.
    Commit,
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.script(&["stop"]).stdout(Stdio::null()).status();
    }
}
