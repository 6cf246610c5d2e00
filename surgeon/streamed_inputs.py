"""Hub inputs streamed shard by shard, so the whole input and the whole output need not be on disk together.

Planning needs only each shard's header, which is fetched with two HTTP range
requests. While the writer runs, an input shard is downloaded just before the
first output tensor that reads it and deleted right after the last one, in the
order `surgeon.plan.disk.shard_lifetimes` computes from the plan.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

from surgeon.checkpoint import Checkpoint, open_checkpoint
from surgeon.checkpoint.header import MAX_HEADER_BYTES, ShardHeader, parse_header
from surgeon.checkpoint.reader import INDEX_NAME, SINGLE_SHARD_NAME
from surgeon.errors import HubError
from surgeon.hub import SIDE_FILE_PATTERNS, HubReference, translate_hub_errors
from surgeon.plan import Plan, PlannedTensor
from surgeon.plan.disk import ShardLifetimes, predict_peak_disk, shard_lifetimes
from surgeon.plan.expressions import InputShard

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".surgeon-inputs"


def staging_folder(output: Path) -> Path:
    """Return the hidden folder beside the output where streamed input files live during a run."""
    return output.parent / f".{output.name}{STAGING_SUFFIX}"


def folder_bytes(folder: Path) -> int:
    """Return the total size in bytes of the regular files under `folder` (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


class StreamedInputs:
    """Hub inputs whose shards are fetched one at a time while a plan is written.

    Lifecycle: `open` each Hub input, compile the plan, `prepare(plan)`, let the
    writer call `before_tensor` and `after_tensor` around every output tensor,
    then `close`, which deletes the staging folder.
    """

    def __init__(self, staging: Path, measured_folders: list[Path] | None = None) -> None:
        self.staging = staging
        self.measured_folders = [staging, *(measured_folders or [])]
        self.references: dict[str, tuple[HubReference, str]] = {}
        self.checkpoints: dict[str, Checkpoint] = {}
        self.lifetimes: ShardLifetimes | None = None
        self.positions: dict[int, int] = {}
        self.present: set[InputShard] = set()
        self.predicted_peak_bytes = 0
        self.measured_peak_bytes = 0
        self.downloads = 0

    @classmethod
    def for_output(cls, output: str | Path) -> StreamedInputs:
        """Stage input files beside `output`, and measure disk use over staging, partial and output folders."""
        from surgeon.writer import partial_folder

        output = Path(output).absolute()
        return cls(staging_folder(output), [partial_folder(output), output])

    @property
    def models(self) -> set[str]:
        return set(self.checkpoints)

    def open(self, key: str, reference: HubReference) -> Checkpoint:
        """Fetch an input's config, index, tokenizer files and shard headers, but no tensor data."""
        from huggingface_hub import HfApi, constants, snapshot_download

        if constants.HF_HUB_OFFLINE:
            raise HubError(
                "--stream-input downloads shards while writing, but HF_HUB_OFFLINE is set",
                value=str(reference),
                fix="unset HF_HUB_OFFLINE, or drop --stream-input to use the cached snapshot",
            )
        folder = self.staging / key
        # Files left by an interrupted run are stale: the commit may differ, and they would skew the measurement.
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with translate_hub_errors(reference):
            commit = HfApi().repo_info(reference.repo_id, revision=reference.revision, repo_type="model").sha
            snapshot_download(reference.repo_id, revision=commit, allow_patterns=SIDE_FILE_PATTERNS, local_dir=folder)
            headers = {name: fetch_remote_header(reference.repo_id, commit, name, folder / name) for name in _shard_names(folder)}

        checkpoint = open_checkpoint(folder, fetched_headers=headers)
        checkpoint.source = str(HubReference(reference.repo_id, commit))
        self.references[key] = (reference, commit)
        self.checkpoints[key] = checkpoint
        logger.info("opened %s at commit %s: %d shard headers fetched", reference, commit, len(headers))
        return checkpoint

    def prepare(self, plan: Plan) -> int:
        """Compute every input shard's lifetime in the plan and return the predicted peak disk use in bytes."""
        self.lifetimes = shard_lifetimes(plan)
        self.positions = {id(tensor): position for position, tensor in enumerate(self.lifetimes.order)}
        for input_shard in self.lifetimes.shard_sizes:
            if input_shard.model not in self.checkpoints:
                # A local input is read in place and takes no extra disk space.
                self.lifetimes.shard_sizes[input_shard] = 0
        side_files = sum(path.stat().st_size for folder in self.staging.glob("*") for path in folder.glob("[!.]*") if path.is_file())
        self.predicted_peak_bytes = predict_peak_disk(plan, self.lifetimes, fixed_bytes=side_files)
        return self.predicted_peak_bytes

    def before_tensor(self, tensor: PlannedTensor) -> None:
        """Download the streamed input shards this tensor reads that are not on disk yet."""
        for input_shard in self.lifetimes.needed_at(self.positions[id(tensor)]):
            if input_shard.model in self.checkpoints and input_shard not in self.present:
                self._download(input_shard)
                self._measure()

    def after_tensor(self, tensor: PlannedTensor) -> None:
        """Delete the streamed input shards that no later tensor reads."""
        released = [shard for shard in self.lifetimes.released_after(self.positions[id(tensor)]) if shard in self.present]
        if released:
            self._measure()
        for input_shard in released:
            self.checkpoints[input_shard.model].close_shard(input_shard.path)
            input_shard.path.unlink()
            self.present.discard(input_shard)
            logger.info("deleted input shard %s after its last use", input_shard.path.name)

    def finish(self) -> None:
        """Record the disk use once the output is complete, before the staging folder goes."""
        self._measure()

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def _download(self, input_shard: InputShard) -> None:
        from huggingface_hub import hf_hub_download

        reference, commit = self.references[input_shard.model]
        checkpoint = self.checkpoints[input_shard.model]
        header = next(shard for shard in checkpoint.shards if shard.path == input_shard.path)
        with translate_hub_errors(reference):
            hf_hub_download(reference.repo_id, input_shard.path.name, revision=commit, local_dir=self.staging / input_shard.model)

        size = input_shard.path.stat().st_size
        with open(input_shard.path, "rb") as handle:
            on_disk = handle.read(header.data_start)[8:]
        if size != header.file_size or on_disk != header.header_bytes:
            raise HubError(
                f"downloaded shard {input_shard.path.name} ({size} bytes) differs from the header fetched while planning ({header.file_size} bytes)",
                path=input_shard.path,
                value=str(reference),
                fix="rerun. If it fails again, the server returns different bytes for the same commit",
            )
        self.present.add(input_shard)
        self.downloads += 1
        logger.info("downloaded input shard %s (%d bytes)", input_shard.path.name, size)

    def _measure(self) -> None:
        used = sum(folder_bytes(folder) for folder in self.measured_folders)
        self.measured_peak_bytes = max(self.measured_peak_bytes, used)


def _shard_names(folder: Path) -> list[str]:
    """Return the shard file names the index lists, or the single-file name when there is no index."""
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        return [SINGLE_SHARD_NAME]
    # open_checkpoint validates the index fully; this only needs the names.
    weight_map = json.loads(index_path.read_bytes()).get("weight_map") or {}
    return list(dict.fromkeys(str(name) for name in weight_map.values()))


def fetch_remote_header(repo_id: str, commit: str, file_name: str, path: Path) -> ShardHeader:
    """Fetch and validate a remote shard's header with two HTTP range requests."""
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(repo_id, file_name, revision=commit)
    prefix, file_size = _get_range(url, 0, 8)
    (header_length,) = struct.unpack("<Q", prefix)
    if header_length > MAX_HEADER_BYTES or 8 + header_length > file_size:
        raise HubError(
            f"remote shard {file_name} declares a {header_length}-byte header in a {file_size}-byte file",
            path=url,
            fix="the file is not a safetensors shard or is corrupt on the Hub",
        )
    header_bytes, _ = _get_range(url, 8, header_length)
    return parse_header(path, file_size, header_bytes)


def _get_range(url: str, start: int, length: int) -> tuple[bytes, int]:
    """GET bytes [start, start + length) of `url`, and return them with the file's total size."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
    response = get_session().get(url, headers=headers, follow_redirects=True)
    hf_raise_for_status(response)
    content_range = response.headers.get("Content-Range", "")
    if response.status_code != 206 or "/" not in content_range or len(response.content) != length:
        raise HubError(
            f"the server returned no byte range for a range request for {url} (status {response.status_code})",
            path=url,
            fix="drop --stream-input, or check that HF_ENDPOINT points at a server that supports HTTP Range",
        )
    return response.content, int(content_range.rsplit("/", 1)[1])
