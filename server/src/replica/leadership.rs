//! Keeping the leadership: renewed every third of its TTL on a thread of its own, given up at
//! once when the replica steps down.

use super::redis::{self, Redis};
use crate::clock::Clock;
use std::time::Duration;
use tokio::sync::watch;

/// Renews the leadership every third of its TTL, on a thread of its own (so a stalled call
/// elsewhere cannot let it lapse unnoticed), and says when it is lost.
pub struct Renewal {
    lost: watch::Receiver<Option<String>>,
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Renewal {
    pub fn start(redis: Redis, value: String, ttl: Duration) -> Self {
        let (lost_tx, lost) = watch::channel(None);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("keylease-leadership".into())
            .spawn(move || {
                let every = ttl / 3;
                let mut connection = None;
                let mut held_until = Clock::system().now_ms() + ttl.as_millis() as u64;
                loop {
                    match stopped.recv_timeout(every) {
                        Ok(()) => {
                            if let Ok(mut c) = connection.take().map_or_else(|| redis.connect(), Ok)
                            {
                                let _ = redis::resign_leadership(&redis, &mut c, &value);
                            }
                            return;
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    }
                    // A test's failpoint holds this leader, as a long pause would.
                    if redis::frozen() {
                        continue;
                    }
                    let sent_at = Clock::system().now_ms();
                    let renewed = connection
                        .take()
                        .map_or_else(|| redis.connect(), Ok)
                        .and_then(|mut c| {
                            let renewed = redis::renew_leadership(&redis, &mut c, &value, ttl);
                            connection = Some(c);
                            renewed
                        });
                    match renewed {
                        Ok(true) => held_until = sent_at + ttl.as_millis() as u64,
                        Ok(false) => {
                            lost_tx
                                .send_replace(Some("another replica holds the leadership".into()));
                            return;
                        }
                        Err(error) => {
                            connection = None;
                            if Clock::system().now_ms() + (every.as_millis() as u64) >= held_until {
                                lost_tx.send_replace(Some(format!(
                                    "the leadership could not be renewed: {error}"
                                )));
                                return;
                            }
                        }
                    }
                }
            })
            .expect("the leadership thread starts");
        Self { lost, stop, thread }
    }

    /// Resolves with the reason once the leadership is lost.
    pub async fn lost(&self) -> String {
        let mut lost = self.lost.clone();
        match lost.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the leadership thread stopped".into(),
        }
    }

    /// Gives the leadership up at once, so another replica takes it without waiting.
    pub fn resign(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
