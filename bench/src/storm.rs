//! The load generator: loopback connection storms inside a private network
//! namespace, bounded in count and in time.
use std::{
    fs::File,
    io::{self, Read as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use nix::sched::{CloneFlags, setns};

use tcptrace_lab::netns::Netns;

/// Port of the accept storm's listener; nothing listens on the refused
/// storm's port.
const LISTEN_PORT: u16 = 5000;
const REFUSED_PORT: u16 = 5001;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storm {
    /// connect + accept + close (server first), both ends in the namespace.
    Accept,
    /// connect to a port nobody listens on: SYN, RST, ECONNREFUSED.
    Refused,
}

impl Storm {
    pub fn name(self) -> &'static str {
        match self {
            Storm::Accept => "accept",
            Storm::Refused => "refused",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    /// Connections that ended as the storm intends (accepted / refused).
    pub ok: u64,
    /// Any other result (e.g. EADDRNOTAVAIL), not counted in `ok`.
    pub errors: u64,
    pub elapsed: Duration,
    /// The time limit or an interrupt ended the storm before `count`.
    pub cut_short: bool,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `count` connections from `clients` threads, at most `limit` long;
/// `stop` (Ctrl-C) ends it early.
pub fn run(
    ns: &Netns,
    storm: Storm,
    count: u64,
    clients: usize,
    limit: Duration,
    stop: &'static AtomicBool,
) -> Result<Outcome> {
    let addr = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = match storm {
        Storm::Accept => Some(
            ns.run("bench-listen", move || TcpListener::bind(addr(LISTEN_PORT)))?
                .context("listening in the namespace")?,
        ),
        Storm::Refused => None,
    };
    let accepted = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // One acceptor per client: the server side keeps pace, and each client
    // waits for the server's close, so the accept queue never overflows
    // (an overflow would turn into 1 s SYN retransmits).
    let mut acceptors = Vec::new();
    if let Some(l) = listener {
        for _ in 0..clients {
            let l = l.try_clone().context("sharing the listener")?;
            let accepted = accepted.clone();
            let done = done.clone();
            acceptors.push(thread::spawn(move || {
                for s in l.incoming() {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    if s.is_ok() {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    // The accepted socket closes here, server side first.
                }
            }));
        }
    }
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(clients + 1));
    let port = match storm {
        Storm::Accept => LISTEN_PORT,
        Storm::Refused => REFUSED_PORT,
    };
    let mut handles = Vec::new();
    for _ in 0..clients {
        let file = File::open(ns.path()).with_context(|| format!("opening {}", ns.name))?;
        let (next, ok, errors, cut, barrier) = (
            next.clone(),
            ok.clone(),
            errors.clone(),
            cut.clone(),
            barrier.clone(),
        );
        handles.push(thread::spawn(move || -> io::Result<()> {
            let entered = setns(file, CloneFlags::CLONE_NEWNET);
            barrier.wait();
            entered.map_err(io::Error::from)?;
            let start = Instant::now();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                if start.elapsed() > limit || stop.load(Ordering::Relaxed) {
                    cut.store(true, Ordering::Relaxed);
                    break;
                }
                let result = TcpStream::connect(addr(port))
                    // Wait for the server's FIN: no TIME-WAIT on the client.
                    .and_then(|mut s| s.read(&mut [0u8; 16]));
                match (storm, result) {
                    (Storm::Accept, Ok(0)) => ok.fetch_add(1, Ordering::Relaxed),
                    (Storm::Refused, Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
            Ok(())
        }));
    }
    barrier.wait();
    let start = Instant::now();
    let mut failed = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(anyhow!("storm client: {e}")),
            Err(_) => failed = Some(anyhow!("storm client panicked")),
        }
    }
    let elapsed = start.elapsed();
    // Wake each acceptor with one last connection.
    done.store(true, Ordering::Relaxed);
    for _ in 0..acceptors.len() {
        let _ = ns.run("bench-wake", move || TcpStream::connect(addr(LISTEN_PORT)));
    }
    for a in acceptors {
        let _ = a.join();
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(Outcome {
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        cut_short: cut.load(Ordering::Relaxed),
    })
}
