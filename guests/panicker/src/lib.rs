//! `panicker`: traps on demand, to test that a panic or abort in one
//! invocation is reported and doesn't take the host or later messages down.

use natsfn_guest::{Guest, HandleResult, Message};

struct Panicker;

impl Guest for Panicker {
    fn handle(msg: Message) -> HandleResult {
        match msg.payload.as_slice() {
            b"panic" => panic!("panicker was asked to panic"),
            b"abort" => std::process::abort(),
            _ => natsfn_guest::reply("ok"),
        }
    }
}

natsfn_guest::export_handler!(Panicker);
