"""Where the network benchmark's Gloo ranks run, and the link that joins them.

Three kinds, chosen by :func:`open_link` from the rate and what the machine allows:

- the host's own loopback (not root): nothing shaped;
- one network namespace whose loopback is shaped with ``tc``: ``tbf`` for the rate and, for ``rate/<d>ms``,
  ``netem`` for the one-way delay ``d``; every rank runs in it and all of them share the rate;
- where the kernel has no ``sch_netem`` (this development machine's), an **emulated link**
  (:class:`EmulatedLink`): one namespace per rank, each with a TUN device, and one forwarding process that moves
  every IP packet between them through a single first-in-first-out queue drained at the rate (the ranks share
  it, as they share the shaped loopback), then holds it for the delay. Like ``tbf`` with its ``latency 50ms``,
  it drops a packet that would wait more than 50 ms in the queue. The traffic is still the kernel's TCP between
  Gloo's sockets (``GLOO_SOCKET_IFNAME`` names the TUN device); only the wire is emulated.

:meth:`Link.run` runs ``python -m torch.distributed.run`` with the given arguments across the link's ranks (one
``torchrun`` with ``--nproc_per_node n`` in a shared namespace, or one per rank's namespace with ``--nnodes n``),
and :meth:`Link.wire_bytes` counts what crossed it.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import multiprocessing
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
SUBNET = "10.88.0"  # rank r is SUBNET.(r + 1) on its namespace's TUN device
MTU = 65000  # about the loopback's (65536), so both carry TCP segments of the same size
_LINKS = itertools.count()
QUEUE_SECONDS = 0.05  # tail drop past this much queueing, as the shaped loopback's tbf latency 50ms


def free_port() -> int:
    """A TCP port nothing on this host listens on (a fresh namespace has all of them free)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ip(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``args`` (in namespace ``ns``); with ``check``, a RuntimeError naming the command and its stderr if it
    fails."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


_NAMESPACES: list[str] = []  # made here and not yet deleted: cleanup() removes them on any exit


def new_namespace(prefix: str = "tkbench") -> str:
    """A fresh network namespace with its loopback up, deleted by :func:`delete_namespace` or :func:`cleanup`."""
    name = f"{prefix}{os.getpid()}_{len(_NAMESPACES)}_{time.monotonic_ns() % 10**6}"
    _ip(None, "ip", "netns", "add", name)
    _NAMESPACES.append(name)
    try:
        _ip(name, "ip", "link", "set", "lo", "up")
    except BaseException:
        delete_namespace(name)
        raise
    return name


def delete_namespace(ns: str) -> None:
    _ip(None, "ip", "netns", "del", ns, check=False)
    if ns in _NAMESPACES:
        _NAMESPACES.remove(ns)


def cleanup() -> None:
    """Delete every namespace this process made and has not deleted (atexit and signal handlers call it)."""
    while _NAMESPACES:
        delete_namespace(_NAMESPACES[-1])


def _exit_on_signal(signum, frame):  # noqa: ARG001
    cleanup()
    sys.exit(128 + signum)  # SystemExit unwinds: every Link.run kills its processes, every link closes


@contextlib.contextmanager
def cleaned_up():
    """Delete the namespaces this process makes inside the block on any exit from it: an exception, or SIGINT and
    SIGTERM, which exit with 128 + the signal (the previous handlers come back after the block)."""
    main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        cleanup()
        for sig, handler in old.items():
            signal.signal(sig, handler)


def privileged() -> bool:
    """Root with ``ip`` and ``tc``: namespaces can be made and shaped."""
    import shutil

    return hasattr(os, "geteuid") and os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("tc"))


class NoNetem(RuntimeError):
    """The kernel could not add a netem delay (no ``sch_netem``)."""


def shaped_namespace(rate: str) -> str:
    """A fresh namespace whose loopback runs at ``rate`` (tbf: a burst of 1 ms of traffic or two MTUs, 50 ms queue),
    and, for ``rate/<delay>ms``, delays every packet by ``delay`` first (netem, tbf beneath it). On the loopback a
    request and its answer each pass the delay once, so the round trip is twice it: ``100mbit/25ms`` is a 100 Mbit
    link with a 50 ms round trip. :class:`NoNetem` if the kernel has no netem (:func:`open_link` then emulates)."""
    name = new_namespace()
    tc = ["tc", "qdisc", "add", "dev", "lo"]
    try:
        if rate != "unshaped":
            bits = bits_per_second(rate)
            bw, delay_ms = rate_and_delay(rate)
            parent = ["root"]
            if delay_ms:  # netem holds a delay's worth of packets: its queue must too (the default is 1000)
                limit = max(1000, int(bits / 8 * delay_ms / 1000 / 1500) * 4)
                netem = _ip(name, *tc, "root", "handle", "1:", "netem", "delay", f"{delay_ms}ms", "limit", str(limit),
                            check=False)  # fmt: skip
                if netem.returncode != 0:
                    raise NoNetem(f"--rates {rate}: tc could not add a netem delay ({netem.stderr.strip()}); "
                                  "this kernel may lack sch_netem")  # fmt: skip
                parent = ["parent", "1:", "handle", "2:"]
            burst = max(2 * 65536, bits // 8 // 1000)  # a millisecond of traffic, and at least two loopback MTUs:
            # tbf drops every packet larger than its burst, and the loopback's packets are up to 64 KiB
            _ip(name, *tc, *parent, "tbf", "rate", bw, "burst", str(burst), "latency", "50ms")
    except BaseException:
        delete_namespace(name)
        raise
    return name


def open_link(rate: str, ranks: int) -> Link:
    """The link for ``ranks`` ranks at ``rate``: the host's loopback when not :func:`privileged` (``kind``
    "host"), else a namespace shaped by ``tc`` ("tc"; "namespace" when ``rate`` is "unshaped"), or, for a delay
    on a kernel without netem, an :class:`EmulatedLink` ("emulated")."""
    if not privileged():
        return Link(rate, None, "host")
    try:
        return Link(rate, shaped_namespace(rate), "namespace" if rate == "unshaped" else "tc")
    except NoNetem:
        pass
    return EmulatedLink(rate, ranks, bits_per_second(rate), rate_and_delay(rate)[1] / 1e3)


def sent_bytes(ns: str | None, dev: str) -> int:
    """Bytes ``dev`` transmitted in namespace ``ns`` (``/proc/net/dev``)."""
    for line in _ip(ns, "cat", "/proc/net/dev").stdout.splitlines():
        if line.strip().startswith(f"{dev}:"):
            return int(line.split(":")[1].split()[8])
    return 0


class Link:
    """Ranks in one namespace (``ns``; None: the host's), joined by its loopback. ``rate`` is the benchmark's name
    for the link (``"1gbit"``, ``"100mbit/25ms"``, ``"unshaped"``); ``kind`` says how it was made."""

    def __init__(self, rate: str, ns: str | None, kind: str):
        self.rate, self.ns, self.kind = rate, ns, kind

    def _torchrun(self, n: int, argv: list[str], env: dict) -> list[tuple[list[str], dict]]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *argv]  # fmt: skip
        return [((["ip", "netns", "exec", self.ns] if self.ns else []) + cmd, env)]

    def _check(self) -> None:
        """Raise if the link cannot carry a run (the emulated link: its forwarder died)."""

    def run(self, n: int, argv: list[str], env: dict, timeout: float, on_line=None) -> tuple[int, str]:
        """``python -m torch.distributed.run ... argv`` over ``n`` ranks; waits for all of them and returns the first
        nonzero exit code (0 if none) and everything they printed (rank 0's ``torchrun`` first). ``on_line`` is
        called with each line rank 0's ``torchrun`` prints, as it prints it. When one process fails, the others are
        killed (as one ``torchrun`` stops its workers when one fails: a rank left alone would wait for its peer until
        Gloo's timeout). Past ``timeout`` seconds every process is killed and ``subprocess.TimeoutExpired`` raised;
        on any exception (a signal's ``SystemExit`` too) none is left running."""
        self._check()
        logs = [tempfile.TemporaryFile("w+") for _ in range(n)]
        procs, lines, reader, failed = [], [], None, None
        try:
            for i, (cmd, e) in enumerate(self._torchrun(n, argv, env)):
                out = subprocess.PIPE if i == 0 else logs[i]
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=e))

            def read():  # rank 0's pipe, drained as it fills, so that it never blocks the process
                for line in procs[0].stdout:
                    lines.append(line)
                    if on_line is not None:
                        on_line(line)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            deadline = time.monotonic() + timeout
            while None in (codes := [p.poll() for p in procs]):  # every process polled, each time
                failed = next((c for c in codes if c not in (None, 0)), None)
                if failed is not None:
                    break  # one failed: the rest are killed below
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(argv, timeout)
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            if reader is not None:
                reader.join(5)
            text = "".join(lines)
            for f in logs[1:]:
                f.seek(0)
                text += f.read()
            for f in logs:
                f.close()
        return failed if failed is not None else next((p.returncode for p in procs if p.returncode), 0), text

    def wire_bytes(self) -> int:
        """Bytes sent over the link so far (the loopback's transmitted bytes)."""
        return sent_bytes(self.ns, "lo")

    def close(self) -> None:
        if self.ns:
            delete_namespace(self.ns)
            self.ns = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EmulatedLink(Link):
    """``ranks`` namespaces, rank r's TUN device at ``10.88.0.<r+1>``, and a forwarding process between them:
    every packet joins one FIFO queue served at ``bits_per_second``, leaves it, and arrives ``delay_s`` later.
    A packet that would wait more than ``queue_s`` in the queue (at least two full packets' time) is dropped (TCP
    retransmits it, as on a real link with a full buffer). The forwarder runs at real-time priority when it may, so
    that 2 busy cores do not add their scheduling delays to the link's."""

    def __init__(self, rate: str, ranks: int, bits_per_second: int, delay_s: float, queue_s: float = QUEUE_SECONDS):
        if ranks < 1 or ranks > 250:
            raise ValueError(f"ranks: an emulated link joins 1 to 250 namespaces, got {ranks}")
        if bits_per_second <= 0 or delay_s < 0 or queue_s <= 0:
            raise ValueError(f"bits_per_second, delay_s, queue_s: positive (delay_s >= 0), got "
                             f"{bits_per_second}, {delay_s}, {queue_s}")  # fmt: skip
        super().__init__(rate, None, "emulated")
        queue_s = max(queue_s, 2 * MTU * 8 / bits_per_second)  # room for two full packets, as tbf's burst
        tag = f"tk{os.getpid() % 10**5}{next(_LINKS) % 100:02d}r"  # unique on the host while it is made; with the
        # rank (up to 3 digits) at most 13 bytes, under the kernel's 15
        self.namespaces: list[str] = []
        self.devices = [f"{tag}{i}" for i in range(ranks)]
        fork = multiprocessing.get_context("fork")
        self._counter, self._dropped = fork.Value("Q", 0, lock=False), fork.Value("Q", 0, lock=False)
        fds = []
        try:
            for i, dev in enumerate(self.devices):
                ns = new_namespace("tkwan")
                self.namespaces.append(ns)
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
                fds.append(fd)
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
                _ip(None, "ip", "link", "set", dev, "netns", ns)  # the open descriptor keeps serving it there
                _ip(ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
                _ip(ns, "ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", dev)
                _ip(ns, "ip", "link", "set", dev, "mtu", str(MTU), "up")
            args = (fds, bits_per_second, delay_s, queue_s, self._counter, self._dropped)
            self._forwarder = fork.Process(target=_forward, args=args, daemon=True)
            self._forwarder.start()
        except BaseException:
            self.close()
            raise
        finally:
            for fd in fds:  # the forwarder holds its own copies
                os.close(fd)

    def _torchrun(self, n: int, argv: list[str], env: dict) -> list[tuple[list[str], dict]]:
        if n > len(self.namespaces):
            raise ValueError(f"n: this link joins {len(self.namespaces)} ranks, asked for {n}")
        port = str(free_port())
        runs = []
        for r in range(n):
            cmd = ["ip", "netns", "exec", self.namespaces[r], sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", str(n), "--node_rank", str(r), "--nproc_per_node", "1", "--master_addr",
                   f"{SUBNET}.1", "--master_port", port, *argv]  # fmt: skip
            runs.append((cmd, {**env, "GLOO_SOCKET_IFNAME": self.devices[r]}))
        return runs

    def _check(self) -> None:
        if not self._forwarder.is_alive():
            raise RuntimeError(f"the emulated link's forwarder exited (code {self._forwarder.exitcode})")

    def address(self, r: int) -> str:
        return f"{SUBNET}.{r + 1}"

    def wire_bytes(self) -> int:
        """IP bytes the forwarder delivered (dropped packets not counted)."""
        return int(self._counter.value)

    @property
    def dropped(self) -> int:
        """Packets lost so far: dropped at the full queue, or not accepted by the receiving device."""
        return int(self._dropped.value)

    def close(self) -> None:
        fwd = getattr(self, "_forwarder", None)
        if fwd is not None and fwd.is_alive():
            fwd.terminate()
            fwd.join(5)
            if fwd.is_alive():
                fwd.kill()
                fwd.join()
        for ns in self.namespaces:
            delete_namespace(ns)
        self.namespaces = []


def _forward(fds, bits_per_second, delay_s, queue_s, counter, dropped) -> None:
    """The forwarding loop (its own process). A packet read from rank i's device at time t leaves the queue at
    ``max(t, previous departure) + bytes / rate`` and is written to its destination's device ``delay_s`` later.
    It dies with the process that forked it (``PR_SET_PDEATHSIG``), and a signal ends it without running the
    parent's handlers (they would delete the parent's namespaces from here)."""
    import ctypes

    parent = os.getppid()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    _NAMESPACES.clear()  # the parent's, not this process's to delete
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed with the parent
    except (AttributeError, OSError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (AttributeError, PermissionError, OSError):
        pass
    by_addr = {bytes([10, 88, 0, i + 1]): fd for i, fd in enumerate(fds)}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    pending: list[tuple[float, int, int, bytes]] = []  # (arrival, sequence, destination fd, packet)
    free_at, seq = 0.0, 0
    seconds_per_byte = 8.0 / bits_per_second
    while True:
        timeout = None if not pending else max(0.0, pending[0][0] - time.monotonic()) * 1e3
        events = poller.poll(timeout)
        now = time.monotonic()
        for fd, _ in events:
            while True:
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                dst = by_addr.get(pkt[16:20]) if len(pkt) >= 20 and pkt[0] >> 4 == 4 else None
                if dst is None:
                    continue
                start = max(now, free_at)
                if start - now > queue_s:
                    dropped.value += 1
                    continue
                free_at = start + len(pkt) * seconds_per_byte
                seq += 1
                heapq.heappush(pending, (free_at + delay_s, seq, dst, pkt))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, dst, pkt = heapq.heappop(pending)
            try:
                os.write(dst, pkt)
                counter.value += len(pkt)
            except OSError:  # the receiving device is gone or full: the packet is lost, as on a wire
                dropped.value += 1


def rate_and_delay(rate: str) -> tuple[str, float]:
    """``"100mbit/25ms"`` -> ``("100mbit", 25.0)``; no suffix: no delay."""
    bw, _, delay = rate.partition("/")
    if not delay:
        return bw, 0.0
    if not delay.endswith("ms") or not delay[:-2].replace(".", "", 1).isdigit() or float(delay[:-2]) <= 0:
        raise ValueError(
            f"--rates: a delay looks like 100mbit/25ms (one way; the round trip is twice it), got {rate!r}"
        )
    return bw, float(delay[:-2])


def bits_per_second(rate: str) -> int:
    """``"1gbit"`` -> 10**9 (``"100mbit/25ms"``: the rate part)."""
    bw, _ = rate_and_delay(rate)
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
    for u, f in units.items():
        if bw.lower().endswith(u):
            return int(float(bw[: -len(u)]) * f)
    raise ValueError(f"--rates: a rate looks like 100mbit or 1gbit (or unshaped), got {rate!r}")
