//! Runs untrusted generated Python: one interpreter per run, in a fresh temporary directory, with a wall-clock
//! limit enforced from outside (the whole process group is killed) and resource limits set inside.
//!
//! Isolation comes in layers, the strongest available being probed once in [`Sandbox::new`]:
//! - `netns`: the interpreter runs under `unshare --net`, in a network namespace with no usable interface;
//! - `rofs`: also in a mount namespace where every mount is read-only except the run's own directory;
//! - `audit`: always, a `sys.addaudithook` guard (see `sandbox/harness.py`) that refuses sockets, process
//!   creation, `ctypes`, writes outside the run directory, and the introspection that would reach the
//!   harness's secrets. Audit hooks cannot be removed from Python code, but they are a policy inside the
//!   same process, not a security boundary: the namespaces are what make "never touches the repository or
//!   the network" hold when they are available.
//!
//! The harness reads the job (solution, tests, limits, a per-run nonce) from stdin and reports one line
//! carrying the nonce, so a program that exits early with status 0 does not count as passing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use std::os::unix::process::{CommandExt, ExitStatusExt};

const HARNESS: &str = include_str!("sandbox/harness.py");

/// Remounts everything read-only except the run directory, then execs the interpreter. Runs as root inside
/// a fresh mount namespace, so nothing it does is visible outside.
const ROFS_SCRIPT: &str = r#"
root="$1"; shift
mount --bind "$root" "$root" || exit 97
# The inherited cwd is on the mount underneath, which is about to become read-only.
cd "$root" || exit 97
while read -r _dev mnt _rest; do
  mnt=$(printf '%b' "$mnt")
  [ "$mnt" = "$root" ] && continue
  mount -o remount,bind,ro "$mnt" 2>/dev/null || [ "$mnt" != / ] || exit 97
done < /proc/self/mounts
exec "$@"
"#;

/// Bytes kept from the end of each stream besides the head, so the verdict line and the end of a
/// traceback survive a program that printed megabytes first.
const TAIL_BYTES: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("python interpreter '{python}' cannot be started: {source}")]
    PythonMissing {
        python: PathBuf,
        source: std::io::Error,
    },
    #[error("python interpreter '{python}' does not work: {detail}")]
    PythonBroken { python: PathBuf, detail: String },
    #[error("invalid sandbox configuration: {0}")]
    Config(String),
}

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Wall-clock limit per run; the CPU limit inside is one second more.
    pub timeout: Duration,
    /// RLIMIT_AS of the interpreter.
    pub memory_bytes: u64,
    /// Bytes of stdout (and of stderr) kept; the rest is read and dropped so the child never blocks.
    pub max_output_bytes: usize,
    /// The interpreter; resolved once to its real executable, because the environment of a run is empty
    /// and wrappers such as pyenv shims need theirs.
    pub python: PathBuf,
    /// Runs at once on this sandbox; further callers wait.
    pub max_parallel: usize,
    /// Largest file a run may write (RLIMIT_FSIZE).
    pub max_file_bytes: u64,
    /// Use namespaces when the machine allows them; off leaves only the audit guard.
    pub use_namespaces: bool,
    /// The in-process audit guard. Only tests of the namespace layer turn it off.
    pub audit_guard: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        SandboxConfig {
            timeout: Duration::from_secs(5),
            memory_bytes: 512 << 20,
            max_output_bytes: 64 << 10,
            python: PathBuf::from("python3"),
            max_parallel: cores.clamp(1, 8),
            max_file_bytes: 1 << 20,
            use_namespaces: true,
            audit_guard: true,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The program ran and every test passed.
    Passed,
    /// The program did not compile, raised, failed a test, or exited before the tests finished.
    Failed { reason: String, stderr: String },
    /// Killed at the wall-clock limit.
    TimedOut { after: Duration },
    /// Killed by a signal (CPU or memory limit, segfault) or the sandbox itself failed.
    Crashed { reason: String, stderr: String },
}

impl RunOutcome {
    pub fn passed(&self) -> bool {
        matches!(self, RunOutcome::Passed)
    }

    /// One line for logs and verdicts.
    pub fn summary(&self) -> String {
        match self {
            RunOutcome::Passed => "passed".into(),
            RunOutcome::Failed { reason, .. } => reason.clone(),
            RunOutcome::TimedOut { after } => format!("timed out after {} s", after.as_secs_f32()),
            RunOutcome::Crashed { reason, .. } => reason.clone(),
        }
    }
}

/// A run with what it printed (capped) and how long it took.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: RunOutcome,
    /// The first `max_output_bytes` of stdout, lossily decoded.
    pub stdout: String,
    /// Everything the program wrote to stdout, including what was dropped.
    pub stdout_bytes: u64,
    pub stdout_truncated: bool,
    /// Stderr without the harness's verdict line: its head, and its tail when it was longer.
    pub stderr: String,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    Audit,
    Netns,
    NetnsRofs,
}

pub struct Sandbox {
    cfg: SandboxConfig,
    python: PathBuf,
    isolation: Isolation,
    /// `unshare` needs `--map-root-user` when we are not root.
    map_root: bool,
    running: Mutex<usize>,
    slot_free: Condvar,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("python", &self.python)
            .field("isolation", &self.isolation())
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Sandbox {
    /// Resolves the interpreter, checks it runs, and probes which isolation this machine allows.
    pub fn new(cfg: SandboxConfig) -> Result<Sandbox, SandboxError> {
        if cfg.timeout.is_zero() {
            return Err(SandboxError::Config("timeout must be positive".into()));
        }
        if cfg.max_parallel == 0 {
            return Err(SandboxError::Config(
                "max_parallel must be at least 1".into(),
            ));
        }
        if cfg.max_output_bytes == 0 {
            return Err(SandboxError::Config(
                "max_output_bytes must be positive".into(),
            ));
        }
        let python = resolve_python(&cfg.python)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let map_root = unsafe { libc::geteuid() } != 0;
        let mut sandbox = Sandbox {
            cfg,
            python,
            isolation: Isolation::Audit,
            map_root,
            running: Mutex::new(0),
            slot_free: Condvar::new(),
        };
        if sandbox.cfg.use_namespaces {
            for candidate in [Isolation::NetnsRofs, Isolation::Netns] {
                if sandbox.probe(candidate) {
                    sandbox.isolation = candidate;
                    break;
                }
            }
        }
        // The harness itself must work under the chosen isolation, or every verdict would be "crashed".
        let report = sandbox.run_report("", &["assert 1 + 1 == 2".to_string()]);
        if report.outcome != RunOutcome::Passed {
            return Err(SandboxError::PythonBroken {
                python: sandbox.python.clone(),
                detail: format!("the test harness fails: {:?}", report.outcome),
            });
        }
        tracing::debug!(python = %sandbox.python.display(), isolation = sandbox.isolation(), "python sandbox ready");
        Ok(sandbox)
    }

    /// Which isolation is active: "netns+rofs+audit", "netns+audit" or "audit" (without the "audit" part
    /// when the guard is turned off).
    pub fn isolation(&self) -> &'static str {
        match (self.isolation, self.cfg.audit_guard) {
            (Isolation::NetnsRofs, true) => "netns+rofs+audit",
            (Isolation::Netns, true) => "netns+audit",
            (Isolation::Audit, true) => "audit",
            (Isolation::NetnsRofs, false) => "netns+rofs",
            (Isolation::Netns, false) => "netns",
            (Isolation::Audit, false) => "none",
        }
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.cfg
    }

    /// The interpreter actually executed.
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// Runs a whole program; it passes when it finishes without raising.
    pub fn run(&self, program: &str) -> RunOutcome {
        self.run_report(program, &[]).outcome
    }

    /// Runs `solution`, then each test (Python statements, typically `assert`s) in its namespace.
    pub fn run_tests(&self, solution: &str, tests: &[String]) -> RunOutcome {
        self.run_report(solution, tests).outcome
    }

    /// [`Sandbox::run_tests`] with the captured output and the time taken.
    pub fn run_report(&self, solution: &str, tests: &[String]) -> RunReport {
        let _slot = self.acquire();
        let start = Instant::now();
        let mut report = match self.execute(solution, tests) {
            Ok(report) => report,
            Err(e) => RunReport {
                outcome: RunOutcome::Crashed {
                    reason: format!("sandbox error: {e}"),
                    stderr: String::new(),
                },
                stdout: String::new(),
                stdout_bytes: 0,
                stdout_truncated: false,
                stderr: String::new(),
                elapsed: Duration::ZERO,
            },
        };
        report.elapsed = start.elapsed();
        report
    }

    fn acquire(&self) -> SlotGuard<'_> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        while *running >= self.cfg.max_parallel {
            running = self
                .slot_free
                .wait(running)
                .unwrap_or_else(|e| e.into_inner());
        }
        *running += 1;
        SlotGuard(self)
    }

    /// The command that runs `argv` under `isolation` with `dir` as the only writable place.
    fn command(&self, isolation: Isolation, dir: &Path, argv: &[&std::ffi::OsStr]) -> Command {
        let mut cmd = match isolation {
            Isolation::Audit => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                c
            }
            Isolation::Netns | Isolation::NetnsRofs => {
                let mut c = Command::new("unshare");
                c.arg("--net");
                if isolation == Isolation::NetnsRofs {
                    c.args(["--mount", "--propagation", "private"]);
                }
                if self.map_root {
                    c.arg("--map-root-user");
                }
                c.arg("--");
                if isolation == Isolation::NetnsRofs {
                    c.args(["/bin/sh", "-c", ROFS_SCRIPT, "t2-sandbox"])
                        .arg(dir);
                }
                c.args(argv);
                c
            }
        };
        cmd.current_dir(dir)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", dir)
            .env("TMPDIR", dir)
            .env("LC_ALL", "C.UTF-8")
            // Its own process group, so a timeout kills everything it started.
            .process_group(0);
        cmd
    }

    /// Whether `isolation` works here: the interpreter starts under it, and under `rofs` a write next to
    /// the run directory fails while writes inside it (by absolute and by relative path) succeed.
    fn probe(&self, isolation: Isolation) -> bool {
        let (Ok(dir), Ok(outside)) = (temp_dir(), temp_dir()) else {
            return false;
        };
        let (Ok(root), Ok(outside_root)) =
            (dir.path().canonicalize(), outside.path().canonicalize())
        else {
            return false;
        };
        let check = "import sys\n\
                     open(sys.argv[1] + '/probe', 'w').write('x')\n\
                     open('relative', 'w').write('x')\n\
                     try:\n    open(sys.argv[2] + '/probe', 'w').write('x')\nexcept OSError:\n    sys.exit(0)\n\
                     sys.exit(3)";
        let check = if isolation == Isolation::NetnsRofs {
            check
        } else {
            "pass"
        };
        let argv = [
            self.python.as_os_str(),
            "-I".as_ref(),
            "-S".as_ref(),
            "-B".as_ref(),
            "-c".as_ref(),
            check.as_ref(),
            root.as_os_str(),
            outside_root.as_os_str(),
        ];
        let mut cmd = self.command(isolation, &root, &argv);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let Ok(mut child) = cmd.spawn() else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    kill_group(child.id());
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let ok = status.is_some_and(|s| s.success()) && !outside_root.join("probe").exists();
        if !ok {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            tracing::debug!(?isolation, ?status, stderr = %err.trim(), "sandbox isolation unavailable");
        }
        ok
    }

    fn execute(&self, solution: &str, tests: &[String]) -> std::io::Result<RunReport> {
        let dir = temp_dir()?;
        let root = dir.path().canonicalize()?;
        let nonce = nonce();
        let cpu_secs =
            self.cfg.timeout.as_secs() + u64::from(self.cfg.timeout.subsec_nanos() > 0) + 1;
        let limits: Vec<(&str, u64)> = vec![
            ("RLIMIT_AS", self.cfg.memory_bytes),
            ("RLIMIT_CPU", cpu_secs),
            ("RLIMIT_FSIZE", self.cfg.max_file_bytes),
            ("RLIMIT_CORE", 0),
            ("RLIMIT_NOFILE", 256),
        ];
        let job = serde_json::json!({
            "nonce": nonce,
            "root": root.to_string_lossy(),
            "solution": solution,
            "tests": tests,
            "limits": limits,
            "audit": self.cfg.audit_guard,
        });
        let argv = [
            self.python.as_os_str(),
            "-I".as_ref(),
            "-S".as_ref(),
            "-B".as_ref(),
            "-c".as_ref(),
            HARNESS.as_ref(),
        ];
        let mut cmd = self.command(self.isolation, &root, &argv);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn()?;
        let pid = child.id();

        let (tx, rx) = mpsc::channel();
        for (which, stream) in [
            (
                0,
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
            ),
            (
                1,
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
            ),
        ] {
            let Some(stream) = stream else { continue };
            let tx = tx.clone();
            let cap = self.cfg.max_output_bytes;
            std::thread::spawn(move || {
                let _ = tx.send((which, Capture::drain(stream, cap)));
            });
        }
        drop(tx);
        if let Some(mut stdin) = child.stdin.take() {
            // A child that died before reading its job shows up in its exit status; EPIPE here says nothing.
            let _ = stdin.write_all(job.to_string().as_bytes());
        }

        let mut timed_out = false;
        let status: ExitStatus = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() >= self.cfg.timeout {
                timed_out = true;
                kill_group(pid);
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Anything left in the group (it cannot fork, but be sure) dies with the leader.
        kill_group(pid);

        let mut out = Capture::default();
        let mut err = Capture::default();
        let wait_until = Instant::now() + Duration::from_secs(2);
        for _ in 0..2 {
            let left = wait_until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((0, c)) => out = c,
                Ok((_, c)) => err = c,
                // A reader still blocked means something outside the group holds the pipe; give up on it.
                Err(_) => break,
            }
        }
        drop(dir);

        let (verdict, stderr) = split_verdict(&err, &nonce);
        let stderr_tail = tail_chars(&stderr, 2000);
        let outcome = if timed_out {
            RunOutcome::TimedOut {
                after: self.cfg.timeout,
            }
        } else {
            match (verdict, status.code(), status.signal()) {
                (Some((true, _)), Some(0), _) => RunOutcome::Passed,
                (Some((_, msg)), _, _) => RunOutcome::Failed {
                    reason: msg,
                    stderr: stderr_tail,
                },
                (None, _, Some(sig)) => RunOutcome::Crashed {
                    reason: signal_reason(sig),
                    stderr: stderr_tail,
                },
                (None, Some(97), _) if self.isolation == Isolation::NetnsRofs => {
                    RunOutcome::Crashed {
                        reason: "the sandbox could not set up its read-only mounts".into(),
                        stderr: stderr_tail,
                    }
                }
                (None, Some(code), _) => RunOutcome::Failed {
                    reason: if code == 0 {
                        "the program exited before the tests finished".into()
                    } else {
                        format!("the program exited with status {code} before the tests finished")
                    },
                    stderr: stderr_tail,
                },
                (None, None, None) => RunOutcome::Crashed {
                    reason: "the interpreter ended without a status".into(),
                    stderr: stderr_tail,
                },
            }
        };
        Ok(RunReport {
            outcome,
            stdout: String::from_utf8_lossy(&out.head).into_owned(),
            stdout_bytes: out.total,
            stdout_truncated: out.total > out.head.len() as u64,
            stderr,
            elapsed: start.elapsed(),
        })
    }
}

struct SlotGuard<'a>(&'a Sandbox);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut running = self.0.running.lock().unwrap_or_else(|e| e.into_inner());
        *running -= 1;
        self.0.slot_free.notify_one();
    }
}

/// The head (up to a cap) and the tail of a stream, and its full length.
#[derive(Default)]
struct Capture {
    head: Vec<u8>,
    tail: Vec<u8>,
    total: u64,
}

impl Capture {
    /// Reads to the end, never blocking the writer on a full pipe.
    fn drain(mut stream: impl Read, cap: usize) -> Capture {
        let mut c = Capture::default();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let chunk = &buf[..n];
            c.total += n as u64;
            let room = cap.saturating_sub(c.head.len());
            c.head.extend_from_slice(&chunk[..room.min(n)]);
            c.tail.extend_from_slice(chunk);
            if c.tail.len() > 2 * TAIL_BYTES {
                c.tail.drain(..c.tail.len() - TAIL_BYTES);
            }
        }
        if c.tail.len() > TAIL_BYTES {
            c.tail.drain(..c.tail.len() - TAIL_BYTES);
        }
        c
    }

    /// The whole stream when it fit, else head, a marker and the part of the tail not already in the head.
    fn text(&self) -> String {
        let head_len = self.head.len() as u64;
        if self.total <= head_len {
            return String::from_utf8_lossy(&self.head).into_owned();
        }
        let tail_start = self.total - self.tail.len() as u64;
        let overlap = head_len.saturating_sub(tail_start) as usize;
        let tail = &self.tail[overlap.min(self.tail.len())..];
        let dropped = self.total - head_len - tail.len() as u64;
        if dropped == 0 {
            return format!(
                "{}{}",
                String::from_utf8_lossy(&self.head),
                String::from_utf8_lossy(tail)
            );
        }
        format!(
            "{}\n[... {dropped} bytes dropped ...]\n{}",
            String::from_utf8_lossy(&self.head),
            String::from_utf8_lossy(tail)
        )
    }
}

/// Finds the harness's verdict line (the last one carrying `nonce`) and returns it with stderr minus it.
fn split_verdict(err: &Capture, nonce: &str) -> (Option<(bool, String)>, String) {
    let text = err.text();
    let Some(at) = text.rfind(nonce) else {
        return (None, text);
    };
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let rest = &text[at + nonce.len()..line_end];
    let verdict = if let Some(msg) = rest.strip_prefix(" PASS ") {
        Some((true, msg.to_string()))
    } else {
        rest.strip_prefix(" FAIL ")
            .map(|msg| (false, msg.to_string()))
    };
    let mut before = &text[..at];
    // The harness starts its line with a newline of its own.
    before = before.strip_suffix('\n').unwrap_or(before);
    let stderr = format!("{before}{}", &text[line_end..].trim_start_matches('\n'));
    (verdict, stderr)
}

fn tail_chars(s: &str, n: usize) -> String {
    let count = s.chars().count();
    s.chars().skip(count.saturating_sub(n)).collect()
}

fn signal_reason(sig: i32) -> String {
    match sig {
        libc::SIGXCPU => "killed at the CPU time limit".into(),
        libc::SIGKILL => "killed (SIGKILL, e.g. out of memory)".into(),
        libc::SIGSEGV => "crashed with a segmentation fault".into(),
        libc::SIGABRT => "aborted".into(),
        libc::SIGXFSZ => "killed at the file size limit".into(),
        s => format!("killed by signal {s}"),
    }
}

fn kill_group(pid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: killpg only sends a signal. The group id is our child's pid: while any member of that group
    // lives the kernel keeps the number from being reused, and once none does the call fails with ESRCH.
    // (The one gap, the number recycled into a new group between reaping and this call, needs pid
    // allocation to wrap around in microseconds.)
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

fn temp_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("t2-sandbox-").tempdir()
}

/// 128 random bits, hex: the harness's proof that a verdict line is its own.
fn nonce() -> String {
    let mut bytes = [0u8; 16];
    let from_urandom =
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_urandom.is_err() {
        use std::hash::{BuildHasher, Hasher};
        for chunk in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(Instant::now().elapsed().as_nanos());
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("T2V{hex}")
}

/// The interpreter's real executable (following pyenv-style shims with the caller's environment).
fn resolve_python(python: &Path) -> Result<PathBuf, SandboxError> {
    let out = Command::new(python)
        .args([
            "-I",
            "-S",
            "-c",
            "import sys, resource; print(sys.executable)",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SandboxError::PythonMissing {
            python: python.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(SandboxError::PythonBroken {
            python: python.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let exe = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if exe.as_os_str().is_empty() || !exe.is_file() {
        return Err(SandboxError::PythonBroken {
            python: python.to_path_buf(),
            detail: format!("sys.executable is '{}'", exe.display()),
        });
    }
    Ok(exe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(bytes: &[u8], cap: usize) -> Capture {
        Capture::drain(bytes, cap)
    }

    #[test]
    fn capture_keeps_head_and_tail_without_repeating_bytes() {
        let data: Vec<u8> = (0..70_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let c = capture(&data, 64 << 10);
        assert_eq!(c.total, 70_000);
        assert_eq!(c.head.len(), 64 << 10);
        assert_eq!(c.tail.len(), TAIL_BYTES);
        // Head and tail overlap here: the text is the stream itself.
        assert_eq!(c.text().as_bytes(), &data[..]);

        let data = vec![b'x'; 200_000];
        let c = capture(&data, 1000);
        let text = c.text();
        assert!(text.contains(&format!(
            "[... {} bytes dropped ...]",
            200_000 - 1000 - TAIL_BYTES
        )));

        let c = capture(b"short", 1000);
        assert_eq!(c.text(), "short");
    }

    #[test]
    fn verdict_line_is_found_and_removed() {
        let c = capture(
            b"warning: x\n\nT2Vabc FAIL test 1 failed: AssertionError\n",
            1000,
        );
        let (verdict, rest) = split_verdict(&c, "T2Vabc");
        assert_eq!(
            verdict,
            Some((false, "test 1 failed: AssertionError".to_string()))
        );
        assert_eq!(rest, "warning: x\n");

        let c = capture(b"\nT2Vabc PASS 2 tests passed\n", 1000);
        assert_eq!(
            split_verdict(&c, "T2Vabc").0,
            Some((true, "2 tests passed".to_string()))
        );

        // Someone else's nonce is no verdict.
        let c = capture(b"\nT2Vxyz PASS 2 tests passed\n", 1000);
        assert_eq!(split_verdict(&c, "T2Vabc").0, None);
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(), nonce());
        assert_eq!(nonce().len(), 3 + 32);
    }
}
