"""A process that takes fcntl locks on command, for the mount tests (tests/mount.rs).

Reads one command per line on stdin and answers one line on stdout:
  open PATH            -> ok | err ERRNO
  ofd                  -> ok (later lock commands use OFD locks)
  lock r|w START LEN wait|nb -> ok | err EAGAIN | err EDEADLK | err EINTR
  unlock START LEN     -> ok
  getlk r|w START LEN  -> free | r|w START LEN PID
  close                -> ok (closes the descriptor)
  incr N               -> the counter's last value (N times: lock, read, +1, write, unlock)
  pid                  -> this process's pid
A waiting lock interrupted by SIGINT answers `err EINTR`.
"""
import errno
import fcntl
import os
import struct
import sys

FLOCK = "hhqqi4x"
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
fd = None
ofd = False


def flock(kind, start, length):
    t = {"r": fcntl.F_RDLCK, "w": fcntl.F_WRLCK, "u": fcntl.F_UNLCK}[kind]
    return struct.pack(FLOCK, t, 0, start, length, 0)


def lock(kind, start, length, wait):
    if ofd:
        cmd = F_OFD_SETLKW if wait else F_OFD_SETLK
    else:
        cmd = fcntl.F_SETLKW if wait else fcntl.F_SETLK
    fcntl.fcntl(fd, cmd, flock(kind, start, length))


def answer(line):
    global fd, ofd
    w = line.split()
    if w[0] == "open":
        fd = os.open(w[1], os.O_RDWR)
        return "ok"
    if w[0] == "ofd":
        ofd = True
        return "ok"
    if w[0] == "lock":
        try:
            lock(w[1], int(w[2]), int(w[3]), w[4] == "wait")
        except KeyboardInterrupt:
            return "err EINTR"
        return "ok"
    if w[0] == "unlock":
        lock("u", int(w[1]), int(w[2]), False)
        return "ok"
    if w[0] == "getlk":
        cmd = F_OFD_GETLK if ofd else fcntl.F_GETLK
        t, _, start, length, pid = struct.unpack(FLOCK, fcntl.fcntl(fd, cmd, flock(w[1], int(w[2]), int(w[3]))))
        if t == fcntl.F_UNLCK:
            return "free"
        return "%s %d %d %d" % ("w" if t == fcntl.F_WRLCK else "r", start, length, pid)
    if w[0] == "close":
        os.close(fd)
        fd = None
        return "ok"
    if w[0] == "incr":
        value = 0
        for i in range(int(w[1])):
            step = "lock"
            try:
                lock("w", 0, 0, True)
                step = "read"
                value = int(os.pread(fd, 8, 0) or b"0") + 1
                step = "write"
                os.pwrite(fd, b"%08d" % value, 0)
                step = "unlock"
                lock("u", 0, 0, False)
            except OSError as e:
                e.strerror = "%s at increment %d (%s)" % (e.strerror, i, step)
                raise
        return str(value)
    if w[0] == "pid":
        return str(os.getpid())
    return "unknown command"


for line in sys.stdin:
    if not line.strip():
        continue
    try:
        out = answer(line)
    except OSError as e:
        # EDEADLK and EDEADLOCK are one number on Linux; Python names it by the latter.
        name = "EDEADLK" if e.errno == errno.EDEADLK else errno.errorcode.get(e.errno, str(e.errno))
        out = "err " + name
        if "increment" in str(e.strerror):
            sys.stderr.write("%s\n" % e.strerror)
    print(out, flush=True)
