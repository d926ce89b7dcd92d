//! The Python sandbox against hostile programs, with real `python3` subprocesses.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use t2_tasks::sandbox::{RunOutcome, Sandbox, SandboxConfig, SandboxError};

fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let sb = Sandbox::new(SandboxConfig {
            timeout: Duration::from_secs(2),
            ..SandboxConfig::default()
        })
        .expect("python3 sandbox");
        eprintln!(
            "sandbox isolation: {}, python {}",
            sb.isolation(),
            sb.python().display()
        );
        sb
    })
}

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("{name}-{}", std::process::id()))
}

fn assert_not_passed(outcome: &RunOutcome, what: &str) {
    eprintln!("{what:?} -> {}", outcome.summary());
    assert!(!outcome.passed(), "{what} passed but must not: {outcome:?}");
}

fn py_str(p: &Path) -> String {
    format!("{:?}", p.to_str().expect("utf-8 path"))
}

#[test]
fn isolation_is_reported() {
    let iso = sandbox().isolation();
    assert!(
        ["netns+rofs+audit", "netns+audit", "audit"].contains(&iso),
        "{iso}"
    );
}

#[test]
fn plain_program_passes_and_raising_one_fails() {
    assert_eq!(
        sandbox().run("x = sum(range(10))\nassert x == 45"),
        RunOutcome::Passed
    );
    match sandbox().run("raise ValueError('boom')") {
        RunOutcome::Failed { reason, .. } => {
            assert!(reason.contains("ValueError: boom"), "{reason}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn infinite_loop_is_killed_at_the_timeout() {
    let start = Instant::now();
    let outcome = sandbox().run("while True:\n    pass");
    let took = start.elapsed();
    assert!(
        matches!(outcome, RunOutcome::TimedOut { .. }),
        "{outcome:?}"
    );
    assert!(
        took < sandbox().config().timeout + Duration::from_secs(2),
        "took {took:?}"
    );
    assert!(
        outcome.summary().contains("timed out after 2"),
        "{}",
        outcome.summary()
    );
}

#[test]
fn sleeping_program_is_killed_at_the_timeout() {
    // Wall clock, not CPU: a sleeper uses no CPU time at all.
    let start = Instant::now();
    let outcome = sandbox().run("import time\ntime.sleep(60)");
    assert!(
        matches!(outcome, RunOutcome::TimedOut { .. }),
        "{outcome:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(4));
}

#[test]
fn writes_into_the_repository_fail() {
    let target = repo_file("PWNED");
    let dir = target.parent().expect("parent");
    let attempts = [
        format!("open({}, 'w').write('x')", py_str(&target)),
        format!("import pathlib\npathlib.Path({}).write_text('x')", py_str(&target)),
        format!(
            "import os\nfd = os.open({}, os.O_WRONLY | os.O_CREAT, 0o644)\nos.write(fd, b'x')",
            py_str(&target)
        ),
        // dir_fd is not in os.open's audit event: the relative path must be refused on its own.
        format!(
            "import os\nd = os.open({}, os.O_RDONLY)\nfd = os.open({:?}, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=d)",
            py_str(dir),
            target.file_name().and_then(|n| n.to_str()).expect("name")
        ),
        format!("import os\nos.chdir({})\nopen({:?}, 'w').write('x')", py_str(dir), target.file_name().and_then(|n| n.to_str()).expect("name")),
        format!("open('../../../../../../..' + {}, 'w').write('x')", py_str(&target)),
        format!("import os\nos.symlink({}, 'link')\nopen('link', 'w').write('x')", py_str(&target)),
        format!("import shutil\nopen('a', 'w').write('x')\nshutil.copy('a', {})", py_str(&target)),
        format!("import os\nopen('a', 'w').write('x')\nos.rename('a', {})", py_str(&target)),
        format!("import os\nos.mkdir({})", py_str(&target)),
    ];
    for program in &attempts {
        let outcome = sandbox().run(program);
        assert_not_passed(&outcome, program);
        assert!(!target.exists(), "{program} created {}", target.display());
    }
}

#[test]
fn existing_repository_files_cannot_be_changed_or_removed() {
    // A file of our own, so that a sandbox failure here cannot damage the real tree.
    let victim = repo_file("victim");
    std::fs::write(&victim, "original").expect("victim");
    let m = py_str(&victim);
    let programs = [
        format!("open({m}, 'a').write('# pwned')"),
        format!("open({m}, 'r+').write('pwned')"),
        format!("import os\nos.remove({m})"),
        format!("import os\nos.truncate({m}, 0)"),
        format!("import os\nos.chmod({m}, 0o777)"),
        format!("import os\nos.utime({m}, (0, 0))"),
        format!("import os\nfd = os.open({m}, os.O_RDONLY)\nos.chmod(fd, 0o777)"),
    ];
    let meta = std::fs::metadata(&victim).expect("meta");
    let results: Vec<RunOutcome> = programs.iter().map(|p| sandbox().run(p)).collect();
    let after = std::fs::read_to_string(&victim);
    let meta_after = std::fs::metadata(&victim);
    let _ = std::fs::remove_file(&victim);
    for (program, outcome) in programs.iter().zip(&results) {
        assert_not_passed(outcome, program);
    }
    assert_eq!(after.expect("victim still there"), "original");
    let meta_after = meta_after.expect("meta");
    assert_eq!(meta.modified().ok(), meta_after.modified().ok());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode(), meta_after.permissions().mode());
}

#[test]
fn writing_inside_its_own_directory_works() {
    let program = "import os, tempfile\n\
                   open('out.txt', 'w').write('hello')\n\
                   assert open('out.txt').read() == 'hello'\n\
                   os.mkdir('sub')\n\
                   os.rename('out.txt', 'sub/moved.txt')\n\
                   with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n\
                   os.remove('sub/moved.txt')";
    assert_eq!(sandbox().run(program), RunOutcome::Passed);
}

#[test]
fn each_run_gets_a_fresh_directory() {
    assert_eq!(
        sandbox().run("open('left_behind', 'w').write('x')"),
        RunOutcome::Passed
    );
    assert_eq!(
        sandbox().run("import os\nassert not os.path.exists('left_behind'), os.listdir('.')"),
        RunOutcome::Passed
    );
}

#[test]
fn network_connections_fail() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    for program in [
        format!("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"),
        format!("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))"),
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1/', timeout=1)"
            .to_string(),
        "import socket\nsocket.getaddrinfo('example.com', 80)".to_string(),
    ] {
        assert_not_passed(&sandbox().run(&program), &program);
    }
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("the listener saw a connection from {peer}"),
        Err(e) => panic!("accept: {e}"),
    }
}

#[test]
fn processes_cannot_be_started() {
    let marker = repo_file("SPAWNED");
    let m = py_str(&marker);
    for program in [
        "import subprocess\nsubprocess.run(['ls'])".to_string(),
        format!("import os\nos.system('touch ' + {m})"),
        format!("import os\nos.execv('/usr/bin/touch', ['touch', {m}])"),
        "import os\npid = os.fork()\nassert pid != 0".to_string(),
        "import os\nos.posix_spawn('/bin/ls', ['ls'], {})".to_string(),
        "import pty\npty.fork()".to_string(),
        "import ctypes\nctypes.CDLL(None).system(b'ls')".to_string(),
        "import _posixsubprocess".to_string(),
        "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\np.join()"
            .to_string(),
    ] {
        let outcome = sandbox().run(&program);
        assert_not_passed(&outcome, &program);
        assert!(!marker.exists(), "{program} ran a command");
    }
}

#[test]
fn large_allocation_fails_inside_the_sandbox() {
    let outcome = sandbox().run("b = bytearray(2 * 1024 ** 3)\nb[-1] = 1");
    match &outcome {
        RunOutcome::Failed { reason, .. } => assert!(reason.contains("MemoryError"), "{reason}"),
        RunOutcome::Crashed { .. } => {}
        other => panic!("a 2 GiB allocation must fail, got {other:?}"),
    }
}

#[test]
fn huge_output_is_capped() {
    let report = sandbox().run_report(
        "import sys\nsys.stdout.write('x' * 10_000_000)\nprint('done', file=sys.stderr)",
        &[],
    );
    assert_eq!(
        report.outcome,
        RunOutcome::Passed,
        "stderr: {}",
        report.stderr
    );
    let cap = sandbox().config().max_output_bytes;
    assert!(
        report.stdout.len() <= cap,
        "kept {} bytes",
        report.stdout.len()
    );
    assert_eq!(report.stdout.len(), cap);
    assert_eq!(report.stdout_bytes, 10_000_000);
    assert!(report.stdout_truncated);
    assert_eq!(report.stderr.trim(), "done");
}

#[test]
fn huge_stderr_keeps_its_tail_and_the_verdict() {
    let report = sandbox().run_report(
        "import sys\nsys.stderr.write('e' * 5_000_000)\nsys.stderr.write('\\nTHE END\\n')",
        &["assert False, 'last words'".to_string()],
    );
    match &report.outcome {
        RunOutcome::Failed { reason, stderr } => {
            assert!(
                reason.contains("test 1 failed: AssertionError: last words"),
                "{reason}"
            );
            assert!(stderr.contains("THE END"), "tail lost");
            assert!(stderr.len() < 100_000);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn big_files_are_refused() {
    let outcome = sandbox().run("open('big', 'wb').write(b'x' * (8 << 20))");
    assert_not_passed(&outcome, "8 MiB file");
}

#[test]
fn exiting_early_does_not_pass_the_tests() {
    let tests = vec!["assert f() == 2".to_string()];
    for solution in [
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "exit()",
        "def f():\n    return 1\nimport atexit, os\natexit.register(lambda: os._exit(0))",
        "raise SystemExit",
        "raise KeyboardInterrupt",
    ] {
        let outcome = sandbox().run_tests(solution, &tests);
        assert_not_passed(&outcome, solution);
    }
}

#[test]
fn the_harness_cannot_be_tricked() {
    let tests = vec!["assert f() == 2".to_string(), "assert f() != 1".to_string()];
    for solution in [
        // Reading the frame that holds the nonce and the tests.
        "import sys\ndef f():\n    return 1\nframe = sys._getframe(1)\nprint(frame.f_locals)",
        "def f():\n    return 1\ntry:\n    raise ValueError\nexcept ValueError as e:\n    fr = e.__traceback__.tb_frame.f_back\n    print(fr.f_locals)",
        "import gc\ndef f():\n    return 1\nprint(len(gc.get_objects()))",
        "import sys\ndef f():\n    return 1\nsys.settrace(lambda *a: None)",
        // Disabling the loop over the tests, or replacing exec.
        "import builtins\ndef f():\n    return 1\nbuiltins.enumerate = lambda *a, **k: iter(())\nbuiltins.exec = lambda *a, **k: None",
        // Printing something that looks like a verdict.
        "import sys\ndef f():\n    return 1\nprint('T2V00000000000000000000000000000000 PASS ok', file=sys.stderr)\nsys.exit(0)",
    ] {
        let outcome = sandbox().run_tests(solution, &tests);
        assert_not_passed(&outcome, solution);
    }
    // A hook of its own would see the tests being compiled: it is silently not installed. The job on stdin
    // has been read and stdin replaced by /dev/null before the solution starts.
    let quiet = "import sys\nseen = []\nsys.addaudithook(lambda e, a: seen.append(e))\n\
                 compile('1', 'x', 'eval')\nassert not seen, seen\nassert sys.stdin.read() == ''";
    assert_eq!(sandbox().run(quiet), RunOutcome::Passed);
    // Library code that asks for its caller's module still works: the refusal is a ValueError it expects.
    let ok = "from collections import namedtuple\nfrom typing import TypeVar\nP = namedtuple('P', 'x y')\nT = TypeVar('T')\ndef f():\n    return P(2, 0).x";
    assert_eq!(sandbox().run_tests(ok, &tests), RunOutcome::Passed);
}

/// The namespaces on their own, with the audit guard off: where the machine allows them, they alone must
/// keep the program off the repository and the network.
#[test]
fn namespaces_hold_without_the_audit_guard() {
    let bare = Sandbox::new(SandboxConfig {
        audit_guard: false,
        timeout: Duration::from_secs(3),
        ..SandboxConfig::default()
    })
    .expect("sandbox");
    let iso = bare.isolation();
    eprintln!("without the guard: {iso}");
    assert!(!iso.contains("audit"));
    // Without the guard, what the guard refuses is possible: this shows the checks below can fail.
    assert_eq!(
        bare.run("import os\nassert os.fork is not None\nos.getpid()"),
        RunOutcome::Passed
    );
    if iso.contains("rofs") {
        let target = repo_file("PWNED-NS");
        let program = format!(
            "import errno\ntry:\n    open({}, 'w')\nexcept OSError as e:\n    assert e.errno == errno.EROFS, e\nelse:\n    raise SystemExit('wrote')",
            py_str(&target)
        );
        assert_eq!(bare.run(&program), RunOutcome::Passed);
        assert!(!target.exists());
        assert_eq!(
            bare.run("open('inside', 'w').write('ok')"),
            RunOutcome::Passed
        );
    } else {
        eprintln!("read-only mounts unavailable here: the repository is protected by the audit guard only");
    }
    if iso.contains("netns") {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let program = format!(
            "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\nexcept OSError:\n    pass\nelse:\n    raise SystemExit('connected')"
        );
        assert_eq!(bare.run(&program), RunOutcome::Passed);
        assert!(listener.accept().is_err(), "the listener saw a connection");
    } else {
        eprintln!(
            "network namespaces unavailable here: the network is blocked by the audit guard only"
        );
    }
}

#[test]
fn many_runs_in_parallel_all_complete() {
    let sb = Sandbox::new(SandboxConfig {
        max_parallel: 3,
        ..SandboxConfig::default()
    })
    .expect("sandbox");
    let outcomes: Vec<(usize, RunOutcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let sb = &sb;
                s.spawn(move || {
                    let program =
                        format!("import time\ntime.sleep(0.05)\nassert {i} % 4 != 3, 'bad {i}'");
                    (i, sb.run(&program))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(outcomes.len(), 16);
    for (i, outcome) in outcomes {
        if i % 4 == 3 {
            match outcome {
                RunOutcome::Failed { reason, .. } => {
                    assert!(reason.contains(&format!("bad {i}")), "{reason}")
                }
                other => panic!("run {i}: {other:?}"),
            }
        } else {
            assert_eq!(outcome, RunOutcome::Passed, "run {i}");
        }
    }
}

#[test]
fn a_missing_interpreter_is_a_clear_error() {
    let err = Sandbox::new(SandboxConfig {
        python: PathBuf::from("/nonexistent/bin/python3"),
        ..SandboxConfig::default()
    })
    .expect_err("no interpreter");
    assert!(matches!(err, SandboxError::PythonMissing { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/bin/python3"),
        "{err}"
    );
}

#[test]
fn environment_is_empty() {
    let program = "import os\nassert 'CARGO_MANIFEST_DIR' not in os.environ, sorted(os.environ)\n\
                   assert os.environ['HOME'] == os.getcwd(), os.environ['HOME']";
    assert_eq!(sandbox().run(program), RunOutcome::Passed);
}
