//! `tagger`: the body of the `taga` and `tagb` guests, two builds that
//! differ only in their tag, so reload tests can swap one component for the
//! other and see which version handled each message.
//!
//! A core request is answered `<tag>:<payload>`. A JetStream message is
//! republished to config `out` (default `tagged.out`) with a `tag` header,
//! then acked by the host.

use natsfn_guest::{config_or, fail, messaging, HandleResult, Message};

/// Handles `msg` as the version named `tag`.
pub fn handle(msg: Message, tag: &str) -> HandleResult {
    if msg.jetstream.is_some() {
        let headers = vec![("tag".to_string(), tag.to_string())];
        messaging::publish(&config_or("out", "tagged.out"), &headers, &msg.payload).map_err(|e| fail(&e))?;
        return Ok(None);
    }
    let mut answer = format!("{tag}:").into_bytes();
    answer.extend_from_slice(&msg.payload);
    natsfn_guest::reply(answer)
}
