"""Workers on separate hosts (spec 5: "at most one worker advances an instance at any moment,
on any number of machines"): two hosts made as network namespaces ``nbf-h1`` and ``nbf-h2``,
each joined to the root namespace by its own veth pair on a private /30 of 10.213.0.0/16, and
one throwaway ``redis-server`` bound only to the root-side veth addresses (and loopback, for
the test itself).  A worker runs inside each namespace.  Host 1 is cut off (its veth set down)
while it runs a long step; the instance moves to host 2 once host 1's lease expires.  When
host 1 comes back, its late result of the interrupted step must not overwrite host 2's.

Traffic goes only to the test hosts' addresses and loopback.  The namespaces and links are
removed by the fixture's finalizer, also on failure.  Skipped where network namespaces cannot
be made (not root, no iproute2, no CAP_SYS_ADMIN).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers_procs import (
    FLOW_SOURCE,
    Procs,
    RedisServer,
    free_port,
    load_module,
    poll,
    slow_marks,
    wait_workers,
    write_module,
)

from nbflow import Engine

HOSTS = {  # namespace: (root-side veth, host-side veth, root address, host address)
    "nbf-h1": ("nbf-r1", "nbf-n1", "10.213.1.1", "10.213.1.2"),
    "nbf-h2": ("nbf-r2", "nbf-n2", "10.213.2.1", "10.213.2.2"),
}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _teardown_hosts() -> None:
    for ns, (root_if, *_rest) in HOSTS.items():
        _ip("link", "del", root_if, check=False)  # removes both ends of the pair
        _ip("netns", "del", ns, check=False)


@pytest.fixture
def hosts() -> Iterator[dict[str, tuple[str, str, str, str]]]:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    _teardown_hosts()  # left over by a run that was killed
    try:
        for ns, (root_if, host_if, root_ip, host_ip) in HOSTS.items():
            _ip("netns", "add", ns)
            _ip("link", "add", root_if, "type", "veth", "peer", "name", host_if)
            _ip("link", "set", host_if, "netns", ns)
            _ip("addr", "add", f"{root_ip}/30", "dev", root_if)
            _ip("link", "set", root_if, "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
            _ip("netns", "exec", ns, "ip", "link", "set", host_if, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        _teardown_hosts()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
    try:
        for ns, (*_rest, root_ip, _host_ip) in HOSTS.items():  # each host reaches its gateway
            done = _ip("netns", "exec", ns, "ping", "-c1", "-W2", root_ip, check=False)
            if done.returncode != 0 and shutil.which("ping"):
                pytest.skip(f"{ns} cannot reach {root_ip}: {done.stdout}{done.stderr}")
        yield HOSTS
    finally:
        _teardown_hosts()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def _cut_off_and_take_over(
    hosts: Any, procs: Procs, tmp_path: Path, names: tuple[str, str], real_lease: bool
) -> None:
    prefix, queue = names
    port = free_port()
    root_ips = [hosts[ns][2] for ns in ("nbf-h1", "nbf-h2")]
    srv = RedisServer(tmp_path / "redis", port=port, bind=["127.0.0.1", *root_ips]).start()
    try:
        local = f"redis://127.0.0.1:{port}/0"
        engine = Engine(local, prefix=prefix, queue=queue)
        module = write_module(tmp_path, f"nbf_plan_{prefix}", FLOW_SOURCE)
        flow = engine.register(load_module(tmp_path, module).Plan)
        fx = redis.Redis.from_url(local)
        k = f"{prefix}:fx"

        def worker(ns: str) -> Any:
            url = f"redis://{hosts[ns][2]}:{port}/0"
            return procs.worker(
                ns,
                url,
                prefix,
                queue,
                module,
                netns=ns,
                env={"NBF_HOST": ns, "NBF_FX_URL": url},
            )

        fx.set(k + ":hold", 1)
        h1 = worker("nbf-h1")
        plan = [["do", "a"], ["block", "b"], ["do", "c"]]
        inst = flow.create(params={"fx": local, "k": k, "plan": plan})
        poll(lambda: fx.get(f"{k}:in:{inst.id}"), 30, f"host 1 to start step b\n{procs.logs()}")
        assert fx.hget(k, f"{inst.id}:b:start") == b"1"
        h2 = worker("nbf-h2")
        wait_workers(engine.redis, queue, 2)  # host 2's worker is up too

        root_if = hosts["nbf-h1"][0]
        _ip("link", "set", root_if, "down")  # host 1 is cut off, mid-step
        t_cut = time.monotonic()
        fx.delete(k + ":hold")  # the re-run of step b returns at once
        if not real_lease:
            engine.redis.zadd(engine.keys.leases, {inst.id: 0})  # stand-in for 30 s passing
        status = inst.wait(timeout=70 if real_lease else 20)
        took = time.monotonic() - t_cut
        assert status["status"] == "complete", (status, procs.logs())
        if real_lease:
            assert took < 60, f"took {took:.1f}s to move to host 2"
        out = status["output"]
        assert out == ["a-nbf-h1-1", "b-nbf-h2-2", "c-nbf-h2-1"], out
        assert h2.poll() is None and h1.poll() is None

        # host 1 comes back: its step b finishes late; its result must not be stored
        _ip("link", "set", root_if, "up")
        poll(
            lambda: fx.hget(k, f"{inst.id}:b") == b"2",
            40,
            f"host 1's late step to finish\n{procs.log('nbf-h1')}",
        )
        time.sleep(0.5)  # its write has been refused by now
        assert inst.status() == status
        assert inst.step_output("b") == "b-nbf-h2-2"
        steps = inst.steps().set_index("step")
        assert steps.loc["b", "attempts"] == 2
        assert fx.hget(k, f"{inst.id}:a:start") == b"1"
        assert fx.hget(k, f"{inst.id}:c:start") == b"1"
        # and host 1 is a working host again
        again = flow.create(params={"fx": local, "k": k, "plan": [["do", "x"]]})
        assert again.wait(timeout=20)["status"] == "complete"
        assert h1.poll() is None, procs.log("nbf-h1")
    finally:
        procs.close()
        srv.stop()


def test_host_cut_off_mid_step_instance_moves_to_the_other_host(
    hosts: Any, procs: Procs, tmp_path: Path, names: tuple[str, str]
) -> None:
    """Short version: the cut-off host's lease is made to expire at once."""
    _cut_off_and_take_over(hosts, procs, tmp_path, names, real_lease=False)


@pytest.mark.parametrize("_", [pytest.param(0, marks=slow_marks("waits the real 30 s lease"))])
def test_host_cut_off_mid_step_moves_after_the_real_lease(
    hosts: Any, procs: Procs, tmp_path: Path, names: tuple[str, str], _: int
) -> None:
    _cut_off_and_take_over(hosts, procs, tmp_path, names, real_lease=True)
