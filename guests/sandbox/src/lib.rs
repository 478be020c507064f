//! `sandbox`: tries the usual ways out of a WASI sandbox (files, environment,
//! sockets) and reports what worked, so tests can prove the host grants none.

use natsfn_guest::{Guest, HandleResult, Message};

struct Sandbox;

fn outcome<T, E>(r: Result<T, E>) -> &'static str {
    if r.is_ok() {
        "ok"
    } else {
        "err"
    }
}

impl Guest for Sandbox {
    fn handle(_msg: Message) -> HandleResult {
        let fs_read = outcome(std::fs::read("/etc/passwd"));
        let fs_dir = outcome(std::fs::read_dir("/"));
        let env = std::env::vars().count();
        // std::net is backed by wasi:sockets on wasm32-wasip2, so this is a
        // real connect attempt the host has to refuse.
        let net = outcome(std::net::TcpStream::connect("127.0.0.1:4222"));
        natsfn_guest::reply(format!("fs-read={fs_read}\nfs-dir={fs_dir}\nenv={env}\nnet={net}"))
    }
}

natsfn_guest::export_handler!(Sandbox);
