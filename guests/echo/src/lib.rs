//! `echo`: replies with the request unchanged, plus headers that let tests
//! see which subject was delivered and whether the instance was reused (the
//! host promises a fresh instance per message unless the manifest opts into
//! reuse, so the count is 1 by default). The payload `natsfn:trap` makes it
//! panic, for tests that need a trapped instance.

use std::sync::atomic::{AtomicU32, Ordering};

use natsfn_guest::{Guest, HandleResult, Message, Reply};

/// Lives as long as the instance, so it counts calls per instance.
static CALLS: AtomicU32 = AtomicU32::new(0);

struct Echo;

impl Guest for Echo {
    fn handle(msg: Message) -> HandleResult {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        if msg.payload == b"natsfn:trap" {
            panic!("asked to trap after {calls} calls");
        }
        let mut headers = msg.headers;
        headers.push(("x-natsfn-calls".to_string(), calls.to_string()));
        headers.push(("x-natsfn-subject".to_string(), msg.subject));
        Ok(Some(Reply { headers, payload: msg.payload }))
    }
}

natsfn_guest::export_handler!(Echo);
