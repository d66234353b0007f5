"""LYNX_DUMP=DIR: write every graph the backend sees, before and after the lynx passes."""

from __future__ import annotations

import os
from pathlib import Path

import torch.fx as fx


def active_dump_dir() -> Path | None:
    """The folder named by LYNX_DUMP, or None when dumping is off."""
    value = os.environ.get("LYNX_DUMP")
    return Path(value) if value else None


def write_graph_dump(out_dir: Path, graph_id: int, before: str, gm: fx.GraphModule) -> None:
    """Write graph `graph_id` as readable code before (before{id}.py) and after (after{id}.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"before{graph_id}.py").write_text(before)
    (out_dir / f"after{graph_id}.py").write_text(gm.print_readable(print_output=False))
