//! `relay`: forwards each message as a request to config `upstream` and
//! replies with the answer, to test outbound requests, their timeouts and the
//! request permission list. Errors are replied rather than returned so tests
//! can read which error the host produced.

use natsfn_guest::{config, describe, messaging, Guest, HandleResult, HandlerError, Message};

const DEFAULT_TIMEOUT_MS: u32 = 1000;

struct Relay;

impl Guest for Relay {
    fn handle(msg: Message) -> HandleResult {
        let upstream =
            config::get("upstream").ok_or_else(|| HandlerError::Fail("config key upstream is not set".to_string()))?;
        let timeout_ms = config::get("timeout_ms").and_then(|v| v.trim().parse().ok()).unwrap_or(DEFAULT_TIMEOUT_MS);
        match messaging::request(&upstream, &msg.headers, &msg.payload, timeout_ms) {
            Ok(answer) => natsfn_guest::reply(answer.payload),
            Err(err) => natsfn_guest::reply(format!("error: {}", describe(&err))),
        }
    }
}

natsfn_guest::export_handler!(Relay);
