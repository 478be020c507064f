//! `taga`: the tagger answering as version A (see `tagger`).

use natsfn_guest::{Guest, HandleResult, Message};

struct TagA;

impl Guest for TagA {
    fn handle(msg: Message) -> HandleResult {
        tagger::handle(msg, "A")
    }
}

natsfn_guest::export_handler!(TagA);
