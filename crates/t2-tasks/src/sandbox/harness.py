# Runs inside the sandboxed interpreter (`python -I -S -B -c <this>`). The job (nonce, limits, solution,
# tests) arrives on stdin so that nothing about the tests is on disk or in argv where the solution could
# read it. The verdict is one line carrying the nonce, so a solution that exits early (sys.exit(0),
# os._exit(0)) or prints its own "PASS" cannot pass.
def _t2_harness():
    import sys, os, json, resource, builtins

    job = json.loads(sys.stdin.buffer.read())
    nul = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nul, 0)
    os.close(nul)

    nonce = job["nonce"]
    root = job["root"]
    solution = job["solution"]
    tests = job["tests"]
    for name, value in job["limits"]:
        res = getattr(resource, name, None)
        if res is not None:
            try:
                resource.setrlimit(res, (value, value))
            except (ValueError, OSError):
                # A hard limit below ours already binds harder; keep it.
                pass

    # Everything used after the solution runs is bound here: the solution may rebind builtins and
    # module attributes, but cannot reach these locals (frame introspection is refused below).
    _compile, _exec, _isinstance, _str, _type, _len = (
        builtins.compile, builtins.exec, builtins.isinstance, builtins.str, builtins.type, builtins.len)
    _write, _exit, _getcwd, _fspath = os.write, os._exit, os.getcwd, os.fspath
    _out, _err = sys.stdout, sys.stderr
    _PermissionError, _ValueError, _RuntimeError, _AttributeError = (
        PermissionError, ValueError, RuntimeError, AttributeError)
    _bytes, _int, _bool, _BaseException, _TypeError = bytes, int, bool, BaseException, TypeError
    _any, _enumerate, _getattr = builtins.any, builtins.enumerate, builtins.getattr
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def normalize(path):
        if _isinstance(path, _bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            path = _getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "" or part == ".":
                continue
            if part == "..":
                if parts:
                    parts.pop()
            else:
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(path):
        try:
            path = _fspath(path)
        except _TypeError:
            return False
        if _isinstance(path, _int):
            return False
        p = normalize(path)
        return p == root or p.startswith(root + "/")

    def deny(what):
        raise _PermissionError(13, "sandbox: " + what + " is not allowed")

    def dir_fd_given(*fds):
        for fd in fds:
            if fd is not None and fd != -1:
                return True
        return False

    exact = {
        "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.fork", "os.forkpty",
        "os.posix_spawn", "os.kill", "os.killpg", "os.startfile", "pty.spawn", "os.symlink", "os.link",
        "signal.pthread_kill", "sys.remote_exec", "os.chroot",
    }
    # Events that modify paths: (indices of the modified paths, indices of dir_fd arguments).
    mutating = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()), "os.chflags": ((0,), ()),
        "os.lchflags": ((0,), ()), "os.lchmod": ((0,), ()), "os.setxattr": ((0,), ()),
        "os.removexattr": ((0,), ()), "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)),
        "shutil.rmtree": ((0,), (1,)), "shutil.move": ((0, 1), ()), "shutil.chown": ((0,), ()),
        "shutil.copymode": ((1,), ()), "shutil.copystat": ((1,), ()), "shutil.copytree": ((1,), ()),
    }
    # Modules whose mere import gives process creation without any audit event.
    banned_imports = {"_posixsubprocess", "_xxsubinterpreters", "_ctypes"}
    frame_attrs = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"}

    def guard(event, args):
        if event in exact:
            deny(event)
        if event.startswith("socket.") or event.startswith("ctypes."):
            deny(event)
        if event == "open":
            path, mode, flags = args
            if mode is None:
                writing = _bool(flags & write_flags)
                # os.open's event omits dir_fd, so a relative path could be relative to any directory.
                if writing and not (_isinstance(path, (_str, _bytes)) and (path[:1] in ("/", b"/"))):
                    deny("os.open for writing with a relative path")
            else:
                writing = _any(c in mode for c in "wax+")
            if writing and not _isinstance(path, _int) and not inside(path):
                deny("writing " + _str(path))
            return
        spec = mutating.get(event)
        if spec is not None:
            paths, dir_fds = spec
            if event == "os.truncate" and _isinstance(args[0], _int):
                return  # ftruncate needs a descriptor opened for writing, which "open" already vetted
            for i in paths:
                if i < _len(args) and not inside(args[i]):
                    deny(event + " on " + _str(args[i]))
            for i in dir_fds:
                # The paths are relative to a directory the event does not name.
                if i < _len(args) and dir_fd_given(args[i]):
                    deny(event + " with dir_fd")
            return
        if event == "import" and args[0] in banned_imports:
            deny("import " + args[0])
        # The nonce and the tests live in this function's frame: refuse the ways to reach it.
        if event == "sys._getframe":
            raise _ValueError("call stack is not available in the sandbox")
        if event in ("sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects",
                     "gc.get_referrers", "gc.get_referents", "sys.setrecursionlimit"):
            deny(event)
        if event == "object.__getattr__" and args[1] in frame_attrs:
            raise _AttributeError(args[1] + " is not available in the sandbox")
        if event == "sys.addaudithook":
            # RuntimeError makes CPython refuse the new hook silently.
            raise _RuntimeError("no further audit hooks")

    if job["audit"]:
        sys.addaudithook(guard)

    def describe(exc):
        try:
            name = _type(exc).__name__
            text = _str(exc)
        except _BaseException:
            return "an exception"
        text = text.replace("\n", " ")
        if _len(text) > 300:
            text = text[:300] + "..."
        return name + (": " + text if text else "")

    def finish(ok, message):
        for stream in (_out, _err):
            try:
                stream.flush()
            except _BaseException:
                pass
        line = "\n" + nonce + (" PASS " if ok else " FAIL ") + message.replace("\n", " ")[:1000] + "\n"
        try:
            _write(2, line.encode("utf-8", "replace"))
        finally:
            _exit(0 if ok else 1)

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        code = _compile(solution, "<solution>", "exec")
    except _BaseException as e:
        where = " (line %d)" % e.lineno if _isinstance(_getattr(e, "lineno", None), _int) else ""
        finish(False, "the solution does not compile: " + describe(e) + where)
    try:
        _exec(code, namespace)
    except _BaseException as e:
        finish(False, "the solution raised " + describe(e))
    for i, test in _enumerate(tests, 1):
        shown = test.strip()
        if _len(shown) > 200:
            shown = shown[:200] + "..."
        try:
            test_code = _compile(test, "<test %d>" % i, "exec")
        except _BaseException as e:
            finish(False, "test %d does not compile: %s" % (i, describe(e)))
        try:
            _exec(test_code, namespace)
        except _BaseException as e:
            finish(False, "test %d failed: %s [%s]" % (i, describe(e), shown))
    finish(True, "%d tests passed" % _len(tests))


globals().pop("_t2_harness")()
