//! `ChildGuard`: a background process the harness started (agent, stand-in, tcpdump, probe),
//! stopped by signal with a bounded wait and SIGKILLed on drop, so that a failing test never
//! leaves it running.

use std::{
    process::{Child, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::cmd::kill_and_reap;

#[derive(Debug)]
pub struct ChildGuard {
    what: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn new(what: impl Into<String>, child: Child) -> Self {
        Self {
            what: what.into(),
            child: Some(child),
            status: None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    /// Mutable access to the child (for its pipes).
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// `Some(status)` once the process has exited (reaping it), `None` while it runs.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(self.status);
        };
        if let Some(s) = child
            .try_wait()
            .with_context(|| format!("failed to poll {}", self.what))?
        {
            self.status = Some(s);
        }
        Ok(self.status)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// Sends `signal` and waits up to `timeout` for the exit. SIGKILL then is the caller's choice
    /// (`stop` does it); this returns an error when the process outlives the wait.
    pub fn signal_and_wait(&mut self, signal: Signal, timeout: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.try_status()? {
            return Ok(s);
        }
        let pid = self.pid().context("child already taken")?;
        let pid = Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
        match kill(pid, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e).with_context(|| format!("failed to signal {}", self.what)),
        }
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(s) = self.try_status()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {pid}) did not exit within {timeout:?} after {signal}",
                    self.what
                );
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Sends `signal`, waits up to `timeout`, then SIGKILLs. Returns the exit status.
    pub fn stop(&mut self, signal: Signal, timeout: Duration) -> Result<ExitStatus> {
        match self.signal_and_wait(signal, timeout) {
            Ok(s) => Ok(s),
            Err(e) => {
                self.kill();
                Err(e)
            }
        }
    }

    /// Lets the process run on after the guard is gone (`WGMESH_NETNS_KEEP=1`).
    pub fn detach(&mut self) {
        // Dropping a std `Child` neither kills nor waits.
        drop(self.child.take());
    }

    /// SIGKILL and reap (idempotent).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
            self.status = child.try_wait().ok().flatten();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
