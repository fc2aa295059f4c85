"""The LoRAX launcher's exact command lines (launcher/src/main.rs, upstream @ a7394ba) against `lorax-server`:
`download-weights` before serving, `serve` per rank with the launcher's environment, JSON log lines the
launcher can parse, refusals as one line, and hub ids resolved from the local Hugging Face cache."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorax_server.cli import DEFAULT_MODEL_DIR
from lorax_server.utils import sources
from lorax_server.utils.logging_setup import LEVELS, JsonFormatter, level_name

ADAPTERS = DEFAULT_MODEL_DIR.parent / "adapters"
ENTRY_POINT = Path(sys.executable).parent / "lorax-server"
LORAX_SERVER = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "lorax_server.cli"]
REPO_ID, COMMIT, COMMIT_V2 = "acme/tiny-mixtral", "0123456789abcdef0123456789abcdef01234567", "f" * 40


def download_argv(model_id, source="hub", adapter_source="hub", revision=None, adapter_id=None):
    """launcher/src/main.rs download_convert_model()."""
    argv = ["download-weights", model_id, "--extension", ".safetensors", "--logger-level", "INFO", "--json-output",
            "--source", source, "--adapter-source", adapter_source]
    if revision:
        argv += ["--revision", revision]
    if adapter_id:
        argv += ["--adapter-id", adapter_id]
    return argv


def serve_argv(model_id, uds_path, source="hub", adapter_source="hub", *options):
    """launcher/src/main.rs shard_manager(): the fixed part, then the optional flags in the launcher's order."""
    return ["serve", model_id, "--uds-path", uds_path, "--logger-level", "INFO", "--json-output", "--source", source,
            "--adapter-source", adapter_source, *options]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT=str(free_port()),
               NCCL_ASYNC_ERROR_HANDLING="1", CUDA_MEMORY_FRACTION="1", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def run(argv, env=None, timeout=60):
    return subprocess.run(LORAX_SERVER + argv, capture_output=True, text=True, timeout=timeout,
                          env=env or launcher_env())


def assert_launcher_parses(stdout: str):
    """Every stdout line is what the launcher's PythonLogMessage reads: `text` and `record.level.name`."""
    lines = stdout.splitlines()
    assert lines
    records = [json.loads(line) for line in lines]
    for record in records:
        assert isinstance(record["text"], str) and record["record"]["level"]["name"] in LEVELS
        assert {"time", "name", "message", "exception"} <= set(record["record"])
    return records


def assert_one_line_error(result, *words):
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def hub_cache(tmp_path):
    """A Hugging Face cache holding the embedded model as `acme/tiny-mixtral`: main -> COMMIT (files are
    symlinks to blobs, as huggingface_hub lays them), and tag v2 -> COMMIT_V2."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    for commit, ref in ((COMMIT, "main"), (COMMIT_V2, "v2")):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in DEFAULT_MODEL_DIR.iterdir():
            blob = repo / "blobs" / f"{commit[:8]}-{file.name}"
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return cache


# -- download-weights ------------------------------------------------------------------------------------


def test_download_weights_exits_0_when_the_weights_are_here():
    result = run(download_argv(str(DEFAULT_MODEL_DIR), adapter_id=str(ADAPTERS / "zen")))
    assert result.returncode == 0, result.stderr
    records = assert_launcher_parses(result.stdout)
    messages = [r["record"]["message"] for r in records]
    assert f"model {DEFAULT_MODEL_DIR}: 1 .safetensors weight files in {DEFAULT_MODEL_DIR}" in messages
    assert any(m.startswith(f"adapter {ADAPTERS / 'zen'}: 1 ") for m in messages)
    assert messages[-1] == "Files are already present on the host. Skipping download."


def test_download_weights_from_the_hub_cache_and_the_log_level_alias(hub_cache):
    env = launcher_env(HF_HUB_CACHE=str(hub_cache))
    result = run(download_argv(REPO_ID, revision="v2"), env=env)
    assert result.returncode == 0, result.stderr
    assert str(hub_cache / "models--acme--tiny-mixtral" / "snapshots" / COMMIT_V2) in result.stdout
    result = run(["download-weights", REPO_ID, "--log-level", "debug"], env=env)  # this project's old spelling
    assert result.returncode == 0 and COMMIT in result.stdout, result.stderr


def test_download_weights_of_what_is_not_here_is_one_line(hub_cache, tmp_path):
    env = launcher_env(HF_HUB_CACHE=str(hub_cache))
    assert_one_line_error(run(download_argv("acme/elsewhere"), env=env), "acme/elsewhere", str(hub_cache))
    assert_one_line_error(run(download_argv(REPO_ID, revision="v3"), env=env), "revision 'v3'")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run(download_argv(str(tmp_path / "empty"))), "no *.safetensors weight files")
    assert_one_line_error(run(download_argv(str(DEFAULT_MODEL_DIR), adapter_id="acme/no-adapter")), "--adapter-id")


def test_download_weights_of_a_truncated_file_is_one_line(tmp_path):
    """Present is not whole: a weight file cut short (an interrupted copy) is named, not reported as here."""
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_one_line_error(run(download_argv(str(model))), f"{weights} is not a readable safetensors file")


# -- refusals --------------------------------------------------------------------------------------------

MODEL = str(DEFAULT_MODEL_DIR)


@pytest.mark.parametrize("argv, words", [
    (["serve", MODEL, "--source", "s3"], ["--source s3", "not reachable"]),
    (["serve", MODEL, "--adapter-id", "org/a", "--adapter-source", "pbase"], ["--adapter-source pbase"]),
    (["serve", MODEL, "--preloaded-adapter-ids", "org/a", "--preloaded-adapter-source", "s3"],
     ["--preloaded-adapter-source s3"]),
    (["serve", MODEL, "--source", "ftp"], ["--source ftp", "unknown source"]),
    (["serve", MODEL, "--quantize", "gptq"], ["--quantize gptq", "FP8 checkpoints"]),
    (["serve", MODEL, "--quantize", "int3"], ["--quantize"]),  # not one of upstream's choices: a usage error
    (["serve", MODEL, "--dtype", "float16", "--quantize", "awq"], ["--dtype and --quantize"]),
    (["serve", MODEL, "--speculative-tokens", "3"], ["--speculative-tokens 3", "no speculative decoding"]),
    (["serve", MODEL, "--embedding-dim", "768"], ["--embedding-dim 768"]),
    (["serve", MODEL, "--merge-adapter-weights"], ["--merge-adapter-weights needs --adapter-id"]),
    (["serve", MODEL, str(ADAPTERS / "zen"), "--adapter-id", str(ADAPTERS / "shout")], ["ADAPTER_ID", "differ"]),
    (["serve", "/nowhere/model"], ["MODEL_ID /nowhere/model", "not a local directory"]),
    (["serve", MODEL, "--logger-level", "LOUD"], ["--logger-level LOUD"]),
    (["serve", MODEL, "--no-such-option"], ["--no-such-option"]),
    (["download-weights", MODEL, "--embedding-dim", "768"], ["--embedding-dim 768"]),
    (["download-weights", MODEL, "--source", "pbase"], ["--source pbase"]),
])
def test_refusals_are_one_line_naming_the_option(argv, words):
    assert_one_line_error(run(argv), *words)


def test_sharded_needs_the_launchers_environment():
    env = launcher_env()
    del env["MASTER_ADDR"], env["MASTER_PORT"]
    assert_one_line_error(run(["serve", MODEL, "--sharded"], env=env), "--sharded", "missing: MASTER_ADDR, MASTER_PORT")


def test_a_bad_cuda_memory_fraction_is_one_line():
    assert_one_line_error(run(["serve", MODEL], env=launcher_env(CUDA_MEMORY_FRACTION="2")), "CUDA_MEMORY_FRACTION")


def test_a_refusal_is_also_an_error_record_for_the_launcher():
    result = run(["serve", MODEL, "--json-output", "--quantize", "gptq"])
    assert_one_line_error(result, "--quantize gptq: this server serves")
    record = assert_launcher_parses(result.stdout)[-1]["record"]
    assert record["level"]["name"] == "ERROR" and "--quantize gptq" in record["message"]


# -- serve -----------------------------------------------------------------------------------------------


def info_of_served(argv, env, socket_path: Path, timeout: float = 90.0):
    """Starts `lorax-server` with `argv`, waits for unix://PATH-0 to answer Info; returns (Info, client,
    process). The caller stops the process."""
    from lorax_server.client import ShardClient
    from lorax_server.pb import generate_pb2 as pb

    log = open(socket_path.parent / "server.log", "w+")  # a file, not a pipe: a full pipe would block the server
    process = subprocess.Popen(LORAX_SERVER + argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + timeout
    while not socket_path.exists():  # what the launcher waits for
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log.seek(0)
            pytest.fail(f"the server did not start (exit {process.poll()}):\n{log.read()[-4000:]}")
        time.sleep(0.1)
    client = ShardClient(f"unix://{socket_path}")
    client.wait_ready(timeout=30)
    return client.stub.Info(pb.InfoRequest(), timeout=30), client, process


def stop(process, socket_path: Path):
    process.terminate()
    assert process.wait(timeout=30) == 0  # SIGTERM stops the server cleanly
    return (socket_path.parent / "server.log").read_text()


def test_serve_with_the_launchers_command_line(tmp_path):
    uds = tmp_path / "lorax-server"
    argv = serve_argv(MODEL, str(uds), "hub", "hub", "--compile")
    info, client, process = info_of_served(argv, launcher_env(), Path(f"{uds}-0"))
    try:
        assert info.supports_generation and info.device_type == "cpu" and info.dtype == "torch.float32"
        assert info.block_size > 0 and info.speculate == 0 and not info.preloaded_adapters
    finally:
        client.close()
        log = stop(process, Path(f"{uds}-0"))
    assert_launcher_parses(log)


def test_serve_with_every_launcher_option(tmp_path, hub_cache):
    """A hub id at a revision, the default adapter merged, a preloaded local adapter, and every other flag the
    launcher may pass; base requests then answer as the merged adapter does."""
    from lorax_server.client import make_request
    from lorax_server.models import get_model
    from lorax_server.pb import generate_pb2 as pb

    uds = tmp_path / "lorax-server"
    argv = serve_argv(REPO_ID, str(uds), "hub", "local",
                      "--adapter-id", str(ADAPTERS / "zen"), "--trust-remote-code", "--sharded", "--compile",
                      "--speculative-tokens", "0", "--preloaded-adapter-ids", str(ADAPTERS / "shout"),
                      "--merge-adapter-weights", "--preloaded-adapter-source", "local", "--dtype", "float32",
                      "--revision", "v2", "--otlp-endpoint", "http://127.0.0.1:4317")
    env = launcher_env(HF_HUB_CACHE=str(hub_cache))
    info, client, process = info_of_served(argv, env, Path(f"{uds}-0"))
    try:
        assert [(p.adapter_index, list(p.adapter_parameters.adapter_ids), p.adapter_source)
                for p in info.preloaded_adapters] == [(1, [str(ADAPTERS / "shout")], pb.LOCAL)]
        prompt = "The for statement"
        served = client.run_to_completion(1, [make_request(0, prompt, max_new_tokens=8)])[0]
    finally:
        client.close()
        log = stop(process, Path(f"{uds}-0"))
    assert str(hub_cache / "models--acme--tiny-mixtral" / "snapshots" / COMMIT_V2) in log
    expected = get_model(MODEL, dtype="float32", kv_cache_bytes=1 << 20)
    if expected.device.type == "cpu":  # the server ran on the CPU (CUDA_VISIBLE_DEVICES="")
        expected.adapters.load(1, ADAPTERS / "zen")
        assert served.text == expected.generate([prompt], 8, adapter_indices=[1])[0].text


def test_two_ranks_started_as_the_launcher_does(tmp_path):
    """No torchrun: one `serve --sharded` process per rank with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; the
    ranks meet over gloo, each answers on PATH-RANK, and driven in lockstep (as the router does) they generate
    the same tokens."""
    from concurrent.futures import ThreadPoolExecutor

    from lorax_server.client import ShardClient, make_request
    from lorax_server.pb import generate_pb2 as pb

    uds = tmp_path / "lorax-server"
    port = str(free_port())
    processes = []
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "w")
        env = launcher_env(RANK=str(rank), WORLD_SIZE="2", MASTER_PORT=port)
        processes.append(subprocess.Popen(LORAX_SERVER + serve_argv(MODEL, str(uds), "hub", "hub", "--sharded",
                                                                    "--compile"),
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
    clients = []
    try:
        deadline = time.monotonic() + 90
        while not all(Path(f"{uds}-{rank}").exists() for rank in range(2)):  # what the launcher waits for
            assert all(p.poll() is None for p in processes) and time.monotonic() < deadline, "a rank did not start"
            time.sleep(0.1)
        clients = [ShardClient(f"unix://{uds}-{rank}") for rank in range(2)]
        for client in clients:
            client.wait_ready(timeout=30)
        infos = [client.stub.Info(pb.InfoRequest(), timeout=30) for client in clients]
        assert all(info.supports_generation for info in infos)
        requests = [make_request(i, p, max_new_tokens=6, ignore_eos_token=True)
                    for i, p in enumerate(["The for statement", "A list is"])]
        with ThreadPoolExecutor(2) as pool:
            texts = list(pool.map(lambda c: {i: g.text for i, g in c.run_to_completion(1, requests).items()}, clients))
        assert texts[0] == texts[1] and len(texts[0]) == 2
    finally:
        for client in clients:
            client.close()
        for process in processes:
            process.terminate()
        for rank, process in enumerate(processes):
            assert process.wait(timeout=30) == 0, (tmp_path / f"rank{rank}.log").read_text()[-3000:]


# -- pieces ----------------------------------------------------------------------------------------------


def test_hub_ids_resolve_from_the_local_cache(hub_cache, monkeypatch, tmp_path):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    snapshots = hub_cache / "models--acme--tiny-mixtral" / "snapshots"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sources.hf_hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))  # $HF_HOME/hub
    assert sources.resolve(REPO_ID, "hub") == snapshots / COMMIT
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(hub_cache))  # what the launcher sets
    assert sources.resolve(REPO_ID, "hub", "v2") == snapshots / COMMIT_V2
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    assert sources.resolve(REPO_ID, "hub", COMMIT_V2) == snapshots / COMMIT_V2  # a commit, not a ref
    assert sources.resolve(str(DEFAULT_MODEL_DIR), "hub", "v2") == DEFAULT_MODEL_DIR  # a directory wins
    assert sources.resolve("models--acme--tiny-mixtral/snapshots/" + COMMIT, "local") == snapshots / COMMIT
    with pytest.raises(FileNotFoundError, match="revision 'v3' is not in the local Hugging Face cache"):
        sources.resolve(REPO_ID, "hub", "v3")
    with pytest.raises(FileNotFoundError, match="not a local directory, nor a Hugging Face model id"):
        sources.resolve("/no/such/dir", "hub")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        sources.resolve(REPO_ID, "local")
    with pytest.raises(sources.SourceError, match="source 's3' is not reachable"):
        sources.resolve(REPO_ID, "s3")


def test_json_records_have_the_shape_the_launcher_reads():
    formatter = JsonFormatter()
    try:
        1 / 0
    except ZeroDivisionError:
        record = logging.LogRecord("lorax_server.x", logging.ERROR, __file__, 7, "failed %s", ("here",),
                                   sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["record"]["level"] == {"icon": "", "name": "ERROR", "no": 40}
    assert parsed["record"]["message"] == "failed here" and parsed["record"]["name"] == "lorax_server.x"
    assert parsed["record"]["exception"]["type"] == "ZeroDivisionError"
    assert "Traceback" in parsed["record"]["exception"]["traceback"] and "ZeroDivisionError" in parsed["text"]
    assert [level_name(n) for n in (1, 5, 15, 25, 35, 60)] == ["TRACE", "TRACE", "DEBUG", "SUCCESS", "WARNING",
                                                                "CRITICAL"]


def test_get_model_takes_upstreams_arguments_in_upstreams_order():
    import torch

    from lorax_server.models import checkpoint_bytes, get_model
    from safetensors.torch import load_file

    model = get_model(MODEL, "", None, False, None, True, "float32", True, "hub", "hub", False, None,
                      kv_cache_bytes=1 << 20)
    assert model.dtype == torch.float32
    if model.device.type == "cpu":
        assert model.graphs is None  # a CPU has no decode graphs: compile has nothing to do
    assert get_model(MODEL, compile=False, kv_cache_bytes=1 << 20).graphs is None  # upstream's eager mode
    with pytest.raises(ValueError, match="embedding_dim 8"):
        get_model(MODEL, embedding_dim=8)
    with pytest.raises(ValueError, match="merge_adapter_weights needs an adapter_id"):
        get_model(MODEL, merge_adapter_weights=True)
    tensors = load_file(DEFAULT_MODEL_DIR / "model.safetensors")
    assert checkpoint_bytes(DEFAULT_MODEL_DIR, torch.float32, 2) == sum(t.numel() * 4 for t in tensors.values()) // 2


def test_socket_problems_are_one_line_before_the_model_loads(tmp_path):
    too_long = tmp_path / ("s" * 120)
    result = subprocess.run([sys.executable, "-m", "lorax_server.cli", "serve", "--uds-path", str(too_long)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "longer than the 107 bytes" in result.stderr
    assert "Traceback" not in result.stderr and "loading" not in result.stdout.lower()
