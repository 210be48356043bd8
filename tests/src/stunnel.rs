//! Debian's stunnel as a TLS terminator in front of a plaintext broker: the shape of a managed
//! Kafka service's TLS listener, with a real TLS stack that checks the certificates it is given.

#![allow(clippy::disallowed_methods)] // std::thread::sleep: blocking test code, no async runtime here

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::kafka::TIED_WRAPPER;
use crate::require_command;

/// An stunnel process accepting TLS on a loopback port and forwarding the plaintext to another.
/// Killed on drop, and when the test process dies.
pub struct Stunnel {
    process: Option<(Child, ChildStdin)>,
    dir: tempfile::TempDir,
}

impl Stunnel {
    /// Accepts TLS on 127.0.0.1:`port` with `cert` and `key` and forwards to 127.0.0.1:`to`;
    /// returns once it listens. With `client_ca`, a client certificate issued by that CA is
    /// required (mutual TLS).
    pub fn start(port: u16, to: u16, cert: &Path, key: &Path, client_ca: Option<&Path>) -> Stunnel {
        let bin = require_command("stunnel4");
        let dir = tempfile::Builder::new()
            .prefix("outpost-stunnel-")
            .tempdir()
            .expect("tempdir for stunnel");
        let mut service = format!(
            "[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{to}\ncert = {}\nkey = {}\n",
            cert.display(),
            key.display()
        );
        if let Some(ca) = client_ca {
            service.push_str(&format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                ca.display()
            ));
        }
        let config = dir.path().join("stunnel.conf");
        std::fs::write(
            &config,
            format!("foreground = yes\npid =\ndebug = notice\n\n{service}"),
        )
        .expect("write stunnel.conf");
        let log = File::create(dir.path().join("stunnel.log")).expect("create stunnel.log");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(TIED_WRAPPER)
            .arg(&bin)
            .arg(&config)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("dup stunnel.log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stdin = child.stdin.take().expect("stunnel wrapper stdin");
        let mut stunnel = Stunnel {
            process: Some((child, stdin)),
            dir,
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some((child, _)) = stunnel.process.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("stunnel exited ({status}):\n{}", stunnel.log());
            }
            assert!(
                Instant::now() < deadline,
                "stunnel did not listen on {addr} within 10 s:\n{}",
                stunnel.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        stunnel
    }

    /// What stunnel logged (its view of each handshake).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stunnel.log")).unwrap_or_default()
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self.process.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}
