"""Benchmark TLI on a Llama-3-8B-shaped checkpoint with fewer layers.

Writes a synthetic bf16 checkpoint (hidden 4096, intermediate 14336, 32 heads,
8 KV heads, vocabulary 128256) in 2 GB shards without torch, then in one run:
copies the input shards with `cp` and applies `recipes/tli_k4.yaml`-style TLI
(K=2, so small inputs still gain layers) with `surgeon apply` in a subprocess.
Prints wall time, peak RSS of the surgeon process and its throughput as a
ratio to `cp`'s, and to `cp` followed by `sync` of the copies: surgeon flushes
every shard to disk before it counts as written, which plain `cp` does not.
Repeats alternate the commands so page-cache warmth favours none of them, and
every command starts after a `sync`, so none pays for an earlier one's
writeback. With `--cold` (root only) every command also starts with an empty
page cache, as it does for a checkpoint larger than memory.

With `--moe-experts`, each run applies the `moe` step instead (top-2, zero
router, per-expert layout) once per expert count, so the output grows with
the expert count while the peak RSS should not.

Run: python benchmarks/bench_tli.py --layers 4 8 --workdir /tmp/surgeon-bench
     .venv/bin/python benchmarks/bench_tli.py --layers 24 --repeats 3 --cold --workdir /work/bench   (as root)
     python benchmarks/bench_tli.py --layers 2 --moe-experts 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256
HEAD_DIM = HIDDEN // HEADS
SHARD_BYTES = 2 * 10**9
PATTERN = np.random.default_rng(0).integers(0, 2**16, size=2**22, dtype=np.uint16).tobytes()


def llama3_tensors(num_layers: int) -> list[tuple[str, list[int]]]:
    tensors = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for index in range(num_layers):
        prefix = f"model.layers.{index}."
        tensors += [
            (prefix + "input_layernorm.weight", [HIDDEN]),
            (prefix + "self_attn.q_proj.weight", [HEADS * HEAD_DIM, HIDDEN]),
            (prefix + "self_attn.k_proj.weight", [KV_HEADS * HEAD_DIM, HIDDEN]),
            (prefix + "self_attn.v_proj.weight", [KV_HEADS * HEAD_DIM, HIDDEN]),
            (prefix + "self_attn.o_proj.weight", [HIDDEN, HEADS * HEAD_DIM]),
            (prefix + "post_attention_layernorm.weight", [HIDDEN]),
            (prefix + "mlp.gate_proj.weight", [INTERMEDIATE, HIDDEN]),
            (prefix + "mlp.up_proj.weight", [INTERMEDIATE, HIDDEN]),
            (prefix + "mlp.down_proj.weight", [HIDDEN, INTERMEDIATE]),
        ]
    tensors += [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]
    return tensors


def write_shard(path: Path, tensors: list[tuple[str, list[int]]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as handle:
        handle.write(len(body).to_bytes(8, "little") + body)
        remaining = offset
        while remaining:
            chunk = PATTERN[: min(remaining, len(PATTERN))]
            handle.write(chunk)
            remaining -= len(chunk)


def write_checkpoint(folder: Path, num_layers: int) -> int:
    """Write the synthetic checkpoint; return its tensor bytes."""
    folder.mkdir(parents=True)
    groups: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in llama3_tensors(num_layers):
        nbytes = int(np.prod(shape)) * 2
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for number, group in enumerate(groups, start=1):
        shard_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        write_shard(folder / shard_name, group)
        for name, shape in group:
            weight_map[name] = shard_name
            total += int(np.prod(shape)) * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": num_layers, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.suffix == ".safetensors")


def settle_page_cache(cold: bool) -> None:
    """Flush every dirty page so no command pays for an earlier one's writeback. With `cold`, also empty the page cache."""
    os.sync()
    if cold:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError as error:
            raise SystemExit(f"--cold could not empty the page cache ({error}); it needs root and a writable /proc/sys, or run without --cold") from None


def measure_disk(workdir: Path, cold: bool) -> tuple[float, float]:
    """Return the disk's sequential write rate with a final flush and its read rate, in MB/s, from one 1 GiB file."""
    probe = workdir / "disk-probe"
    size = 2**30
    settle_page_cache(cold)
    start = time.perf_counter()
    with open(probe, "wb") as handle:
        for _ in range(size // len(PATTERN)):
            handle.write(PATTERN)
        handle.flush()
        os.fsync(handle.fileno())
    write_rate = size / 1e6 / (time.perf_counter() - start)
    settle_page_cache(cold)
    start = time.perf_counter()
    with open(probe, "rb") as handle:
        while handle.read(len(PATTERN)):
            pass
    read_rate = size / 1e6 / (time.perf_counter() - start)
    probe.unlink()
    return write_rate, read_rate


def run_measured(command: list[str], cold: bool = False) -> tuple[float, int]:
    """Run a command; return its wall time in seconds and peak RSS in MiB (from wait4)."""
    settle_page_cache(cold)
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(command)}")
    return elapsed, usage.ru_maxrss // 1024


def benchmark(workdir: Path, num_layers: int, repeats: int, recipe: Path, cold: bool) -> dict:
    source = workdir / f"llama3-{num_layers}l"
    if not source.exists():
        write_checkpoint(source, num_layers)
    input_bytes = folder_bytes(source)
    copy_target, output = workdir / "cp-out", workdir / "tli-out"
    best_cp, best_cp_sync, best_surgeon, peak_rss = float("inf"), float("inf"), float("inf"), 0
    shards = sorted(str(path) for path in source.glob("*.safetensors"))
    copies = [str(copy_target / Path(shard).name) for shard in shards]
    for _ in range(repeats):
        shutil.rmtree(copy_target, ignore_errors=True)
        copy_target.mkdir()
        elapsed, _ = run_measured(["cp", *shards, str(copy_target)], cold)
        best_cp = min(best_cp, elapsed)

        shutil.rmtree(copy_target, ignore_errors=True)
        copy_target.mkdir()
        command = f"{shlex.join(['cp', *shards, str(copy_target)])} && {shlex.join(['sync', *copies])}"
        elapsed, _ = run_measured(["sh", "-c", command], cold)
        best_cp_sync = min(best_cp_sync, elapsed)

        shutil.rmtree(output, ignore_errors=True)
        elapsed, rss = run_measured([sys.executable, "-m", "surgeon", "apply", str(recipe), str(source), str(output), "--quiet"], cold)
        best_surgeon = min(best_surgeon, elapsed)
        peak_rss = max(peak_rss, rss)
    output_bytes = folder_bytes(output)
    shutil.rmtree(copy_target)
    shutil.rmtree(output)
    return {
        "layers": num_layers,
        "input_gb": input_bytes / 1e9,
        "output_gb": output_bytes / 1e9,
        "cp_s": best_cp,
        "cp_sync_s": best_cp_sync,
        "surgeon_s": best_surgeon,
        "peak_rss_mib": peak_rss,
        "ratio": (output_bytes / best_surgeon) / (input_bytes / best_cp),
        "ratio_sync": (output_bytes / best_surgeon) / (input_bytes / best_cp_sync),
    }


def benchmark_moe(args: argparse.Namespace) -> None:
    """Print one table row per (layer count, expert count) for the moe step."""
    print("| input layers | experts | input GB | output GB | cp s | surgeon s | surgeon peak RSS MiB | throughput vs cp |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for num_layers in args.layers:
        for experts in args.moe_experts:
            recipe = args.workdir / f"moe_{experts}x_top2.yaml"
            recipe.write_text(f"version: 1\nname: moe-{experts}x-top2\nsteps:\n  - moe: {{experts: {experts}, experts_per_token: 2}}\n")
            row = benchmark(args.workdir, num_layers, args.repeats, recipe, args.cold)
            print(
                f"| {row['layers']} | {experts} | {row['input_gb']:.2f} | {row['output_gb']:.2f} | {row['cp_s']:.2f} "
                f"| {row['surgeon_s']:.2f} | {row['peak_rss_mib']} | {row['ratio']:.2f}x |",
                flush=True,
            )
        if not args.keep:
            shutil.rmtree(args.workdir / f"llama3-{num_layers}l")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8], help="decoder layer counts to benchmark")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command; the fastest counts")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/surgeon-bench"))
    parser.add_argument("--recipe", type=Path, default=None, help="recipe to apply (default: TLI with K=2)")
    parser.add_argument("--cold", action="store_true", help="empty the page cache before each command (needs root), as for inputs larger than memory")
    parser.add_argument("--keep", action="store_true", help="keep the generated input checkpoints")
    parser.add_argument("--moe-experts", type=int, nargs="+", default=None, help="benchmark the moe step (top-2) with these expert counts")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.moe_experts:
        benchmark_moe(args)
        return
    recipe = args.recipe
    if recipe is None:
        recipe = args.workdir / "tli_k2.yaml"
        recipe.write_text("version: 1\nname: tli-k2\nsteps:\n  - tli:\n      every: 2\n")

    write_rate, read_rate = measure_disk(args.workdir, args.cold)
    cache = "read from an emptied page cache" if args.cold else "read with the page cache as it is"
    print(f"disk: {write_rate:.0f} MB/s sequential write with a flush, {read_rate:.0f} MB/s sequential read ({cache})\n")
    print("| input layers | input GB | output GB | cp s | cp + sync s | surgeon s | surgeon peak RSS MiB | throughput vs cp | vs cp + sync |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for num_layers in args.layers:
        row = benchmark(args.workdir, num_layers, args.repeats, recipe, args.cold)
        print(
            f"| {row['layers']} | {row['input_gb']:.2f} | {row['output_gb']:.2f} | {row['cp_s']:.2f} | {row['cp_sync_s']:.2f} "
            f"| {row['surgeon_s']:.2f} | {row['peak_rss_mib']} | {row['ratio']:.2f}x | {row['ratio_sync']:.2f}x |",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(args.workdir / f"llama3-{num_layers}l")


if __name__ == "__main__":
    main()
