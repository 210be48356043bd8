//! A real Modbus slave for the tests: `tests/peers/modbus_slave.py` (pymodbus).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::require_command;

/// A pymodbus slave process; killed on drop.
pub struct Slave {
    child: Child,
}

impl Slave {
    /// Starts `modbus_slave.py` with `args` (`--tcp host:port` or `--rtu path`, `--units`,
    /// `--map`) and waits until it serves.
    pub fn start(args: &[&str]) -> Slave {
        let script = crate::manifest_dir().join("peers/modbus_slave.py");
        let mut child = Command::new(require_command("python3"))
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the modbus slave");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the modbus slave's first line");
        assert_eq!(
            line.trim(),
            "READY",
            "modbus slave did not start (is pymodbus installed? run scripts/setup-test-deps.sh)"
        );
        Slave { child }
    }

    /// Sends `signal` (STOP: connected but silent; CONT: answering again).
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .expect("a process id");
        rustix::process::kill_process(pid, signal).expect("signal the modbus slave");
    }
}

impl Drop for Slave {
    fn drop(&mut self) {
        let _ = self.signal_cont();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Slave {
    fn signal_cont(&self) -> Option<()> {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).ok()?)?;
        rustix::process::kill_process(pid, rustix::process::Signal::CONT).ok()
    }
}
