//! `tagb`: the tagger answering as version B (see `tagger`).

use natsfn_guest::{Guest, HandleResult, Message};

struct TagB;

impl Guest for TagB {
    fn handle(msg: Message) -> HandleResult {
        tagger::handle(msg, "B")
    }
}

natsfn_guest::export_handler!(TagB);
