"""Results of any size (SPEC 11): large results as artifacts on a local directory and on
S3 (a real S3-compatible server the tests start: moto's standalone server, in a thread
on a loopback port), references in real Redis.

Disk full is tested on a real 2 MB tmpfs when this process may mount one (root), and
always through an fsspec filesystem that fails with ENOSPC in the middle of a write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dateutil.tz
import numpy as np
import pandas as pd
import pytest
from conftest import cleanup_prefix
from pandas.testing import assert_frame_equal, assert_index_equal, assert_series_equal
from test_codec import INDEX, frame_cases

from nbflow import ArtifactError, Engine, WorkflowEntrypoint
from nbflow.artifacts import ArtifactStore
from nbflow.cli import main as cli_main
from nbflow.codec import ArtifactRef, ArtifactSummary

MiB = 1024 * 1024


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    d = tmp_path / "artifacts"
    d.mkdir()
    return d


@contextlib.contextmanager
def make_engine(redis_url: str, names: Any, **kw: Any) -> Iterator[Engine]:
    prefix, queue = names
    eng = Engine(redis_url, prefix=prefix, queue=queue, **kw)
    try:
        yield eng
    finally:
        eng.stop_worker()
        cleanup_prefix(eng.redis, prefix, queue)


@pytest.fixture
def eng(redis_url: str, names: Any, store_dir: Path) -> Iterator[Engine]:
    """An engine whose artifacts go to a fresh directory, with a small threshold."""
    with make_engine(redis_url, names, artifacts=str(store_dir), artifact_threshold=10_000) as e:
        yield e


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def big_frame(rows: int = 20_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "i": np.arange(rows, dtype="int64"),
            "f": rng.random(rows),
            "s": pd.array([f"r{i % 97}" for i in range(rows)], dtype="str"),
            "t": pd.date_range("2024-01-01", periods=rows, freq="s", tz="Europe/Paris"),
            "c": pd.Categorical(["a", "b", "c", "d"] * (rows // 4)),
            "n": pd.array([None if i % 7 == 0 else i for i in range(rows)], dtype="Int64"),
        }
    )


def run_to_end(engine: Engine, inst: Any, timeout: float = 60) -> dict[str, Any]:
    engine.start_worker()
    return dict(inst.wait(timeout=timeout))


def index_counts(engine: Engine) -> dict[str, int]:
    raw = engine.redis.hgetall(engine.keys.artifacts)
    return {k.decode(): int(v) for k, v in raw.items()}


class Returns(WorkflowEntrypoint):
    """Returns the value in ``self.env['value']`` from step 'make', then its own output."""

    async def run(self, event, step):
        value = await step.do("make", lambda: self.env["value"])
        await step.do("after", lambda: "small")
        return value


# -- round trips ------------------------------------------------------------------------------


def series_cases() -> list[Any]:
    return [
        pd.Series([1, 2, 3], name="n"),
        pd.Series([1.0, np.nan], index=["a", "b"], name=None),
        pd.Series(["x", None], name=("tuple", "name")),
        pd.Series([1.0, 2.0], index=pd.Index([("a", 1), ("b", 2)])),
        pd.Series(pd.Categorical(["a", "b"]), index=INDEX[:2], name=0),
        pd.Series(pd.array([1, None], dtype="Int64"), name="nullable"),
        pd.Series(pd.date_range("2024", periods=2, tz="America/New_York"), name="t"),
        pd.Series([], dtype="float64"),
    ]


def dateutil_cases() -> list[Any]:
    return [
        pytest.param(
            pd.DataFrame(
                {"t": pd.date_range("2024-03-30", periods=3, tz="dateutil/Europe/Paris")},
                index=pd.date_range(
                    "2024", periods=3, freq="h", tz=dateutil.tz.gettz("America/New_York")
                ),
            ),
            id="dateutil-column-and-index",
        ),
        pytest.param(
            pd.DataFrame({"t": pd.to_datetime(["2024-01-01"] * 9).as_unit("s")}), id="seconds"
        ),
        pytest.param(
            pd.DataFrame({"s": pd.array(["a", None] * 5, dtype="string[python]")}),
            id="string-python",
        ),
    ]


def assert_same(result: Any, value: Any) -> None:
    if isinstance(value, pd.Series):
        assert isinstance(result, pd.Series)
        assert_series_equal(result, value, check_exact=True)
        assert result.name == value.name or (result.name is None and value.name is None)
    else:
        assert isinstance(result, pd.DataFrame)
        assert_frame_equal(result, value, check_exact=True)
        assert list(result.dtypes) == list(value.dtypes)
        assert_index_equal(result.columns, value.columns, exact=True)
    assert_index_equal(result.index, value.index, exact=True)
    assert getattr(result.index, "freq", None) == getattr(value.index, "freq", None)


@pytest.mark.parametrize(
    "value", [*frame_cases(), *dateutil_cases(), *(pytest.param(s) for s in series_cases())]
)
def test_every_frame_the_codec_keeps_round_trips_exactly_through_an_artifact(
    value: Any, store_dir: Path
) -> None:
    store = ArtifactStore(str(store_dir), prefix="p", threshold=0)
    ref_json, url, _ = store.write(value, "inst", "step 'x'")
    fresh = ArtifactStore(str(store_dir), prefix="p", threshold=0)  # nothing in memory
    from nbflow import codec

    ref = codec.decode(ref_json)
    assert isinstance(ref, ArtifactRef) and ref.url == url
    assert_same(fresh.load(ref, "step 'x'"), value)


def test_frames_parquet_cannot_keep_exactly_are_stored_as_json_and_still_round_trip(
    store_dir: Path,
) -> None:
    store = ArtifactStore(str(store_dir), prefix="p", threshold=0)
    mixed = pd.DataFrame({"o": pd.Series([{"k": [1]}, 3, "s", None] * 10, dtype=object)})
    plain = big_frame(100)
    from nbflow import codec

    formats = {}
    for name, value in {"mixed": mixed, "plain": plain}.items():
        ref = codec.decode(store.write(value, "i", name)[0])
        formats[name] = ref.format
        assert_same(ArtifactStore(str(store_dir), prefix="p").load(ref, name), value)
    assert formats == {"mixed": "json", "plain": "parquet"}


# -- steps, summaries, references -------------------------------------------------------------


def test_a_large_frame_step_is_an_artifact_with_a_small_reference_and_a_summary(
    eng: Engine, store_dir: Path
) -> None:
    frame = big_frame()
    eng.env = {"value": frame}
    inst = eng.register(Returns).create()
    out = run_to_end(eng, inst)
    assert out["status"] == "complete"
    assert_same(out["output"], frame)
    steps = inst.steps()
    summary = steps.loc[steps["step"] == "make", "output"].iloc[0]
    assert isinstance(summary, ArtifactSummary)
    assert summary.startswith("DataFrame 20,000 × 6 (")
    assert "MB" in summary or "kB" in summary
    assert repr(summary) == str(summary)
    assert_same(inst.step_output("make"), frame)
    raw = eng.redis.hget(eng.keys.steps(inst.id), "make#1")
    assert len(raw) < 1024, raw
    # the run returned the step's own frame: one file, referred to twice (step and output)
    [path] = files(store_dir)
    assert path.suffix == ".parquet"
    assert index_counts(eng) == {"file://" + str(path): 2}
    assert isinstance(inst.info()["output"], ArtifactSummary)


def test_small_results_stay_in_redis_and_no_file_is_written(eng: Engine, store_dir: Path) -> None:
    eng.env = {"value": pd.DataFrame({"a": [1, 2, 3]})}
    inst = eng.register(Returns).create()
    assert run_to_end(eng, inst)["status"] == "complete"
    assert files(store_dir) == []
    assert isinstance(inst.steps()["output"].iloc[0], pd.DataFrame)
    assert index_counts(eng) == {}


def test_the_threshold_decides_and_none_turns_artifacts_off(
    redis_url: str, names: Any, store_dir: Path
) -> None:
    value = list(range(5000))  # about 24 kB of JSON
    with make_engine(redis_url, names, artifacts=str(store_dir), artifact_threshold=None) as e:
        e.env = {"value": value}
        inst = e.register(Returns).create()
        assert run_to_end(e, inst)["output"] == value
        assert files(store_dir) == []
    with make_engine(redis_url, names, artifacts=str(store_dir), artifact_threshold=20_000) as e:
        e.env = {"value": value}
        inst = e.register(Returns).create()
        assert run_to_end(e, inst)["output"] == value
        assert inst.step_output("make") == value
        assert [p.suffix for p in files(store_dir)] == [".json"]
        assert str(inst.steps()["output"].iloc[0]).startswith("list (")


def test_max_step_bytes_no_longer_caps_what_goes_to_an_artifact_but_max_artifact_bytes_does(
    redis_url: str, names: Any, store_dir: Path
) -> None:
    blob = bytes(range(256)) * (17 * MiB // 256)  # over the default max_step_bytes
    with make_engine(redis_url, names, artifacts=str(store_dir)) as e:
        e.env = {"value": blob}
        inst = e.register(Returns).create()
        out = run_to_end(e, inst)
        assert out["status"] == "complete" and out["output"] == blob
    with make_engine(redis_url, names, artifacts=str(store_dir), max_artifact_bytes=MiB) as e:
        e.env = {"value": blob}
        inst = e.register(Returns).create()
        out = run_to_end(e, inst)
        assert out["status"] == "errored"
        assert out["error"]["name"] == "ValueError"
        assert "max_artifact_bytes" in out["error"]["message"]
        assert "make" in out["error"]["message"]
        assert inst.steps()["attempts"].tolist() == [1]


def test_a_replay_reads_the_frame_from_the_workers_memory(eng: Engine, store_dir: Path) -> None:
    class Sleeps(WorkflowEntrypoint):
        async def run(self, event, step):
            frame = await step.do("make", lambda: big_frame())
            await step.sleep("nap", "200 milliseconds")
            return await step.do("rows", lambda: len(frame))

    inst = eng.register(Sleeps).create()
    eng.start_worker()
    deadline = time.monotonic() + 30
    while inst.status()["status"] != "waiting" and time.monotonic() < deadline:
        time.sleep(0.01)
    for path in files(store_dir):  # gone from disk: only the worker's memory has it now
        path.unlink()
    out = inst.wait(timeout=30)
    assert out == {"status": "complete", "output": 20_000}


# -- faults: missing, corrupt, unreachable ----------------------------------------------------


def test_a_corrupt_artifact_is_an_error_naming_the_step_and_the_url(
    redis_url: str, names: Any, store_dir: Path
) -> None:
    with make_engine(redis_url, names, artifacts=str(store_dir), artifact_threshold=10_000) as e:
        e.env = {"value": big_frame()}
        inst = e.register(Returns).create()
        assert run_to_end(e, inst)["status"] == "complete"
        e.stop_worker()
        [path] = files(store_dir)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with make_engine(redis_url, names, artifacts=str(store_dir)) as other:  # no cache
            again = other.instance(inst.id)
            with pytest.raises(ArtifactError) as info:
                again.step_output("make")
            message = str(info.value)
            assert "'make'" in message and str(path) in message and "sha256" in message


def test_a_missing_artifact_errors_the_replay_naming_the_step_and_url(
    redis_url: str, names: Any, store_dir: Path
) -> None:
    with make_engine(redis_url, names, artifacts=str(store_dir), artifact_threshold=10_000) as e:
        e.env = {"value": big_frame()}
        inst = e.register(Returns).create()
        assert run_to_end(e, inst)["status"] == "complete"
        e.stop_worker()
        [path] = files(store_dir)
        path.unlink()
        with make_engine(
            redis_url, names, artifacts=str(store_dir), artifact_threshold=10_000
        ) as fresh:  # another process, as it were: nothing of the frame in its memory
            fresh.env = e.env
            fresh.register(Returns)
            again = fresh.instance(inst.id)
            with pytest.raises(ArtifactError, match="cannot be read"):
                again.step_output("make")
            again.restart(from_step="after")  # 'make' replays from its (missing) artifact
            out = run_to_end(fresh, again)
            assert out["status"] == "errored"
            assert out["error"]["name"] == "ArtifactError"
            assert "'make'" in out["error"]["message"] and str(path) in out["error"]["message"]


def test_a_location_that_does_not_exist_or_is_no_directory_is_refused_at_engine(
    redis_url: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="does not exist") as info:
        Engine(redis_url, artifacts=str(tmp_path / "nope"))
    assert "file://" in str(info.value) and "nope" in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        Engine(redis_url, artifacts=str(tmp_path / "file"))
    with pytest.raises(ValueError, match="artifact_threshold"):
        Engine(redis_url, artifacts=str(tmp_path), artifact_threshold=-1)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_read_only_location_is_refused_at_engine_and_at_the_first_write(
    redis_url: str, names: Any, tmp_path: Path
) -> None:
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(ValueError, match="not writable"):
            Engine(redis_url, artifacts=str(ro))
    with mounted_tmpfs(tmp_path / "rw", "size=1m") as rw:
        with make_engine(redis_url, names, artifacts=str(rw), artifact_threshold=100) as e:
            subprocess.run(["mount", "-o", "remount,ro", str(rw)], check=True)
            e.env = {"value": "x" * 1000}

            class Once(WorkflowEntrypoint):
                async def run(self, event, step):
                    return await step.do("make", {"retries": {"limit": 0}}, lambda: "x" * 1000)

            inst = e.register(Once).create()
            out = run_to_end(e, inst)
            assert out["status"] == "errored"
            assert out["error"]["name"] == "ArtifactError"
            assert "file://" + str(rw) in out["error"]["message"]
            assert "not writable" in out["error"]["message"]


class ShrinksOnRetry(WorkflowEntrypoint):
    """Attempt 1 returns a frame too large for the disk; attempt 2 a smaller one."""

    async def run(self, event, step):
        def make(ctx):
            rows = 400_000 if ctx.attempt == 1 else 20_000
            return pd.DataFrame({"f": np.random.default_rng(1).random(rows)})

        frame = await step.do("make", {"retries": {"limit": 1, "delay": "10 milliseconds"}}, make)
        return len(frame)


def test_a_disk_that_fills_up_mid_write_fails_the_attempt_and_the_retry_succeeds(
    redis_url: str, names: Any, tmp_path: Path
) -> None:
    with mounted_tmpfs(tmp_path / "small", "size=2m") as small:
        with make_engine(redis_url, names, artifacts=str(small), artifact_threshold=1000) as e:
            inst = e.register(ShrinksOnRetry).create()
            out = run_to_end(e, inst)
            assert out == {"status": "complete", "output": 20_000}
            assert inst.steps()["attempts"].tolist() == [2]
            retried = [h for h in inst.history() if h.get("ev") == "step.retrying"]
            assert retried, inst.history()
            left = files(small)
            assert len(left) == 1 and left[0].suffix == ".parquet"  # no partial file
            assert index_counts(e) == {"file://" + str(left[0]): 1}


def test_an_object_store_filling_up_mid_write_leaves_nothing_referenced(
    redis_url: str, names: Any
) -> None:
    """The same through fsspec (a filesystem whose writes fail with ENOSPC after 1 MB)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class FullFile(fsspec.implementations.memory.MemoryFile):  # type: ignore[misc]
        def write(self, data: Any) -> int:
            if self.tell() + len(memoryview(data).cast("B")) > MiB:
                raise OSError(errno.ENOSPC, "No space left on device")
            return int(super().write(data))

    class FullFS(MemoryFileSystem):  # type: ignore[misc]
        protocol = "nbflowfull"
        store: dict[str, Any] = {}
        pseudo_dirs = [""]

        def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
            if "w" in mode:
                return FullFile(self, self._strip_protocol(path))
            return super()._open(path, mode, **kw)

    fsspec.register_implementation("nbflowfull", FullFS, clobber=True)
    full = "nbflowfull://bucket"
    with make_engine(redis_url, names, artifacts=full, artifact_threshold=1000) as e:
        inst = e.register(ShrinksOnRetry).create()
        out = run_to_end(e, inst)
        assert out == {"status": "complete", "output": 20_000}
        assert inst.steps()["attempts"].tolist() == [2]
        assert len(FullFS.store) == 1  # only the second attempt's artifact was committed
        [url] = index_counts(e)
        assert url.startswith("nbflowfull://bucket/")


# -- deleting: restart, terminate, retention, gc ----------------------------------------------


class TwoFrames(WorkflowEntrypoint):
    async def run(self, event, step):
        a = await step.do("a", lambda: big_frame(seed=1))
        b = await step.do("b", lambda: big_frame(seed=2))
        return len(a) + len(b)


def test_restart_deletes_the_artifacts_no_step_refers_to_any_more(
    eng: Engine, store_dir: Path
) -> None:
    inst = eng.register(TwoFrames).create()
    assert run_to_end(eng, inst)["status"] == "complete"
    first = files(store_dir)
    assert len(first) == 2
    a_url = inst.steps()["output"].iloc[0].ref.url
    inst.restart(from_step="b")  # keeps a, drops b
    assert inst.wait(timeout=30)["status"] == "complete"
    now = files(store_dir)
    assert len(now) == 2 and a_url in {"file://" + str(p) for p in first}
    assert a_url in index_counts(eng) and len(index_counts(eng)) == 2
    kept = [p for p in now if "file://" + str(p) == a_url]
    assert kept, "step a's artifact is kept"
    inst.restart()
    assert inst.wait(timeout=30)["status"] == "complete"
    assert a_url not in {"file://" + str(p) for p in files(store_dir)}
    assert len(files(store_dir)) == 2 and len(index_counts(eng)) == 2


def test_terminate_keeps_results_and_retention_then_deletes_them(
    redis_url: str, names: Any, store_dir: Path
) -> None:
    class Waits(WorkflowEntrypoint):
        async def run(self, event, step):
            await step.do("a", lambda: big_frame())
            await step.wait_for_event("go", "go")

    with make_engine(
        redis_url, names, artifacts=str(store_dir), artifact_threshold=10_000, retention=0.2
    ) as e:
        inst = e.register(Waits).create()
        e.run_worker(burst=True)
        inst.send_event("other", big_frame(seed=3))  # buffered, never consumed
        assert len(files(store_dir)) == 2 and len(index_counts(e)) == 2
        inst.terminate()
        assert len(files(store_dir)) == 1  # the buffered event's payload went with it
        assert_same(inst.step_output("a"), big_frame())
        time.sleep(0.3)
        e.run_worker(burst=True)  # its sweep applies retention
        assert inst.status() == {"status": "unknown"}
        assert files(store_dir) == [] and index_counts(e) == {}


def test_event_payloads_go_to_artifacts_and_come_back_whole(eng: Engine) -> None:
    class Waits(WorkflowEntrypoint):
        async def run(self, event, step):
            got = await step.wait_for_event("data", "data")
            return await step.do("rows", lambda: len(got["payload"]))

    inst = eng.register(Waits).create()
    frame = big_frame()
    inst.send_event("data", frame)
    assert run_to_end(eng, inst) == {"status": "complete", "output": 20_000}
    shown = inst.steps()["output"].iloc[0]
    assert isinstance(shown["payload"], ArtifactSummary)
    assert_same(inst.step_output("data")["payload"], frame)


def test_nbflow_gc_removes_orphans_only(eng: Engine, store_dir: Path) -> None:
    eng.env = {"value": big_frame()}
    inst = eng.register(Returns).create()
    assert run_to_end(eng, inst)["status"] == "complete"
    [kept] = files(store_dir)
    orphan = store_dir / eng.prefix / inst.id / "orphan.parquet"
    orphan.write_bytes(b"left by a crash")
    young = store_dir / eng.prefix / "other" / "young.json"
    young.parent.mkdir()
    young.write_bytes(b"being written")
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    os.utime(kept, (old, old))
    url = "redis://{host}:{port}/{db}".format(**eng.redis.connection_pool.connection_kwargs)
    base = ["gc", "--redis", url, "--prefix", eng.prefix, "--artifacts", str(store_dir)]
    assert cli_main([*base, "--dry-run"]) == 0
    assert orphan.exists()
    assert cli_main(base) == 0
    assert not orphan.exists()
    assert kept.exists() and young.exists()
    assert_same(inst.step_output("make"), big_frame())


def test_cli_worker_writes_to_the_artifacts_it_is_given(
    eng: Engine, tmp_path: Path, redis_url: str
) -> None:
    (tmp_path / "art_flows.py").write_text(
        "import pandas as pd\n"
        "from nbflow import WorkflowEntrypoint\n"
        "class BigList(WorkflowEntrypoint):\n"
        "    async def run(self, event, step):\n"
        "        return await step.do('make', lambda: list(range(300_000)))\n"
    )
    other = tmp_path / "elsewhere"
    other.mkdir()
    eng.register(Returns, name="BigList")  # (this process only creates it)
    inst = eng.workflow("BigList").create()
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "nbflow.cli", "worker", "--redis", redis_url]
    cmd += ["--prefix", eng.prefix, "--queue", eng.queue_name, "--import", "art_flows"]
    cmd += ["--artifacts", str(other), "--burst"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"artifacts=file://{other}" in done.stdout
    assert [p.suffix for p in files(other)] == [".json"]
    assert inst.step_output("make") == list(range(300_000))


# -- S3, against an S3-compatible server started here ------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = f"nbflow-{uuid.uuid4().hex[:8]}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(
        Bucket=bucket
    )
    try:
        yield {
            "endpoint": endpoint,
            "bucket": bucket,
            "options": {
                "key": "testing",
                "secret": "testing",
                "endpoint_url": endpoint,
                "client_kwargs": {"region_name": "us-east-1"},
            },
        }
    finally:
        server.stop()


def test_s3_artifacts_round_trip_summarise_and_are_deleted_on_restart(
    redis_url: str, names: Any, s3: dict[str, Any]
) -> None:
    import s3fs

    location = f"s3://{s3['bucket']}/run-{uuid.uuid4().hex[:6]}"
    with make_engine(
        redis_url,
        names,
        artifacts=location,
        artifact_options=s3["options"],
        artifact_threshold=10_000,
    ) as e:
        inst = e.register(TwoFrames).create()
        assert run_to_end(e, inst) == {"status": "complete", "output": 40_000}
        summary = inst.steps()["output"].iloc[0]
        assert summary.startswith("DataFrame 20,000 × 6") and summary.ref.url.startswith(location)
        fs = s3fs.S3FileSystem(**s3["options"])
        assert len(fs.find(location)) == 2
        with make_engine(
            redis_url, names, artifacts=location, artifact_options=s3["options"]
        ) as reader:  # another engine: nothing in its memory, read from S3 and checked
            assert_same(reader.instance(inst.id).step_output("b"), big_frame(seed=2))
            inst.restart()
            assert inst.wait(timeout=60)["status"] == "complete"
            fs.invalidate_cache()
            assert len(fs.find(location)) == 2  # the first run's two were deleted
            assert set(index_counts(e)) == {fs.unstrip_protocol(p) for p in fs.find(location)}


def test_s3_without_credentials_fails_the_step_saying_so(
    redis_url: str, names: Any, s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask the network
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    location = f"s3://{s3['bucket']}/nocreds"
    options = {"endpoint_url": s3["endpoint"], "skip_instance_cache": True}
    with make_engine(
        redis_url, names, artifacts=location, artifact_options=options, artifact_threshold=100
    ) as e:

        class Once(WorkflowEntrypoint):
            async def run(self, event, step):
                return await step.do("make", {"retries": {"limit": 0}}, lambda: "x" * 1000)

        inst = e.register(Once).create()
        out = run_to_end(e, inst)
        assert out["status"] == "errored"
        assert out["error"]["name"] == "ArtifactError"
        message = out["error"]["message"]
        assert location in message and "credentials" in message.lower()
        assert "nbflow worker --artifacts" in message


def test_a_fork_counts_its_copied_artifact_references_so_a_restart_of_the_original_keeps_the_file(
    tmp_path: Path, redis_url: str, names: tuple[str, str]
) -> None:
    prefix, queue = names
    eng = Engine(
        redis_url, prefix=prefix, queue=queue, artifacts=str(tmp_path), artifact_threshold=1000
    )
    try:

        class BigThenDone(WorkflowEntrypoint):
            def run(self, event: Any, step: Any) -> Any:
                frame = step.do("big", lambda: pd.DataFrame({"x": range(5000)}))
                return step.do("done", lambda: len(frame))

        eng.register(BigThenDone)
        eng.start_worker()
        inst = eng.workflow("BigThenDone").create(id="orig")
        assert inst.wait(timeout=20)["output"] == 5000
        files = list(tmp_path.rglob("*.parquet"))
        assert len(files) == 1
        fork = inst.fork(from_step="done", id="copy")
        assert fork.wait(timeout=20)["output"] == 5000
        inst.restart()  # the original's reference is dropped; the fork's still holds the file
        inst.wait(timeout=20)
        assert files[0].exists()
        pd.testing.assert_frame_equal(fork.step_output("big"), pd.DataFrame({"x": range(5000)}))
    finally:
        eng.stop_worker()
        cleanup_prefix(eng.redis, prefix, queue)
