//! `mirror`: the least a handler can do. It sends the payload back when the
//! message asks for a reply and otherwise does nothing, so the benchmarks
//! measure what natsfn itself costs per message (instantiate, call, reply or
//! settle) against a native echo doing the same.

use natsfn_guest::{Guest, HandleResult, Message, Reply};

struct Mirror;

impl Guest for Mirror {
    fn handle(msg: Message) -> HandleResult {
        Ok(msg.reply.map(|_| Reply { headers: Vec::new(), payload: msg.payload }))
    }
}

natsfn_guest::export_handler!(Mirror);
