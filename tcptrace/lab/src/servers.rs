//! Real servers in lab pods, as users run them: nginx (HTTP with a
//! keep-alive timeout, a large static file) and redis. Their files live in
//! the lab's directory and go with it; their processes are the lab's.
use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Lab, Pod, SpawnedChild, which};

/// How long a server may take to listen.
const START_WAIT: Duration = Duration::from_secs(5);

/// Bytes of nginx's `/big` file: more than a socket buffer, so a client
/// that stops reading leaves data unread.
pub const BIG_BYTES: usize = 4 << 20;

impl Lab {
    /// A directory of the lab's for `what`.
    fn lab_dir(&self, what: &str) -> Result<PathBuf> {
        let dir = self.host_root.join(format!("srv-{what}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// nginx in `pod` on `port`: `/` answers "ok", `/big` is a
    /// [`BIG_BYTES`] file; idle keep-alive connections are closed after
    /// `keepalive_s` seconds.
    pub fn nginx(&self, pod: &Pod, port: u16, keepalive_s: u32) -> Result<SpawnedChild> {
        which("nginx")?;
        let dir = self.lab_dir(&format!("nginx-{}-{port}", pod.name))?;
        let www = dir.join("www");
        fs::create_dir_all(&www)?;
        fs::write(www.join("big"), vec![b'x'; BIG_BYTES])?;
        let d = dir.display();
        let conf = format!(
            "daemon off; master_process on; worker_processes 1; user root;\n\
             pid {d}/nginx.pid; error_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               access_log off; keepalive_timeout {keepalive_s}s; keepalive_requests 100000;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               server {{ listen {port}; root {www}; location = / {{ return 200 \"ok\\n\"; }} }}\n\
             }}\n",
            www = www.display()
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf)?;
        let conf_arg = conf_path.to_string_lossy().into_owned();
        // -e: the error log before the configuration is read, too (the
        // compiled-in path may not exist).
        let err_log = format!("{d}/error.log");
        let child = self.spawn_in_pod(
            pod,
            "nginx",
            &["-c", &conf_arg, "-p", &d.to_string(), "-e", &err_log],
        )?;
        self.await_listening(pod, port, "nginx")?;
        Ok(child)
    }

    /// redis in `pod` on `port`, without persistence, with `extra`
    /// arguments (`--tcp-backlog 1`).
    pub fn redis(&self, pod: &Pod, port: u16, extra: &[&str]) -> Result<SpawnedChild> {
        which("redis-server")?;
        let dir = self.lab_dir(&format!("redis-{}-{port}", pod.name))?;
        let port_arg = port.to_string();
        let dir_arg = dir.to_string_lossy().into_owned();
        let mut args = vec![
            "--port",
            &port_arg,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            &dir_arg,
        ];
        args.extend_from_slice(extra);
        let child = self.spawn_in_pod(pod, "redis-server", &args)?;
        self.await_listening(pod, port, "redis-server")?;
        Ok(child)
    }

    /// Waits (bounded) until something accepts connections on `port` in
    /// `pod`.
    fn await_listening(&self, pod: &Pod, port: u16, what: &str) -> Result<()> {
        let addr = SocketAddr::from((pod.ip, port));
        let deadline = Instant::now() + START_WAIT;
        while Instant::now() < deadline {
            let up = crate::netns::in_netns(&pod.netns_name, "lab-probe", move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("{what} did not listen on {addr} within {START_WAIT:?}")
    }

    /// Runs `cmd` in `pod` (its namespace and cgroup) to completion, at
    /// most `timeout`; its output either way.
    pub fn run_in_pod(
        &self,
        pod: &Pod,
        cmd: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Output> {
        which(cmd)?;
        let spawned = self.spawn_in_pod(pod, cmd, args)?;
        spawned.wait_output(timeout)
    }
}

impl SpawnedChild {
    /// Waits for the process to exit (killed after `timeout`); its output.
    pub fn wait_output(mut self, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let pid = self.pid;
        let out = self.take_output()?;
        if Instant::now() >= deadline && !out.status.success() {
            bail!("process {pid} ran longer than {timeout:?} and was killed");
        }
        Ok(out)
    }
}
