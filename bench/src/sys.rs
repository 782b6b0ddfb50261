//! Private network namespaces, traced child processes and /proc readings,
//! each cleaned up by a guard, also when a phase fails.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tcptrace_lab::netns::{Netns, delete_netns};

/// Prefix of every namespace the benchmark creates.
const NETNS_PREFIX: &str = "tcptrace-bench-";

/// A namespace `tcptrace-bench-<tag>-<pid>` with a wide port range and
/// TIME-WAIT reuse (both per namespace).
pub fn bench_netns(tag: &str) -> Result<Netns> {
    let ns = Netns::create(format!("{NETNS_PREFIX}{tag}-{}", std::process::id()))?;
    // An even-sized range (64512 ports): with an odd size connect() may use
    // one port fewer.
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    Ok(ns)
}

/// Deletes namespaces left by benchmark runs that were killed.
pub fn remove_stale_netns() {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let alive = rest
            .rsplit('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            delete_netns(&name);
        }
    }
}

/// A tracer process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Traced {
    child: Option<Child>,
    pub pid: u32,
    stderr: Option<mpsc::Receiver<String>>,
}

/// What a tracer child was started with.
pub struct Spawn<'a> {
    pub program: &'a Path,
    pub args: Vec<String>,
    pub stdout: Stdio,
    /// Wait for a stderr line starting with this; else for `perf_events`
    /// tracepoint attachments (bpftrace).
    pub ready_line: Option<&'a str>,
    pub perf_events: usize,
}

impl Traced {
    pub fn start(spec: Spawn<'_>, timeout: Duration) -> Result<(Self, Duration)> {
        let started = Instant::now();
        let Spawn {
            program,
            args,
            stdout,
            ready_line,
            perf_events,
        } = spec;
        let mut cmd = Command::new(program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // kill the child if this process dies, so no tracer outlives us.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        if let Some(err) = child.stderr.take() {
            thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut traced = Self {
            child: Some(child),
            pid,
            stderr: Some(rx),
        };
        traced.wait_ready(program, ready_line, perf_events, started, timeout)?;
        Ok((traced, started.elapsed()))
    }

    fn wait_ready(
        &mut self,
        program: &Path,
        ready_line: Option<&str>,
        perf_events: usize,
        started: Instant,
        timeout: Duration,
    ) -> Result<()> {
        let mut seen = Vec::new();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "{} exited with {status} before tracing: {}",
                    program.display(),
                    self.stderr_text(&mut seen)
                );
            }
            let rx = self.stderr.as_ref().ok_or_else(|| anyhow!("no stderr"))?;
            while let Ok(line) = rx.try_recv() {
                let ready = ready_line.is_some_and(|p| line.starts_with(p));
                seen.push(line);
                if ready {
                    return Ok(());
                }
            }
            if ready_line.is_none() && perf_event_fds(self.pid) >= perf_events {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
                    "{} not tracing after {timeout:?}: {}",
                    program.display(),
                    self.stderr_text(&mut seen)
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn stderr_text(&self, seen: &mut Vec<String>) -> String {
        if let Some(rx) = &self.stderr {
            while let Ok(l) = rx.recv_timeout(Duration::from_millis(50)) {
                seen.push(l);
            }
        }
        seen.join(" | ")
    }

    /// The tracer's stdout, when it was piped.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// SIGTERM (tcptrace drains and writes its final stats) or SIGINT
    /// (bpftrace), then waits; SIGKILL after `timeout`.
    pub fn stop(mut self, signal: Signal, timeout: Duration) -> Result<()> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("already stopped"))?;
        let _ = kill(Pid::from_raw(self.pid as i32), signal);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                // bpftrace exits non-zero on SIGINT on some versions.
                if !status.success() && signal == Signal::SIGTERM {
                    bail!("tracer exited with {status}");
                }
                return Ok(());
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!("tracer did not stop within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            for _ in 0..200 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn perf_event_fds(pid: u32) -> usize {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("perf_event"))
        })
        .count()
}

/// CPU time (user + system) of a process so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).context("reading stat")?;
    // Fields after the parenthesised comm; utime and stime are 14 and 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f
        .get(11)
        .zip(f.get(12))
        .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
        .ok_or_else(|| anyhow!("malformed stat"))?;
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).context("reading status")?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// The BPF objects a process holds open, from /proc/<pid>/fdinfo.
#[derive(Debug, Default)]
pub struct BpfFds {
    /// prog_id -> (run_time_ns, run_cnt)
    pub progs: BTreeMap<u32, (u64, u64)>,
    /// map_id -> fdinfo fields
    pub maps: BTreeMap<u32, BTreeMap<String, String>>,
}

pub fn bpf_fds(pid: u32) -> Result<BpfFds> {
    let mut out = BpfFds::default();
    let dir = fs::read_dir(format!("/proc/{pid}/fdinfo")).context("reading fdinfo")?;
    for entry in dir.flatten() {
        let mut text = String::new();
        if fs::File::open(entry.path())
            .and_then(|mut f| f.read_to_string(&mut text))
            .is_err()
        {
            continue;
        }
        let fields: BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
        // Links carry a prog_id too, but no run statistics.
        if let Some(id) = num("prog_id")
            && fields.contains_key("run_cnt")
        {
            out.progs.insert(
                id as u32,
                (num("run_time_ns").unwrap_or(0), num("run_cnt").unwrap_or(0)),
            );
        } else if let Some(id) = num("map_id") {
            out.maps.insert(id as u32, fields);
        }
    }
    Ok(out)
}
