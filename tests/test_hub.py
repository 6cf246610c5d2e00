"""Hub inputs (`hf://`), streamed inputs with bounded disk, and pushing outputs.

Nothing here reaches the network. Cached inputs come from a Hub cache the tests
build in huggingface_hub's own layout under HF_HUB_CACHE with HF_HUB_OFFLINE=1.
Downloads and uploads go to tests.hub_server on 127.0.0.1 through HF_ENDPOINT.
The CLI runs in a subprocess because huggingface_hub reads these variables at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from surgeon.errors import HubError
from surgeon.hub import HubReference, check_push_target, parse_hub_reference
from surgeon.streamed_inputs import folder_bytes, staging_folder
from surgeon.writer import partial_folder
from tests.hub_server import HubServer, ServedRepo, card_metadata_errors
from tests.models import build_tiny

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = REPO_ROOT / "recipes" / "tli_k4.yaml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Bookkeeping files beside the shards: index, config, huggingface_hub's download metadata and the writer journal.
BOOKKEEPING_SLACK = 64 * 1024


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run([sys.executable, "-m", "surgeon", *args], env=full_env, capture_output=True, text=True, timeout=600)


def build_hub_cache(cache: Path, repo_id: str, source: Path, commit: str) -> Path:
    """Lay out `source`'s files as huggingface_hub caches a download: blobs, a snapshot of symlinks and refs/main."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    for path in sorted(source.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = storage / "blobs" / digest
        os.link(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def reshard_by_layers(source: Path, target: Path, layers_per_shard: int) -> list[int]:
    """Rewrite a checkpoint with whole layers per shard, embeddings first, final norm and head last, and return the shard sizes."""
    tensors = load_file(source / "model.safetensors")

    def group(name: str) -> int:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match:
            return 1 + int(match.group(1)) // layers_per_shard
        return 0 if "embed_tokens" in name else 1_000

    groups: dict[int, list[str]] = {}
    for name in tensors:
        groups.setdefault(group(name), []).append(name)
    target.mkdir()
    weight_map = {}
    for number, key in enumerate(sorted(groups), start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: tensors[name] for name in sorted(groups[key])}, target / file_name, metadata={"format": "pt"})
        weight_map.update({name: file_name for name in groups[key]})
    index = {"metadata": {"total_size": sum(array.nbytes for array in tensors.values())}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "generation_config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return [(target / name).stat().st_size for name in sorted(set(weight_map.values()))]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.safetensors"))}


@pytest.fixture
def hub_server():
    server = HubServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf://HuggingFaceTB/SmolLM2-135M", HubReference("HuggingFaceTB/SmolLM2-135M")),
        ("hf://org/name@v1.0", HubReference("org/name", "v1.0")),
        ("hf://org/name@refs/pr/3", HubReference("org/name", "refs/pr/3")),
        ("hf://gpt2", HubReference("gpt2")),
        ("some/local/folder", None),
    ],
)
def test_parse_hub_reference_valid(text, expected):
    assert parse_hub_reference(text) == expected


@pytest.mark.parametrize("text", ["hf://", "hf://org/../x", "hf://org/name/extra", "hf://org/name@", "hf://-org/name"])
def test_parse_hub_reference_invalid(text):
    with pytest.raises(HubError, match="hf://"):
        parse_hub_reference(text)


@pytest.fixture(scope="module")
def cached_and_local_outputs(smollm2_dir, tmp_path_factory):
    """Apply tli_k4 to SmolLM2 once from its folder and once as hf:// from an offline Hub cache."""
    root = tmp_path_factory.mktemp("hub_cache_run")
    cache = root / "hub-cache"
    build_hub_cache(cache, "HuggingFaceTB/SmolLM2-135M", smollm2_dir, COMMIT)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(root / "hf-home")}

    local = run_cli("apply", str(RECIPE), str(smollm2_dir), str(root / "local"), "--quiet", env=env)
    assert local.returncode == 0, local.stderr
    hub = run_cli("apply", str(RECIPE), "hf://HuggingFaceTB/SmolLM2-135M", str(root / "hub"), "--quiet", env=env)
    assert hub.returncode == 0, hub.stderr
    return root / "local", root / "hub"


@pytest.mark.slow
def test_hub_input_shards_match_local_folder(cached_and_local_outputs):
    local, hub = cached_and_local_outputs
    assert shard_bytes(hub) == shard_bytes(local)


@pytest.mark.slow
def test_hub_manifest_differs_in_path_and_card(cached_and_local_outputs):
    """The model card names the Hub base model only for the hf:// input, so its hash differs too."""
    local, hub = cached_and_local_outputs
    local_manifest = json.loads((local / "surgeon.json").read_text())
    hub_manifest = json.loads((hub / "surgeon.json").read_text())

    assert hub_manifest["inputs"]["input"].pop("path") == f"hf://HuggingFaceTB/SmolLM2-135M@{COMMIT}"
    local_manifest["inputs"]["input"].pop("path")
    hub_manifest["output"]["files"].pop("README.md")
    local_manifest["output"]["files"].pop("README.md")
    assert hub_manifest == local_manifest


@pytest.mark.slow
def test_hub_input_model_card_metadata(cached_and_local_outputs):
    from huggingface_hub import ModelCard

    _, hub = cached_and_local_outputs
    text = (hub / "README.md").read_text()
    metadata = ModelCard(text, ignore_metadata_errors=False).data

    assert metadata.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert metadata.to_dict()["base_model_relation"] == "merge"
    assert "merge" in metadata.tags
    assert card_metadata_errors(text) == []


@pytest.mark.slow
def test_hub_input_copies_tokenizer_files(cached_and_local_outputs, smollm2_dir):
    _, hub = cached_and_local_outputs
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (hub / name).read_bytes() == (smollm2_dir / name).read_bytes(), name


def test_offline_uncached_hub_input_fails(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "HF_HOME": str(tmp_path / "hf-home")}
    result = run_cli("plan", str(RECIPE), "hf://org/missing", env=env)

    assert result.returncode == 1
    assert "not in the local Hub cache" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr


@pytest.mark.parametrize(
    ("reference", "gated", "message"),
    [
        ("hf://org/absent", False, "repository org/absent not found"),
        ("hf://org/tiny", True, "gated repository"),
        ("hf://org/tiny@no-such-branch", False, "revision 'no-such-branch' not found"),
    ],
)
def test_hub_input_errors(hub_server, tmp_path, tiny_models, reference, gated, message):
    hub_server.repos["org/tiny"] = ServedRepo(tiny_models["llama"], COMMIT, gated=gated)
    env = {"HF_ENDPOINT": hub_server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf-home")}
    result = run_cli("plan", str(RECIPE), reference, env=env)

    assert result.returncode == 1
    assert message in result.stderr


class DiskSampler:
    """Poll the total size of some folders in a thread and keep the maximum: an independent check of the peak."""

    def __init__(self, folders: list[Path]) -> None:
        self.folders = folders
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(folder_bytes(folder) for folder in self.folders))
            self.samples += 1
            time.sleep(0.001)


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory):
    """A tiny llama resharded two layers per shard, served on loopback, applied with and without --stream-input."""
    root = tmp_path_factory.mktemp("stream")
    source = build_tiny("llama", root / "tiny", hidden_size=128, intermediate_size=512)
    repo = root / "repo"
    shard_sizes = reshard_by_layers(source, repo, layers_per_shard=2)

    server = HubServer(repos={"org/tiny": ServedRepo(repo, COMMIT)})
    server.start()
    env = {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(root / "cache"), "HF_HOME": str(root / "hf-home")}
    try:
        planned = run_cli("plan", str(RECIPE), "hf://org/tiny", "--stream-input", env=env)
        plan_requests = list(server.requests)
        streamed_out = root / "streamed"
        with DiskSampler([staging_folder(streamed_out), partial_folder(streamed_out), streamed_out]) as sampler:
            streamed = run_cli("apply", str(RECIPE), "hf://org/tiny", str(streamed_out), "--stream-input", "--quiet", env=env)
        local = run_cli("apply", str(RECIPE), str(repo), str(root / "local"), "--quiet", env=env)
    finally:
        server.stop()
    return {
        "root": root, "source": source, "repo": repo, "shard_sizes": shard_sizes, "planned": planned, "plan_requests": plan_requests,
        "streamed": streamed, "sampler": sampler, "local": local, "server": server,
    }


def _peak_figures(stdout: str) -> tuple[int, int]:
    match = re.search(r"peak disk use: (\d+) bytes measured, (\d+) bytes predicted", stdout)
    assert match, stdout
    return int(match.group(1)), int(match.group(2))


def test_stream_input_output_matches_local_run(streamed_run):
    assert streamed_run["streamed"].returncode == 0, streamed_run["streamed"].stderr
    assert streamed_run["local"].returncode == 0, streamed_run["local"].stderr
    assert shard_bytes(streamed_run["root"] / "streamed") == shard_bytes(streamed_run["root"] / "local")


def test_stream_input_peak_within_one_shard_plus_output(streamed_run):
    output_bytes = folder_bytes(streamed_run["root"] / "streamed")
    bound = max(streamed_run["shard_sizes"]) + output_bytes + BOOKKEEPING_SLACK
    measured, predicted = _peak_figures(streamed_run["streamed"].stdout)

    assert len(streamed_run["shard_sizes"]) == 5
    assert streamed_run["sampler"].samples > 10
    assert streamed_run["sampler"].peak <= bound
    assert measured <= bound
    assert predicted <= bound


def test_stream_input_peak_below_whole_input_plus_output(streamed_run):
    output_bytes = folder_bytes(streamed_run["root"] / "streamed")
    measured, _ = _peak_figures(streamed_run["streamed"].stdout)
    assert measured < sum(streamed_run["shard_sizes"]) + output_bytes


def test_stream_input_prediction_matches_measurement(streamed_run):
    measured, predicted = _peak_figures(streamed_run["streamed"].stdout)
    assert abs(measured - predicted) <= BOOKKEEPING_SLACK


def test_stream_input_downloads_each_shard_once(streamed_run):
    full_gets = [path for method, path, byte_range in streamed_run["server"].requests if method == "GET" and byte_range is None and path.endswith(".safetensors")]
    assert sorted(full_gets) == sorted(set(full_gets))
    assert len(full_gets) == len(streamed_run["shard_sizes"])


def test_stream_input_removes_staging_folder(streamed_run):
    assert not staging_folder(streamed_run["root"] / "streamed").exists()


def test_plan_stream_input_prints_predicted_peak(streamed_run):
    planned = streamed_run["planned"]
    _, predicted = _peak_figures(streamed_run["streamed"].stdout)

    assert planned.returncode == 0, planned.stderr
    assert f"({predicted} bytes;" in planned.stdout


def test_plan_stream_input_fetches_headers_only(streamed_run):
    shard_gets = [byte_range for method, path, byte_range in streamed_run["plan_requests"] if method == "GET" and path.endswith(".safetensors")]
    assert shard_gets
    assert all(byte_range is not None for byte_range in shard_gets)


def test_stream_input_output_loads_with_same_logits(streamed_run, english_text):
    import torch
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(streamed_run["source"])
    loaded, info = AutoModelForCausalLM.from_pretrained(streamed_run["root"] / "streamed", output_loading_info=True)
    tokens = torch.tensor([[byte for byte in english_text[:64].encode()]])
    with torch.no_grad():
        expected = original(tokens).logits
        actual = loaded(tokens).logits

    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert loaded.config.num_hidden_layers == 7
    assert torch.allclose(actual, expected, atol=1e-5)


def test_push_to_hub_uploads_every_file(hub_server, tmp_path, tiny_models):
    hub_server.repos["org/tiny"] = ServedRepo(tiny_models["llama"], COMMIT)
    env = {"HF_ENDPOINT": hub_server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf-home")}
    output = tmp_path / "out"
    result = run_cli("apply", str(RECIPE), "hf://org/tiny", str(output), "--quiet", "--push-to-hub", "me/tiny-tli", "--private", env=env)

    assert result.returncode == 0, result.stderr
    assert hub_server.uploaded["me/tiny-tli"] == {path.name: path.read_bytes() for path in output.iterdir()}
    assert hub_server.created[0]["visibility"] == "private"


def test_push_to_hub_card_passes_metadata_check(hub_server, tmp_path, tiny_models):
    hub_server.repos["org/tiny"] = ServedRepo(tiny_models["llama"], COMMIT)
    env = {"HF_ENDPOINT": hub_server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf-home")}
    result = run_cli("apply", str(RECIPE), "hf://org/tiny", str(tmp_path / "out"), "--quiet", "--push-to-hub", "me/tiny-tli", env=env)

    assert result.returncode == 0, result.stderr
    assert len(hub_server.validated) == 1
    assert card_metadata_errors(hub_server.validated[0]) == []
    assert "base_model: org/tiny" in hub_server.validated[0]


def test_push_to_hub_rejects_offline(tmp_path, tiny_models):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf-home")}
    result = run_cli("apply", str(RECIPE), str(tiny_models["llama"]), str(tmp_path / "out"), "--quiet", "--push-to-hub", "me/x", env=env)

    assert result.returncode == 1
    assert "HF_HUB_OFFLINE" in result.stderr


def test_push_to_hub_offline_fails_before_writing(tmp_path, tiny_models):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf-home")}
    run_cli("apply", str(RECIPE), str(tiny_models["llama"]), str(tmp_path / "out"), "--quiet", "--push-to-hub", "me/x", env=env)

    assert not (tmp_path / "out").exists()


@pytest.fixture
def failed_push(hub_server, tmp_path, tiny_models):
    """An apply whose output was written but whose push the server refused."""
    env = {"HF_ENDPOINT": hub_server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf-home")}
    output = tmp_path / "out"
    hub_server.reject_commits = True
    result = run_cli("apply", str(RECIPE), str(tiny_models["llama"]), str(output), "--quiet", "--push-to-hub", "me/tiny-tli", env=env)
    hub_server.reject_commits = False
    return {"result": result, "output": output, "env": env}


def test_push_to_hub_failure_keeps_output(failed_push):
    assert (failed_push["output"] / "surgeon.json").is_file()


def test_push_to_hub_failure_names_push_command(failed_push):
    assert failed_push["result"].returncode == 1
    assert f"surgeon push {failed_push['output']} me/tiny-tli" in failed_push["result"].stderr


def test_push_command_uploads_written_output(failed_push, hub_server):
    result = run_cli("push", str(failed_push["output"]), "me/tiny-tli", env=failed_push["env"])

    assert result.returncode == 0, result.stderr
    assert hub_server.uploaded["me/tiny-tli"] == {path.name: path.read_bytes() for path in failed_push["output"].iterdir()}


def test_push_command_rejects_unfinished_folder(hub_server, tmp_path):
    env = {"HF_ENDPOINT": hub_server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    result = run_cli("push", str(tmp_path), "me/tiny-tli", env=env)

    assert result.returncode == 1
    assert "surgeon.json not found" in result.stderr


def test_push_uploads_only_checkpoint_files(failed_push, hub_server):
    written = {path.name for path in failed_push["output"].iterdir()}
    (failed_push["output"] / ".env").write_text("HF_TOKEN=secret\n")
    (failed_push["output"] / "notes.txt").write_text("mine\n")

    result = run_cli("push", str(failed_push["output"]), "me/tiny-tli", env=failed_push["env"])

    assert result.returncode == 0, result.stderr
    assert set(hub_server.uploaded["me/tiny-tli"]) == written


def test_push_accepts_edited_model_card(failed_push, hub_server):
    (failed_push["output"] / "README.md").write_text("---\nlicense: apache-2.0\n---\nMy card.\n")

    result = run_cli("push", str(failed_push["output"]), "me/tiny-tli", env=failed_push["env"])

    assert result.returncode == 0, result.stderr


def test_push_rejects_edited_config(failed_push):
    config_path = failed_push["output"] / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 999
    config_path.write_text(json.dumps(config))

    result = run_cli("push", str(failed_push["output"]), "me/tiny-tli", env=failed_push["env"])

    assert result.returncode == 1
    assert "config.json" in result.stderr


def test_push_rejects_linked_file(failed_push, tmp_path):
    linked = failed_push["output"] / "generation_config.json"
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    linked.unlink()
    linked.symlink_to(outside)

    result = run_cli("push", str(failed_push["output"]), "me/tiny-tli", env=failed_push["env"])

    assert result.returncode == 1
    assert "generation_config.json" in result.stderr


def test_push_accepts_trained_folder(failed_push, hub_server):
    manifest_path = failed_push["output"] / "surgeon.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["trained"] = {"from": "elsewhere", "note": "weights rewritten by surgeon train"}
    manifest_path.write_text(json.dumps(manifest))

    result = run_cli("push", str(failed_push["output"]), "me/tiny-tli", env=failed_push["env"])

    assert result.returncode == 0, result.stderr


def test_push_network_failure_prints_one_line(failed_push):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env = {**failed_push["env"], "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"}

    result = run_cli("push", str(failed_push["output"]), "me/tiny-tli", env=env)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("repo_id", ["me/a--b", "me/a..b", "me/name.git", "me/-name", "me/" + "x" * 97, "no-org", "me/a b"])
def test_check_push_target_rejects_invalid_id(repo_id):
    with pytest.raises(HubError):
        check_push_target(repo_id)
