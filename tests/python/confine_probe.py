"""What a program can do from inside `internvl-grpc confine`, the video
decoder's confinement: run by tests/it/confine.rs (and inside the runc pod by
tests/it/kubelet.rs) as `internvl-grpc confine ... -- python3 -I -S -c <this>`,
since under Landlock this file itself is out of reach.

argv: the files to try reading (a model, a service-account token), then the
server's pid. Prints one JSON object: each attempt's outcome, "ok" or the
errno's name.
"""
import ctypes
import errno
import json
import os
import resource
import socket
import sys

secrets, server_pid = sys.argv[1:-1], int(sys.argv[-1])
libc = ctypes.CDLL(None, use_errno=True)
out = {}


def attempt(name, action):
    try:
        action()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))


def call(result):
    """A libc call's result as Python raises it."""
    if result == -1:
        n = ctypes.get_errno()
        raise OSError(n, os.strerror(n))
    return result


def read(path):
    with open(path, "rb") as f:
        f.read(16)


# The network: any socket at all, then a connection by name.
attempt("socket_inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
attempt("socket_inet6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close())
attempt("socket_unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
attempt("connect_loopback", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1).close())
# Files: the secrets, anything written, other processes' details.
for i, path in enumerate(secrets):
    attempt(f"read_secret_{i}", lambda path=path: read(path))
attempt("write_tmp", lambda: open("/tmp/internvl-confine-probe", "wb").close())


def write_beside(path):
    """A file created (then removed) beside the first secret: in a pod, the
    model volume, which the server itself may write."""
    probe = os.path.join(os.path.dirname(path), ".internvl-confine-probe")
    open(probe, "wb").close()
    os.unlink(probe)


if secrets:
    attempt("write_beside_secret_0", lambda: write_beside(secrets[0]))
attempt("read_etc_passwd", lambda: read("/etc/passwd"))
attempt("read_server_environ", lambda: read(f"/proc/{server_pid}/environ"))
attempt("read_server_memory", lambda: read(f"/proc/{server_pid}/mem"))
# Other processes: signals, tracing; namespaces.
attempt("signal_server", lambda: os.kill(server_pid, 0))
attempt("signal_everyone", lambda: os.kill(-1, 0))
# PTRACE_SEIZE: attaches without stopping the server (ATTACH would stop it
# where it is allowed, the unconfined run); the tracer's exit detaches.
attempt("ptrace_server", lambda: call(libc.ptrace(0x4206, server_pid, 0, 0)))
attempt("unshare_user", lambda: call(libc.unshare(0x10000000)))  # CLONE_NEWUSER
attempt("unshare_net", lambda: call(libc.unshare(0x40000000)))  # CLONE_NEWNET
# Descriptors other than stdin, stdout and stderr: none should be open.
open_fds = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass
out["inherited_fds"] = open_fds
# What it must still do: read the system's files and its stdin.
attempt("read_usr", lambda: read(sys.executable))
attempt("read_stdin", lambda: os.read(0, 16))
# As FFmpeg opens its input: by the name /dev/stdin (a link to the memfd).
attempt("read_dev_stdin", lambda: read("/dev/stdin"))
out["no_new_privs"] = libc.prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
out["seccomp_mode"] = libc.prctl(21, 0, 0, 0, 0)  # PR_GET_SECCOMP
out["rlimit_as"] = resource.getrlimit(resource.RLIMIT_AS)[0]
out["rlimit_core"] = resource.getrlimit(resource.RLIMIT_CORE)[0]
out["rlimit_fsize"] = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
print(json.dumps(out))
