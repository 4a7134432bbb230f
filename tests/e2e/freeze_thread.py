#!/usr/bin/env python3
"""Stops one thread of a running process and keeps it stopped until this process ends (SIGTERM).

Usage: freeze_thread.py TID. Through ptrace: PTRACE_SEIZE attaches to that thread alone and PTRACE_INTERRUPT stops it
without a signal, so the process's other threads (a heartbeat thread, say) run on, unlike SIGSTOP, which stops the
whole process. Prints "stopped TID" once the kernel reports the stop. When this process exits the kernel detaches and
the thread resumes. Needs ptrace rights over the target (same user, or CAP_SYS_PTRACE; Yama ptrace_scope <= 1 for a
non-child target needs the same user and scope 0, or root).
"""
import ctypes
import os
import signal
import sys
import time

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000  # __WALL: wait for a thread that is not a child process


def main():
    tid = int(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    for request, name in ((PTRACE_SEIZE, "PTRACE_SEIZE"), (PTRACE_INTERRUPT, "PTRACE_INTERRUPT")):
        if libc.ptrace(request, tid, None, None) != 0:
            sys.exit(f"{name} {tid}: {os.strerror(ctypes.get_errno())}")
    _, status = os.waitpid(tid, WALL)
    if not os.WIFSTOPPED(status):
        sys.exit(f"thread {tid} did not stop (wait status {status:#x})")
    print(f"stopped {tid}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
