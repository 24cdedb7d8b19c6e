//! Running external commands (`ip`, `wg`, `tcpdump`, the agent, the probe) with their output
//! captured, a timeout, and every command line echoed to stderr so that a failed test's output is
//! also a script that reproduces its setup.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    io::Read,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// How long a one-shot command may run before it is killed (a wedged userspace device makes
/// `wg show` hang, libraries.md pitfall 3).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

static ECHO: AtomicBool = AtomicBool::new(true);

/// Turns the `+ command` echo on stderr on or off (the demo turns it off unless `--verbose`).
pub fn set_echo(on: bool) {
    ECHO.store(on, Ordering::Relaxed);
}

fn echo(line: &dyn fmt::Display) {
    if ECHO.load(Ordering::Relaxed) {
        eprintln!("+ {line}");
    }
}

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// A command line under construction. `Cmd::new("ip").args(["-n", ns, "link"]).run()?`.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    env_remove: Vec<OsString>,
    timeout: Duration,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }

    /// `ip netns exec <ns> <program> ...`: the only way the harness runs programs inside a
    /// namespace (`ip netns exec` execs in place, so the child's pid is the program's pid).
    pub fn in_netns(ns: &str, program: impl AsRef<OsStr>) -> Self {
        Self::new("ip").args(["netns", "exec", ns]).arg(program)
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env_remove.push(key.as_ref().to_owned());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        for k in &self.env_remove {
            c.env_remove(k);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs to completion and returns the output whatever the exit status.
    pub fn output(&self) -> Result<Output> {
        echo(self);
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start `{self}`"))?;
        let stdout = read_in_background(child.stdout.take());
        let stderr = read_in_background(child.stderr.take());
        let out = match stdout.recv_timeout(self.timeout) {
            Ok(out) => out,
            Err(_) => {
                kill_and_reap(&mut child);
                bail!("`{self}` did not finish within {:?}", self.timeout);
            }
        };
        let err = stderr
            .recv_timeout(Duration::from_secs(2))
            .unwrap_or_default();
        let status = child
            .wait()
            .with_context(|| format!("failed to wait for `{self}`"))?;
        Ok(Output {
            status,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        })
    }

    /// Runs to completion; a non-zero exit is an error carrying stderr. Returns stdout.
    pub fn run(&self) -> Result<String> {
        let out = self.output()?;
        if !out.success() {
            bail!(
                "`{self}` failed ({}): {}",
                out.status,
                out.stderr.trim().lines().last().unwrap_or_default()
            );
        }
        Ok(out.stdout)
    }

    /// Starts it in the background with stdin closed and stdout/stderr as given.
    pub fn spawn(&self, stdout: Stdio, stderr: Stdio) -> Result<Child> {
        echo(&format_args!("{self} &"));
        self.command()
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("failed to start `{self}`"))
    }

    /// Starts it in the background, appending stdout and stderr to `log`.
    pub fn spawn_logged(&self, log: &Path) -> Result<Child> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("failed to open {}", log.display()))?;
        let err = file
            .try_clone()
            .context("failed to duplicate the log file")?;
        self.spawn(Stdio::from(file), Stdio::from(err))
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.env {
            write!(f, "{}={} ", k.to_string_lossy(), v.to_string_lossy())?;
        }
        write!(f, "{}", self.program.to_string_lossy())?;
        for a in &self.args {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains([' ', '"', '\'', '&', ';', '?', '*']) {
                write!(f, " '{}'", a.replace('\'', r"'\''"))?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            // A read error ends the output early; what was read so far is still useful.
            if let Err(e) = p.read_to_end(&mut buf) {
                buf.extend_from_slice(format!("\n<read error: {e}>").as_bytes());
            }
        }
        // The receiver is gone only when the command timed out; nothing is waiting then.
        tx.send(buf).ok();
    });
    rx
}

/// SIGKILL and reap; both may fail only because the child already exited, which is the goal.
pub fn kill_and_reap(child: &mut Child) {
    if let Err(e) = child.kill()
        && e.kind() != std::io::ErrorKind::InvalidInput
    {
        eprintln!("warning: failed to kill pid {}: {e}", child.id());
    }
    if let Err(e) = child.wait() {
        eprintln!("warning: failed to reap pid {}: {e}", child.id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let c = Cmd::new("ip").args(["netns", "exec", "x", "sh", "-c", "echo a b"]);
        assert_eq!(c.to_string(), "ip netns exec x sh -c 'echo a b'");
    }

    #[test]
    fn run_returns_stdout_and_fails_with_stderr() {
        assert_eq!(Cmd::new("echo").arg("hi").run().expect("echo runs"), "hi\n");
        let err = Cmd::new("sh")
            .args(["-c", "echo oops >&2; exit 3"])
            .run()
            .unwrap_err();
        assert!(format!("{err:#}").contains("oops"), "{err:#}");
    }

    #[test]
    fn a_hanging_command_times_out() {
        let err = Cmd::new("sleep")
            .arg("10")
            .timeout(Duration::from_millis(200))
            .run()
            .unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err:#}");
    }
}
