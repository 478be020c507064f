//! `jsworker`: the shape of a typical JetStream worker. It stores a result
//! with `jetstream-publish` (deduplicated by a message id derived from the
//! input's stream position, so a redelivery cannot write twice), then acks
//! explicitly. The result's `source-*` headers carry the input's delivery
//! data as the guest saw it.
//!
//! Config: `results` (subject to store results under, default `results`),
//! `retry_first_delivery` (when "true", asks for a retry after writing on the
//! first delivery: a crash after the write, as far as the stream can tell).
//! On a core message it tries to ack anyway and replies with the error, so
//! tests can see that acks on core messages fail cleanly.

use natsfn_guest::{acks, config_or, describe, fail, messaging, Guest, HandleResult, HandlerError, Message};

struct JsWorker;

impl Guest for JsWorker {
    fn handle(msg: Message) -> HandleResult {
        let Some(meta) = &msg.jetstream else {
            let answer = match acks::ack() {
                Ok(()) => "acked".to_string(),
                Err(e) => describe(&e),
            };
            return natsfn_guest::reply(answer);
        };
        let id = format!("{}-{}", meta.stream, meta.stream_sequence);
        let headers = vec![
            ("source-seq".to_string(), meta.stream_sequence.to_string()),
            ("source-stream".to_string(), meta.stream.clone()),
            ("source-consumer".to_string(), meta.consumer.clone()),
            ("source-consumer-seq".to_string(), meta.consumer_sequence.to_string()),
            ("source-delivered".to_string(), meta.delivered.to_string()),
            ("source-pending".to_string(), meta.pending.to_string()),
            ("source-stored-ns".to_string(), meta.timestamp_ns.to_string()),
        ];
        messaging::jetstream_publish(&config_or("results", "results"), &headers, &msg.payload, Some(&id))
            .map_err(|e| fail(&e))?;
        if meta.delivered == 1 && config_or("retry_first_delivery", "false") == "true" {
            return Err(HandlerError::Retry(Some(10)));
        }
        acks::ack().map_err(|e| fail(&e))?;
        Ok(None)
    }
}

natsfn_guest::export_handler!(JsWorker);
