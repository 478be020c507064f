//! `mirror-bare`: `mirror` built without the standard library. It behaves
//! the same (the payload back when the message asks for a reply, otherwise
//! nothing); the benchmarks compare the two to show what a guest's shape
//! costs per fresh instance (BENCHMARKS.md, "Bare guests").

#![no_std]

use natsfn_guest::{Guest, HandleResult, Message, Reply};
// Links the allocator, panic handler and `cabi_realloc`.
use natsfn_guest_bare as _;

extern crate alloc;

struct MirrorBare;

impl Guest for MirrorBare {
    fn handle(msg: Message) -> HandleResult {
        Ok(msg.reply.map(|_| Reply { headers: alloc::vec::Vec::new(), payload: msg.payload }))
    }
}

natsfn_guest::export_handler!(MirrorBare);
