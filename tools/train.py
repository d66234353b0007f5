"""Train TinyMoE on the Python standard library's own .py sources (present on every machine).

    lynx-compile train --out tools/data/tiny_moe.safetensors
    python -m lynx_compile.tools.train --out tools/data/tiny_moe.safetensors   (the same)

The corpus is every .py file under sysconfig's stdlib path (site-packages excluded), split
by FILE into train / held-out by a hash of the file's relative path, so the split is the
same on every machine with the same Python version. The loss is next-byte cross-entropy
plus `--lb-coef` times the Switch-style load-balancing loss (0 trains without it). The
checkpoint is written as fp16 safetensors with its config JSON; the log (every line also
printed) records the command with every flag spelled out, the corpus, and losses.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lynx_compile.tools.tiny_moe import DEFAULT_CHECKPOINT, TinyMoE, TinyMoEConfig, save_checkpoint

from lynx_compile._extras import require

HELDOUT_PERCENT = 10


def stdlib_files() -> tuple[Path, list[Path]]:
    """(stdlib root, sorted .py files under it outside site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts
    )
    if not files:
        raise FileNotFoundError(
            f"no .py files under the stdlib path {root}; this Python ships without sources"
        )
    return root, files


def is_heldout(relative: str) -> bool:
    """Whether a file (path relative to the stdlib root) is in the held-out split."""
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def split_files(split: str) -> list[Path]:
    """The stdlib .py files of one split, "train" or "heldout", sorted by path."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root, files = stdlib_files()
    want = split == "heldout"
    return [p for p in files if is_heldout(p.relative_to(root).as_posix()) == want]


def load_bytes(files: list[Path]) -> torch.Tensor:
    """All files' bytes concatenated (each followed by a blank line): uint8 [total]."""
    blob = b"".join(p.read_bytes() + b"\n\n" for p in files)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """Random windows: (inputs [B, T], targets [B, T]) int64, targets shifted by one byte."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(model: TinyMoE, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """(mean next-byte NLL in nats, top-1 accuracy %) over fixed held-out batches."""
    model.eval()
    nll = correct = count = 0.0
    for x, y in batches:
        logits = model(x)
        nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    model.train()
    return nll / count, 100.0 * correct / count


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The training flags; their defaults are the committed checkpoint's command."""
    p.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint path")
    p.add_argument("--log", type=Path, default=None, help="log file (default: <out>_train.log)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="bytes per training sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--lb-coef", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--seed", type=int, default=0, help="seed of init and batch sampling")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared 2-core machine, 2 threads measured 3-5x slower "
        "per step, each waiting for the other while other processes hold a core)",
    )
    p.add_argument("--eval-every", type=int, default=500, help="held-out eval interval")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=24.0,
        help="stop (and save) early if training runs longer than this",
    )
    for field in ("dim", "num_layers", "num_heads", "num_experts", "top_k", "expert_hidden"):
        default = getattr(TinyMoEConfig(), field)
        flag = "--" + field.replace("_", "-")
        p.add_argument(flag, type=int, default=default, help=f"model {field}")


def command_line(args: argparse.Namespace) -> str:
    """`lynx-compile train` with every flag spelled out, defaults included (for the log)."""
    flags = []
    for name, value in vars(args).items():
        if name not in ("command", "_module") and value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return "lynx-compile train " + shlex.join(flags)


def run(args: argparse.Namespace) -> int:
    """Train, log, save; returns a process exit code."""
    tqdm = require("tqdm", "demo", "lynx-compile train").tqdm
    log_path = args.log or args.out.with_name(args.out.stem + "_train.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("w")

    def log(line: str) -> None:
        tqdm.write(line)
        log_file.write(line + "\n")
        log_file.flush()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log(f"command: {command_line(args)}")
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {args.threads}")
    train_files, held_files = split_files("train"), split_files("heldout")
    train_data, held_data = load_bytes(train_files), load_bytes(held_files)
    log(
        f"corpus: {sysconfig.get_paths()['stdlib']}: train {len(train_files)} files "
        f"{train_data.numel()} bytes, held-out {len(held_files)} files {held_data.numel()} bytes"
    )
    config = TinyMoEConfig(
        dim=args.dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_experts=args.num_experts,
        top_k=args.top_k,
        expert_hidden=args.expert_hidden,
    )
    model = TinyMoE(config)
    log(f"config: {config}; {sum(p.numel() for p in model.parameters())} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    held_gen = torch.Generator().manual_seed(args.seed + 1)
    held_batches = [sample_batch(held_data, args.batch, args.seq_len, held_gen) for _ in range(4)]

    start = time.time()
    bar = tqdm(range(args.steps), desc="train", file=sys.stdout, mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y = sample_batch(train_data, args.batch, args.seq_len, gen)
        logits, lb = model.forward_train(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss = ce + args.lb_coef * lb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(ce=f"{ce.item():.3f}", lb=f"{lb.item():.3f}")
        if step % 50 == 0:
            log(f"step {step} ce {ce.item():.4f} lb {lb.item():.4f} t {time.time() - start:.0f}s")
        last = step == args.steps - 1
        if (step + 1) % args.eval_every == 0 or last:
            nll, acc = heldout_loss(model, held_batches)
            log(f"step {step} held-out nll {nll:.4f} acc {acc:.2f}%")
        if (time.time() - start) / 60 > args.max_minutes and not last:
            nll, acc = heldout_loss(model, held_batches)
            log(
                f"stopped early at step {step} ({args.max_minutes} min limit); "
                f"held-out nll {nll:.4f} acc {acc:.2f}%"
            )
            break
    save_checkpoint(model, args.out)
    size_mb = args.out.stat().st_size / 1e6
    log(f"saved {args.out} ({size_mb:.1f} MB) after {time.time() - start:.0f}s")
    log_file.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lynx_compile.tools.train`: the same as `lynx-compile train`."""
    parser = argparse.ArgumentParser(description="Train TinyMoE on the Python stdlib sources.")
    add_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
