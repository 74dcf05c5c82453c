//! Graceful shutdown as a value: every long-running task gets a [`Shutdown`] and selects on it
//! next to its work, finishing (or safely abandoning) what is in flight when it fires.

use tokio::sync::watch;
use tracing::{info, warn};

/// The exit code of a process ended by a second Ctrl-C or SIGTERM: 128 + SIGINT, as a shell
/// reports a process that Ctrl-C ended.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Fires the shutdown of every [`Shutdown`] made from it.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Tells a task that it should stop. Cheap to clone; one per task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl ShutdownTrigger {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (sender, receiver) = watch::channel(false);
        (ShutdownTrigger(sender), Shutdown(receiver))
    }

    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// Triggers on Ctrl-C or SIGTERM (whichever comes first) from a background task; a second
    /// one ends the process at once with [`FORCED_EXIT_CODE`].
    ///
    /// Once a handler is installed the signals no longer end the process by themselves, so
    /// without the second step an operator who did not want to wait out the stop's grace
    /// periods (seconds each, for in-flight batches, requests and the lease) would have only
    /// SIGKILL. Ending there is safe for the same reason a crash is: nothing is acknowledged
    /// before it is committed, and what was in flight is read again by the next run.
    pub fn on_signals(&self) {
        let trigger = self.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!(
                "shutdown requested; finishing in-flight work (a second Ctrl-C or SIGTERM ends the process at once)"
            );
            trigger.trigger();
            wait_for_signal().await;
            warn!("second shutdown request; exiting without finishing in-flight work");
            std::process::exit(FORCED_EXIT_CODE);
        });
    }
}

impl Shutdown {
    /// A shutdown that never fires, for callers without one.
    pub fn never() -> Shutdown {
        let (sender, receiver) = watch::channel(false);
        // Keeping the sender alive keeps `wait` pending forever.
        std::mem::forget(sender);
        Shutdown(receiver)
    }

    /// Whether the task should stop: shutdown was triggered, or every trigger is gone (as
    /// for [`wait`](Self::wait): nobody can ask to stop any more).
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Completes once shutdown was triggered (at once if it already was).
    pub async fn wait(&mut self) {
        // An error means every trigger is gone: nobody can ask to stop any more, so treat it
        // as a request to stop rather than waiting forever.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Returns when Ctrl-C or SIGTERM arrives.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_shutdown_fires_when_triggered_or_when_every_trigger_is_gone() {
        let (trigger, mut shutdown) = ShutdownTrigger::new();
        let copy = trigger.clone();
        assert!(!shutdown.is_triggered());
        drop(copy);
        assert!(!shutdown.is_triggered(), "one trigger is left");
        trigger.trigger();
        assert!(shutdown.is_triggered());
        shutdown.wait().await;

        let (trigger, mut shutdown) = ShutdownTrigger::new();
        drop(trigger);
        assert!(shutdown.is_triggered());
        tokio::time::timeout(Duration::from_secs(1), shutdown.wait())
            .await
            .expect("wait did not return once every trigger was gone");

        let never = Shutdown::never();
        assert!(!never.is_triggered());
    }
}
