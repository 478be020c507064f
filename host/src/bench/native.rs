//! The baseline: what a developer would write with async-nats alone to do
//! the same work as the handler, in the same process, on its own
//! connection.
//!
//! - core messages: one task reading the subscription, replying with the
//!   payload when the message asks for a reply, and publishing it to the
//!   scenario's output subject when there is one;
//! - JetStream: a durable pull consumer (`natsfn-bench-native`) acking each
//!   message as it arrives.
//!
//! For a user's own handler this is the floor natsfn is compared with: an
//! echo (or ack) that does no work of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use futures::StreamExt;

use super::load::{self, Progress};
use super::{BenchError, Mode, Scenario};

/// The durable the native side consumes a stream with.
const DURABLE: &str = "natsfn-bench-native";

/// A running native handler.
pub(crate) struct Native {
    client: async_nats::Client,
    task: tokio::task::JoinHandle<()>,
    count: Arc<AtomicU64>,
    stream: Option<String>,
}

impl Native {
    /// Subscribes (or creates the consumer) and starts handling.
    pub(crate) async fn start(url: &str, scenario: &Scenario) -> Result<Native, BenchError> {
        let client = load::connect(url).await?;
        let count = Arc::new(AtomicU64::new(0));
        let done = count.clone();
        let (task, stream) = match &scenario.mode {
            Mode::JetStream { stream } => {
                let js = async_nats::jetstream::new(client.clone());
                let s = js
                    .get_stream(stream)
                    .await
                    .map_err(|e| BenchError::Nats { context: format!("open stream {stream}"), source: e.into() })?;
                let config = pull::Config {
                    durable_name: Some(DURABLE.into()),
                    ack_policy: AckPolicy::Explicit,
                    ..Default::default()
                };
                let consumer = s.create_consumer(config).await.map_err(|e| BenchError::Nats {
                    context: format!("create consumer on {stream}"),
                    source: e.into(),
                })?;
                let mut messages = consumer
                    .stream()
                    .max_messages_per_batch(super::NATIVE_JETSTREAM_WINDOW)
                    .messages()
                    .await
                    .map_err(|e| BenchError::Nats { context: format!("consume {stream}"), source: e.into() })?;
                let task = tokio::spawn(async move {
                    while let Some(Ok(m)) = messages.next().await {
                        if m.ack().await.is_err() {
                            break;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                });
                (task, Some(stream.clone()))
            }
            Mode::Publish | Mode::Request => {
                let subject = scenario.subject.clone();
                let mut sub = client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| BenchError::Nats { context: format!("subscribe to {subject}"), source: e.into() })?;
                let output = scenario.output.clone().map(async_nats::Subject::from);
                let nats = client.clone();
                let task = tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        if let Some(reply) = msg.reply {
                            let _ = nats.publish(reply, msg.payload.clone()).await;
                        }
                        if let Some(out) = &output {
                            let _ = nats.publish(out.clone(), msg.payload).await;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                });
                (task, None)
            }
        };
        load::flush(&client).await?;
        Ok(Native { client, task, count, stream })
    }

    /// How many messages it has finished.
    pub(crate) fn progress(&self) -> Progress {
        let count = self.count.clone();
        Arc::new(move || count.load(Ordering::Relaxed))
    }

    /// Stops handling and removes the durable it created.
    pub(crate) async fn stop(self) {
        self.task.abort();
        if let Some(stream) = &self.stream {
            let js = async_nats::jetstream::new(self.client.clone());
            if let Ok(s) = js.get_stream(stream).await {
                let _ = s.delete_consumer(DURABLE).await;
            }
        }
        let _ = self.client.drain().await;
    }
}
