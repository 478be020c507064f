//! `greeter`: exercises config, structured logging and the guest's
//! stdout/stderr, so tests can check each of those reaches the host.

use natsfn_guest::log::{self, Level};
use natsfn_guest::{Guest, HandleResult, Message};

struct Greeter;

impl Guest for Greeter {
    fn handle(msg: Message) -> HandleResult {
        let greeting = natsfn_guest::config_or("greeting", "Hello");
        let name = String::from_utf8_lossy(&msg.payload);
        log::log(Level::Info, &format!("greeting {name}"));
        println!("greeter stdout: {name}");
        eprintln!("greeter stderr: {name}");
        natsfn_guest::reply(format!("{greeting}, {name}!"))
    }
}

natsfn_guest::export_handler!(Greeter);
