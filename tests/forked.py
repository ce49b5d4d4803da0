"""``python -m resnet_jax...`` launched as a child forked from a process that has imported
the package (one per test worker and environment): the launch a user makes, less its ~1 s
of imports (the suite makes some 150). The child gets the launch's argv, environment,
working directory, cores and standard streams, and runs the module as ``__main__``.
``Popen`` is ``subprocess``'s, on a small relay process that ends as the child ends (its
exit code or its signal), so ``communicate``, timeouts and ``kill`` behave as for any
process. Only ``XLA_FLAGS`` may differ between a server's environment and its children's:
JAX reads it when it starts its backend, after the imports. Other commands launch a new
interpreter, as every launch does with ``RESNET_JAX_TESTS_FORK=0``.
"""

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

_SAFE = {'XLA_FLAGS', 'PYTEST_CURRENT_TEST'}  # read after the imports, or not at all

# The server: imports the package, then forks a child per request. A relay sends its
# standard streams (SCM_RIGHTS) and the launch; it is answered with the child's pid, then
# with the child's wait status.
_SERVER = r"""
import json, os, runpy, selectors, socket, sys
import resnet_jax.cli, resnet_jax.main  # the imports each child is spared

listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen(64)
waiting = selectors.DefaultSelector()  # (no threads: forks of a threaded process are unsafe)
waiting.register(listener, selectors.EVENT_READ)
waiting.register(sys.stdin, selectors.EVENT_READ)  # (end of file: the test worker ended)
open(sys.argv[1] + '.ready', 'w').close()


def launch(conn):
    message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while part := conn.recv(1 << 16):  # (the relay shuts its side when all is sent)
        message += part
    launch = json.loads(message)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for key in list(waiting.get_map().values()):  # (the other launches' pidfds and sockets)
            if key.data:  # (sys.stdin: the launch's stdin replaces it)
                os.close(key.fd)
                key.data[1].close()
        waiting.close(), listener.close(), conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(launch['env'])
        os.chdir(launch['cwd'])
        os.sched_setaffinity(0, launch['cores'])
        os.umask(launch['umask'])
        sys.orig_argv = [sys.executable, '-m', launch['module'], *launch['args']]
        sys.argv = [launch['module'], *launch['args']]
        sys.modules.pop(sys.argv[0], None)  # (run as __main__, as -m runs it)
        runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
        sys.exit(0)  # (an exception or SystemExit ends the child as it ends an interpreter)
    for fd in fds:
        os.close(fd)
    conn.sendall(b'%d\n' % pid)
    waiting.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, conn))


while True:
    for key, _ in waiting.select():
        if key.fileobj is listener:
            launch(listener.accept()[0])
            continue
        if key.fileobj is sys.stdin:
            sys.exit()
        pid, conn = key.data
        waiting.unregister(key.fd)
        os.close(key.fd)
        conn.sendall(b'%d\n' % os.waitpid(pid, 0)[1])
        conn.close()
"""

# The relay: its own streams become the child's; it ends as the child ends.
_RELAY = r"""
import json, os, signal, socket, sys
path, request, pid_fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
launch = json.loads(request)
launch.update(cwd=os.getcwd(), env=dict(os.environ), cores=sorted(os.sched_getaffinity(0)),
              umask=os.umask(0))
conn = socket.socket(socket.AF_UNIX)
conn.connect(path)
socket.send_fds(conn, [json.dumps(launch).encode()], [0, 1, 2])
conn.shutdown(socket.SHUT_WR)
lines = conn.makefile('rb')
child = int(lines.readline())
os.write(pid_fd, b'%d\n' % child)
os.close(pid_fd)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(sig, lambda s, f: os.kill(child, s))
status = int(lines.readline())
if os.WIFSIGNALED(status):
    if os.WTERMSIG(status) != signal.SIGKILL:
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""

_servers = {}  # the environment's import-time part -> (server process, socket path)


def _socket_path(env) -> str:
    """The socket of the server started (on first use) in ``env``, less its safe keys."""
    key = frozenset((k, v) for k, v in env.items() if k not in _SAFE)
    if key not in _servers:
        path = os.path.join(tempfile.mkdtemp(prefix='resnet_jax_forks_'), 'socket')
        process = subprocess.Popen(
            [sys.executable, '-c', _SERVER, path],
            env=dict(key),
            stdin=subprocess.PIPE,  # held open by this process alone
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # (a test's Ctrl-C or killpg stays with the launches)
        )
        if not _servers:
            atexit.register(_stop_servers)
        _servers[key] = process, path
    process, path = _servers[key]
    while not os.path.exists(path + '.ready'):
        if process.poll() is not None:
            raise RuntimeError('the fork server ended at start-up (its stderr is above)')
        time.sleep(0.02)
    return path


def _stop_servers():
    for process, _ in _servers.values():
        process.stdin.close()  # (its end of file: the server exits)
    for process, _ in _servers.values():
        process.wait(10)


def _forkable(args, env) -> str | None:
    """The server socket for a launch that a fork honours (None: a new interpreter)."""
    if len(args) < 3 or args[0] != sys.executable or args[1] != '-m':
        return None
    if not args[2].startswith('resnet_jax') or os.environ.get('RESNET_JAX_TESTS_FORK') == '0':
        return None
    return _socket_path(os.environ if env is None else env)


class Popen(subprocess.Popen):
    """``subprocess.Popen`` for a launch (a forked child behind a relay where it can be)."""

    def __init__(self, args, **kwargs):
        own = kwargs.get('preexec_fn') or kwargs.get('pass_fds')  # (a fork cannot honour)
        path = None if own else _forkable(list(map(str, args)), kwargs.get('env'))
        self._child = None
        if path is None:
            super().__init__(args, **kwargs)
            return
        read, write = os.pipe()
        request = json.dumps({'module': args[2], 'args': list(map(str, args[3:]))})
        try:
            super().__init__(
                [sys.executable, '-S', '-c', _RELAY, path, request, str(write)],
                pass_fds=(write,),
                **kwargs,
            )
        finally:
            os.close(write)
        with os.fdopen(read, 'rb') as pid:
            line = pid.readline()
        if line:  # (empty: the relay failed before the fork; its exit code says so)
            self._child = int(line)

    def send_signal(self, sig):
        """To the child (a SIGKILL would end only the relay)."""
        if self._child is None:
            return super().send_signal(sig)
        self.poll()
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # (it ended; the relay is about to)
                os.kill(self._child, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)


def pid(process: subprocess.Popen) -> int:
    """The launched process's pid (a forked child's, not its relay's)."""
    return getattr(process, '_child', None) or process.pid


def run(args, *, timeout=None, check=False, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` on ``Popen``."""
    if kwargs.pop('capture_output', False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with Popen(args, **kwargs) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    if check:
        result.check_returncode()
    return result
