"""``nestedsparse`` command line: a thin argparse front over the library's verbs.

    nestedsparse train --model lenet5 --dataset fashion-mnist --densities 0.05,0.1,0.25,1.0 --out runs/a
    nestedsparse eval runs/a            # per-level table; runs/a/eval.json
    nestedsparse plot runs/a            # accuracy vs MACs, runs/a/pareto.png
    nestedsparse pack runs/a -o a.nsp   # every level in one file (--dtype float32|int8)
    nestedsparse bench a.nsp --batch 1,64
    nestedsparse export a.nsp --level 0 -o a0.onnx
    nestedsparse export a.nsp --level 0 --slim -o a0_thin.onnx

A run folder holds ``run.json`` (model, data set, levels, training config), ``metrics.jsonl``,
``checkpoint.safetensors`` (resumable) and ``model.safetensors`` (the trained nested model).
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.05,0.1,1.0, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,64, got {text!r}") from None


def _block(text: str) -> tuple[int, int]:
    try:
        r, c = (int(t) for t in text.lower().split("x"))
        return r, c
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block as ROWSxCOLS such as 1x2, got {text!r}") from None


def _hierarchy(text: str):
    if "," not in text and not text.strip().isdigit():
        return text.strip()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a hierarchy name or comma-separated ints, got {text!r}") from None


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as width=4, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a nested model jointly at all levels")
    p.add_argument("--model", default="lenet5", help="a name from the model registry (default lenet5)")
    p.add_argument("--model-arg", action="append", type=_kv, default=[], metavar="K=V", help="model keyword argument")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | cifar10 | cifar100 | synthetic")
    p.add_argument("--data-dir", default=None, help="folder holding the data set's files")
    p.add_argument("--densities", type=_floats, default=(0.05, 0.1, 0.25, 1.0), help="per-level densities, sparsest first")
    p.add_argument("--allocation", default="erk", help="erk (default: small layers kept denser) | uniform | global")
    p.add_argument("--first-last-density", type=float, default=None, help="floor density of first and last layers")
    p.add_argument("--block", type=_block, default=(1, 1), help="prune blocks ROWSxCOLS, e.g. 1x2 (default 1x1)")
    p.add_argument("--selector", default="magnitude",
                   help="magnitude | nestednet | channels (NestedNet's channel scheduling)")
    p.add_argument("--depth", type=_ints, default=None, metavar="N0,N1,...",
                   help="layer scheduling (NestedNet): blocks per stage each level runs, e.g. 2,3,5 on resnet32")
    p.add_argument("--sparse-channels", action="store_true",
                   help="with --selector channels --widths: also prune inside the kept channels to --densities by "
                        "magnitude (width x sparsity)")
    p.add_argument("--widths", type=_floats, default=None,
                   help="channel scheduling: width per level, increasing, last 1.0 (default sqrt of each density)")
    p.add_argument("--prune-end", type=float, default=None, help="fraction of training when the maps are fixed")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that already holds a run (its files are replaced)")
    from .train.trainer import TrainConfig

    d = TrainConfig()
    for name in ("epochs", "batch_size", "max_steps_per_epoch", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "distill", "temperature"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    for name in ("optimizer", "schedule", "routing", "sampling", "device"):
        p.add_argument("--" + name.replace("_", "-"), default=getattr(d, name))
    p.add_argument("--layer-sparsity", type=float, default=0.0, metavar="LAMBDA",
                   help="layer-sparsity regulariser (Hebiri & Lederer): proximal step on collapsible layers' "
                        "negative parts; then `nestedsparse collapse` (default 0 = off)")
    p.add_argument("--input-nonneg", action="store_true", help="inputs are >= 0: the first layer may collapse too")
    p.add_argument("--hierarchy", type=_hierarchy, default=None, metavar="NAME|MAP",
                   help="hierarchical classification: a named fine->coarse map (fashion-mnist), 'data' (the "
                        "data set's own coarse labels, e.g. CIFAR-100's 20 superclasses) or the map as "
                        "comma-separated coarse labels; the sparsest --coarse-levels levels learn coarse classes")
    p.add_argument("--coarse-levels", type=int, default=1, help="levels trained on coarse classes (default 1)")
    p.add_argument("--level-weights", type=_floats, default=None, help="loss weight per level")
    p.add_argument("--subset", type=int, default=None, help="use only the first N training images (quick runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_rest(sub) -> None:
    p = sub.add_parser("eval", help="per-level table of a run: density, params, MACs, accuracy")
    p.add_argument("run", help="run folder")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--consensus", action="store_true",
                   help="also the consensus of levels (NestedNet): A = mean of probabilities, L = a linear layer "
                        "over the levels' logits fitted on the training set")
    p.add_argument("--consensus-epochs", type=int, default=1, help="epochs fitting the L consensus (default 1)")
    p = sub.add_parser("plot", help="accuracy vs MACs per level (PNG)")
    p.add_argument("runs", nargs="+", help="run folders (or eval.json files)")
    p.add_argument("-o", "--output", default=None,
                   help="image path: .png, .pdf, .svg or .jpg (default <first run>/pareto.png)")
    p.add_argument("--x", default="macs", choices=["macs", "params"])
    p = sub.add_parser("pack", help="pack every level into one NestedCSR file")
    p.add_argument("run", help="run folder (or a model.safetensors inside one)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "int8"])
    p = sub.add_parser("collapse", help="merge a run's collapsible layers (layer sparsity) and refit as a new run")
    p.add_argument("run", help="run folder trained with --layer-sparsity")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--level", type=int, default=None, help="level whose weights are merged (default the densest)")
    p.add_argument("--epochs", type=int, default=1, help="refit epochs (0 = merge only, no refit; default 1)")
    p.add_argument("--lr", type=float, default=None, help="refit learning rate (default the run's)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted refit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("bench", help="latency per level of a packed file vs dense PyTorch and ONNX Runtime")
    p.add_argument("packed")
    p.add_argument("--batch", type=_ints, default=(1, 64))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p = sub.add_parser("export", help="export one level of a packed file to ONNX")
    p.add_argument("packed")
    p.add_argument("--level", type=int, required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--slim", action="store_true",
                   help="drop the channels only zero weights read (a channel-scheduled level becomes its thin "
                        "dense network)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``nestedsparse`` command."""
    parser = argparse.ArgumentParser(prog="nestedsparse", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_rest(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    from . import commands

    try:
        return getattr(commands, "cmd_" + args.command)(args) or 0
    except (ValueError, TypeError, KeyError, OSError) as e:
        if isinstance(e, BrokenPipeError) and _stdout_closed():  # `nestedsparse eval run | head`: the reader left
            _quiet_stdout()
            return 1
        print(f"nestedsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (its last checkpoint stays: continue with --resume)" if args.command in ("train", "collapse") else ""
        print(f"\nnestedsparse {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def _stdout_closed() -> bool:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so Python's exit flush does not raise a second BrokenPipeError."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
