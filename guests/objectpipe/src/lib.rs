//! `objectpipe`: streams the object named in the payload from bucket
//! `source` to bucket `target` through a reader and a writer, transforming
//! it chunk by chunk (ASCII lowercase to uppercase), so objects far larger
//! than this guest's memory pass through. Replies `<size> <digest>`.

use natsfn_guest::{config_or, fail, object, Guest, HandleResult, Message};

/// Small enough to keep the guest's memory flat, large enough that call
/// overhead does not matter.
const CHUNK: u32 = 256 * 1024;

struct ObjectPipe;

impl Guest for ObjectPipe {
    fn handle(msg: Message) -> HandleResult {
        let name = String::from_utf8_lossy(&msg.payload).into_owned();
        let reader = object::open_reader(&config_or("source", "source"), &name).map_err(|e| fail(&e))?;
        let writer = object::open_writer(&config_or("target", "target"), &name).map_err(|e| fail(&e))?;
        loop {
            let mut chunk = reader.read(CHUNK).map_err(|e| fail(&e))?;
            if chunk.is_empty() {
                break;
            }
            chunk.make_ascii_uppercase();
            writer.write(&chunk).map_err(|e| fail(&e))?;
        }
        let info = writer.finish().map_err(|e| fail(&e))?;
        natsfn_guest::reply(format!("{} {}", info.size, info.digest.unwrap_or_default()))
    }
}

natsfn_guest::export_handler!(ObjectPipe);
