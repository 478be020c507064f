//! `flaky`: fails the first `fail_times` deliveries of every message (by the
//! JetStream delivered count), asking for a retry after `retry_ms` (none:
//! immediate), then succeeds. Each attempt is announced on `attempts_to`
//! (default `flaky.attempts`) with the delivered count in the payload, so
//! tests can see when redeliveries happen.

use natsfn_guest::{config, config_or, messaging, Guest, HandleResult, HandlerError, Message};

struct Flaky;

impl Guest for Flaky {
    fn handle(msg: Message) -> HandleResult {
        let delivered = msg.jetstream.as_ref().map_or(1, |m| m.delivered);
        let seq = msg.jetstream.as_ref().map_or(0, |m| m.stream_sequence);
        let fail_times: u64 = config_or("fail_times", "2").parse().unwrap_or(2);
        // Best effort: the announcement is for observers, not the outcome.
        let _ = messaging::publish(
            &config_or("attempts_to", "flaky.attempts"),
            &[("seq".to_string(), seq.to_string())],
            delivered.to_string().as_bytes(),
        );
        if delivered <= fail_times {
            let delay = config::get("retry_ms").and_then(|v| v.parse().ok());
            return Err(HandlerError::Retry(delay));
        }
        Ok(None)
    }
}

natsfn_guest::export_handler!(Flaky);
