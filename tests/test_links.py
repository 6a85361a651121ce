"""The network benchmark's links (``torchkit.apps.links``): the emulated link's delay, rate and byte count, checked
with the kernel's own TCP between two namespaces, and Gloo ranks under ``torchrun`` across it. Needs root, ``ip``
and ``/dev/net/tun`` (the benchmark's own requirements); the lower bounds asserted cannot be met early by a loaded
machine, only late."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from torchkit.apps import links

needs_root = pytest.mark.skipif(
    not (links.privileged() and os.path.exists("/dev/net/tun")), reason="needs root, ip, tc and /dev/net/tun"
)

SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("{addr}", 5555)); s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
c.sendall(c.recv(1))  # the echo the client times
n = 0
while b := c.recv(1 << 20):
    n += len(b)
c.sendall(str(n).encode())
"""

CLIENT = """
import json, socket, time
c = socket.create_connection(("{addr}", 5555))
t = time.perf_counter(); c.sendall(b"x"); c.recv(1); rtt = time.perf_counter() - t
data = bytes({size})
t = time.perf_counter(); c.sendall(data); c.shutdown(socket.SHUT_WR); got = int(c.recv(100))
print(json.dumps({{"rtt": rtt, "seconds": time.perf_counter() - t, "received": got}}))
"""


def test_rates_and_delays_are_parsed_and_bad_ones_named():
    assert links.rate_and_delay("100mbit/25ms") == ("100mbit", 25.0)
    assert links.rate_and_delay("1gbit") == ("1gbit", 0.0)
    assert links.bits_per_second("2.5gbit/10ms") == 2_500_000_000
    for bad in ("fast", "1gbit/25", "1gbit/0ms", "1gbit/-3ms"):
        with pytest.raises(ValueError, match="--rates"):
            links.bits_per_second(bad)


def _packet(dst: int, size: int) -> bytes:
    """An IPv4-looking datagram of ``size`` bytes to rank ``dst`` (what the forwarder reads: the version nibble and
    the destination address)."""
    head = bytes([0x45]) + bytes(15) + bytes([10, 88, 0, dst + 1])
    return head + bytes(size - len(head))


def test_the_forwarder_queues_at_the_rate_delays_and_drops_past_the_queue_limit():
    # no root: the forwarding loop between two socket pairs standing in for the TUN devices
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    for theirs, _ in pairs:
        theirs.setblocking(False)
    rate, delay, queue, size = 8_000_000, 0.03, 0.025, 10_000  # 10 ms per packet on the wire
    ctx = multiprocessing.get_context("fork")
    sent, lost = ctx.Value("Q", 0, lock=False), ctx.Value("Q", 0, lock=False)
    fwd = ctx.Process(target=links._forward, args=([p[0].fileno() for p in pairs], rate, delay, queue, sent, lost),
                      daemon=True)  # fmt: skip
    fwd.start()
    try:
        ours0, ours1 = pairs[0][1], pairs[1][1]
        ours1.settimeout(5)
        t0 = time.monotonic()
        for _ in range(6):  # a burst: 1 on the wire at once, 2 wait 10 and 20 ms, the other 3 would wait > 20 ms
            ours0.send(_packet(1, size))
        ours0.send(_packet(7, size))  # no such rank: not forwarded
        arrivals = []
        for _ in range(3):
            assert len(ours1.recv(65536)) == size
            arrivals.append(time.monotonic() - t0)
        ours1.settimeout(0.3)
        with pytest.raises(TimeoutError):
            ours1.recv(65536)  # the three past the queue's limit were dropped
    finally:
        fwd.terminate()
        fwd.join()
    serial = size * 8 / rate
    # on the wire one at a time, then the delay: packet k arrives no sooner than k + 1 serialisations and the delay
    # after the burst (lower bounds only: a receiver that runs late on a loaded machine only delays the arrivals; the
    # gaps between them, asserted before, shrank when it then read two at once)
    assert all(arrivals[k] >= delay + (k + 1) * serial for k in range(3)), arrivals
    assert arrivals[2] < delay + 3 * serial + 0.05
    assert sent.value == 3 * size and lost.value == 3


class _Scripted(links.Link):
    """A link whose ranks are given commands (no torchrun), to test how :meth:`links.Link.run` handles them."""

    def __init__(self, scripts):
        super().__init__("unshaped", None, "host")
        self.scripts = scripts

    def _torchrun(self, n, argv, env):
        return [([sys.executable, "-c", code], env) for code in self.scripts[:n]]


def test_run_stops_every_rank_when_one_fails_and_on_a_timeout():
    slow = "import time; print('waiting', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    code, text = _Scripted([slow, "import sys; print('rank 1 fails'); sys.exit(3)"]).run(2, [], dict(os.environ), 60)
    assert code == 3 and "rank 1 fails" in text and time.monotonic() - t0 < 30  # rank 0 was not waited for
    lines = []
    with pytest.raises(subprocess.TimeoutExpired):
        _Scripted([slow, slow]).run(2, [], dict(os.environ), 2, on_line=lines.append)
    assert lines == ["waiting\n"]  # rank 0's lines as they come
    code, text = _Scripted(["print('a')", "print('b')"]).run(2, [], dict(os.environ), 60)
    assert code == 0 and text == "a\nb\n"  # rank 0's output first


def test_an_emulated_link_refuses_bad_arguments_before_making_anything():
    with pytest.raises(ValueError, match="ranks"):
        links.EmulatedLink("1gbit/1ms", 0, 10**9, 0.001)
    with pytest.raises(ValueError, match="delay_s"):
        links.EmulatedLink("1gbit/1ms", 2, 10**9, -0.001)


@needs_root
def test_the_emulated_link_delays_each_way_limits_the_rate_and_counts_the_bytes():
    delay, rate, size = 0.015, 50_000_000, 2_000_000
    with links.EmulatedLink("50mbit/15ms", 2, rate, delay) as link:
        server = subprocess.Popen(["ip", "netns", "exec", link.namespaces[1], sys.executable, "-c",
                                   SERVER.format(addr=link.address(1))], stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert server.stdout.readline().strip() == "listening"
            out = subprocess.run(["ip", "netns", "exec", link.namespaces[0], sys.executable, "-c",
                                  CLIENT.format(addr=link.address(1), size=size)], capture_output=True, text=True,
                                 timeout=60, check=True)  # fmt: skip
            server.wait(30)
        finally:
            server.kill()
        got = json.loads(out.stdout)
        assert got["received"] == size  # TCP delivered every byte (the queue's drops were retransmitted)
        assert 2 * delay <= got["rtt"] < 2 * delay + 0.025  # a request and its answer each wait the delay, once
        assert size * 8 / rate <= got["seconds"] < 3 * size * 8 / rate + 0.3  # the rate, give or take slow start
        assert link.wire_bytes() >= size  # the payload, plus headers, handshakes and acknowledgements
        made = list(link.namespaces)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in made)  # closed: the namespaces are gone
    assert not link._forwarder.is_alive()


@needs_root
@pytest.mark.dist
def test_gloo_ranks_under_torchrun_train_across_the_emulated_link(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, time, torch, torch.distributed as dist
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        x = torch.full((4,), float(rank + 1))
        dist.all_reduce(x)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(3):
            dist.all_reduce(torch.ones(1))
        per_round = (time.perf_counter() - t) / 3
        if rank == 0:
            with open({str(tmp_path / "out.json")!r}, "w") as f:
                json.dump({{"sum": x.tolist(), "per_round": per_round, "world": dist.get_world_size()}}, f)
        dist.barrier()
        os._exit(0)
        """)
    )
    delay = 0.01
    with links.EmulatedLink("1gbit/10ms", 2, 10**9, delay) as link:
        code, text = link.run(2, [str(script)], {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
        assert code == 0, text
        assert link.wire_bytes() > 0
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["world"] == 2 and got["sum"] == [3.0] * 4
    assert got["per_round"] >= 2 * delay  # an all-reduce of two ranks waits at least one round trip


@needs_root
def test_open_link_shapes_with_tc_and_emulates_a_delay_only_where_netem_is_missing():
    kinds = {}
    for rate in ("unshaped", "1gbit", "1gbit/10ms"):
        with links.open_link(rate, 2) as link:
            kinds[rate] = link.kind
            made = list(getattr(link, "namespaces", [])) + [link.ns]
    assert kinds["unshaped"] == "namespace" and kinds["1gbit"] == "tc"
    assert kinds["1gbit/10ms"] in ("tc", "emulated")  # netem where the kernel has it
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns and ns in listed for ns in made) and not links._NAMESPACES
