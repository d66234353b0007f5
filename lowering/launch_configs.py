"""Launch configs of the sparse-experts kernels, kept as data.

A JSON file per (experts, hidden, intermediate, device, dtype) under lowering/configs/
maps token buckets (powers of two) to an ExpertsConfig; `lowering/tuner.py` writes them.
`experts_config` reads them through a cached lookup and falls back, logging once per
file, to `default_config`, a heuristic for memory-bound decode.

File format (one file per shape and GPU):
  {"num_experts": 128, "hidden": 2048, "inter": 768, "device": "NVIDIA H200",
   "dtype": "bfloat16", "configs": {"16": {"block_m": 16, "up": {...}, "down": {...}}}}
where "up"/"down" hold block_n, block_k, num_warps, num_stages of that GEMM, and the
optional "split_k" (most K splits of the down projection), "programs_per_sm" (the
persistent grid's size) and "tma" (weight tiles through tensor descriptors) default as in
ExpertsConfig.

What is fixed at launch and what is chosen on the GPU: a config fixes the compiled
kernels (tile widths, warps, stages, the largest row tile `block_m`); each expert's row
tile (16, 32, 64 or 128 rows, at most block_m) and the down projection's K splits are
chosen by the grouping kernel from the routed counts of each call, so a graph traced at
one token count serves any other without re-reading weights.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger("lynx_compile.launch_configs")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class GemmConfig:
    """Tile of one grouped GEMM: output columns, reduction step, warps, pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


ROW_TILES = (16, 32, 64, 128)  # the row tiles an expert's rows are covered with


@dataclass(frozen=True)
class ExpertsConfig:
    """The largest row tile (an expert with more rows takes several), the two GEMM tiles,
    the most K splits of the down projection, persistent programs per SM, and whether
    weight tiles come through tensor descriptors (the Hopper copy engine; off by default
    until measured, and used only for eager launches: not yet checked under Inductor)."""

    block_m: int
    up: GemmConfig
    down: GemmConfig
    split_k: int = 4
    programs_per_sm: int = 2
    tma: bool = False

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> ExpertsConfig:
        """Inverse of to_dict; raises KeyError/TypeError on a malformed entry."""
        block_m = int(data["block_m"])
        if block_m not in ROW_TILES:
            raise ValueError(f"block_m {block_m} is not one of {ROW_TILES}")
        return ExpertsConfig(
            block_m=block_m,
            up=GemmConfig(**data["up"]),
            down=GemmConfig(**data["down"]),
            split_k=int(data.get("split_k", 4)),
            programs_per_sm=int(data.get("programs_per_sm", 2)),
            tma=bool(data.get("tma", False)),
        )


def token_bucket(num_tokens: int) -> int:
    """The power of two >= num_tokens (>= 1): the key that configs are stored under."""
    return 1 << max(num_tokens - 1, 0).bit_length()


def config_path(
    num_experts: int,
    hidden: int,
    inter: int,
    device: str,
    dtype: torch.dtype,
    directory: Path | None = None,
) -> Path:
    """Where the configs for this shape, GPU and dtype live (default: CONFIG_DIR)."""
    device_tag = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
    dtype_tag = str(dtype).removeprefix("torch.")
    name = f"E={num_experts},d={hidden},I={inter},device={device_tag},dtype={dtype_tag}.json"
    return (directory or CONFIG_DIR) / name


def _pow2_clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << max(n - 1, 0).bit_length()))


def default_config(
    num_experts: int, hidden: int, inter: int, num_tokens: int, top_k: int, dtype: torch.dtype
) -> ExpertsConfig:
    """Heuristic for decode. Row tiles up to 128 (16-bit; 64 in fp32, whose tiles take twice
    the shared memory): the grouping kernel gives each expert the smallest tile that holds
    its rows, so weights cross HBM once per expert up to 128 rows. Narrow output tiles (64)
    give enough work items to keep HBM busy; deep K steps stream weights in long rows.
    The persistent kernels hold every row-tile body, so shared memory and registers are
    those of the largest (sm_90 builds, bf16): up 3 stages of a 128 x 128 x-tile and two
    128 x 64 weight tiles (192 KB, 178 registers at 8 warps: one CTA per SM; its items are
    long, 0.5-1 MB of weights each); down BLOCK_K 64, 4 stages (96 KB, 175 registers at 4
    warps: two CTAs per SM, so one CTA's pipeline fill at each short item, 96 KB at
    Qwen3's I = 768, overlaps the other's streaming).
    num_tokens and top_k are unused: nothing here depends on the batch any more."""
    del num_tokens, top_k
    wide = dtype != torch.float32
    block_m = 128 if wide else 64
    up = GemmConfig(
        block_n=_pow2_clamp(inter, 16, 64),
        block_k=_pow2_clamp(hidden, 16, 128 if wide else 64),
        num_warps=8,
        num_stages=3,
    )
    down = GemmConfig(
        block_n=_pow2_clamp(hidden, 16, 64),
        block_k=_pow2_clamp(inter, 16, 64),
        num_warps=4,
        num_stages=4 if wide else 3,
    )
    return ExpertsConfig(block_m=block_m, up=up, down=down)


@functools.cache
def load_table(path: Path) -> dict[int, ExpertsConfig] | None:
    """Token bucket -> config from one JSON file, or None when the file is absent."""
    if not path.is_file():
        log.info("no tuned launch configs at %s; using the default heuristic", path.name)
        return None
    data = json.loads(path.read_text())
    try:
        return {int(b): ExpertsConfig.from_dict(c) for b, c in data["configs"].items()}
    except (KeyError, TypeError, ValueError) as err:
        log.warning(
            "ignoring malformed launch configs %s (%s); rerun `lynx-compile tune`", path, err
        )
        return None


def experts_config(
    num_experts: int,
    hidden: int,
    inter: int,
    num_tokens: int,
    top_k: int,
    dtype: torch.dtype,
    device: str,
) -> ExpertsConfig:
    """Tuned config for the nearest stored token bucket >= num_tokens (else the largest),
    or the default heuristic when nothing is stored for this shape, GPU and dtype."""
    table = load_table(config_path(num_experts, hidden, inter, device, dtype))
    if not table:
        return default_config(num_experts, hidden, inter, num_tokens, top_k, dtype)
    bucket = token_bucket(num_tokens)
    larger = [b for b in table if b >= bucket]
    return table[min(larger) if larger else max(table)]


def write_table(
    num_experts: int,
    hidden: int,
    inter: int,
    device: str,
    dtype: torch.dtype,
    configs: dict[int, ExpertsConfig],
    directory: Path | None = None,
) -> Path:
    """Write the JSON file `experts_config` reads (from CONFIG_DIR); returns its path."""
    path = config_path(num_experts, hidden, inter, device, dtype, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "num_experts": num_experts,
        "hidden": hidden,
        "inter": inter,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "configs": {str(b): c.to_dict() for b, c in sorted(configs.items())},
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    load_table.cache_clear()
    return path
