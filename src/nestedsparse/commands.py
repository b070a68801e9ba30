"""What each CLI command does, on top of the library's verbs (argparse lives in ``cli.py``)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from .data import load_dataset
from .io import load_into_, read_meta, save
from .levels import LevelSpec
from .nest import nestify_
from .report import format_table, plot_pareto, read_eval, read_json
from .structure import create_model, depth_schedule_

RUN_FILE, MODEL_FILE, EVAL_FILE = "run.json", "model.safetensors", "eval.json"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _run_info(run: Path) -> dict:
    path = run / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no {RUN_FILE}); create one with `nestedsparse train --out {run}`")
    return read_json(path)


def _model_kwargs_accepted(name: str) -> set[str]:
    from .models import _accepted_kwargs, get_factory

    return _accepted_kwargs(get_factory(name)) or set()


def _architecture(desc: dict) -> torch.nn.Module:
    """The architecture a run.json or a model file's metadata names (``model``, ``model_kwargs``,
    ``collapse``), with its recorded ``input_shape``: the data's sample shape (a ResNet takes any
    image size; 32x32 is its default)."""
    model = create_model(desc["model"], desc.get("model_kwargs", {}), desc.get("collapse"))
    if desc.get("input_shape"):
        model.input_shape = tuple(int(v) for v in desc["input_shape"])
    return model


def build_model(info: dict) -> torch.nn.Module:
    """The nested model a run describes (fresh weights; load a file into it)."""
    model = _architecture(info)
    nestify_(model, LevelSpec.from_dict(info["spec"]), block=tuple(info.get("block", (1, 1))))
    if info.get("depth"):  # layer scheduling: blocks per stage at each level
        try:
            depth_schedule_(model, info["depth"])
        except ValueError as e:
            raise ValueError(f"--depth {','.join(map(str, info['depth']))} on {info['model']}: {e} (from the "
                             "command line: the registry's resnet20/32/56 and wrn have such stages)") from None
    return model


def load_run_model(run: Path) -> tuple[torch.nn.Module, dict]:
    """The trained nested model of a run folder and its run.json."""
    info = _run_info(run)
    path = run / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the run has not finished (resume it with `nestedsparse train --resume`)")
    model = build_model(info)
    load_into_(model, path)
    return model, info


def cmd_train(args) -> int:
    from .train.trainer import TrainConfig, train

    run = Path(args.out)
    if args.subset is not None and args.subset < 1:
        raise ValueError(f"--subset must be a positive number of images, got {args.subset}")
    _check_data_dir(args.data_dir)
    if args.coarse_levels != 1 and args.hierarchy is None:
        raise ValueError("--coarse-levels sets how many levels learn superclasses; it needs --hierarchy")
    spec = LevelSpec(densities=args.densities, allocation=args.allocation, first_last_density=args.first_last_density)
    if args.selector != "magnitude" and tuple(args.block) != (1, 1):
        raise ValueError(f"--block {args.block[0]}x{args.block[1]} needs --selector magnitude; {args.selector} prunes single weights")
    sel_args = {"block": list(args.block)} if args.selector == "magnitude" else {}
    if (args.widths is not None or args.sparse_channels) and args.selector != "channels":
        raise ValueError("--widths / --sparse-channels set channel scheduling; they need --selector channels")
    if args.selector == "channels":
        if args.prune_end is not None:
            raise ValueError("--prune-end schedules magnitude / nestednet pruning; channel scheduling has no schedule")
        if args.widths is not None:
            sel_args["widths"] = list(args.widths)
        if args.sparse_channels:
            sel_args["sparse"] = True
    if args.prune_end is not None:
        sel_args["end"] = args.prune_end
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        routing=args.routing, sampling=args.sampling, level_weights=args.level_weights, distill=args.distill,
        temperature=args.temperature, selector=args.selector, selector_args=sel_args, seed=args.seed,
        max_steps_per_epoch=args.max_steps_per_epoch, device=args.device, progress=not args.no_progress,
        layer_sparsity=args.layer_sparsity, input_nonneg=args.input_nonneg,
        hierarchy=None if args.hierarchy == "data" else args.hierarchy,
        coarse_levels=args.coarse_levels,
    )
    info = {"model": args.model, "model_kwargs": dict(args.model_arg), "dataset": args.dataset,
            "data_dir": args.data_dir, "spec": spec.to_dict(), "block": list(args.block), "config": config.to_dict(),
            "subset": args.subset}
    if args.depth is not None:
        info["depth"] = list(args.depth)
    train_set = load_dataset(args.dataset, args.data_dir, split="train")
    if args.hierarchy == "data":  # the dataset's own superclasses (CIFAR-100's 20, ...), stored as a list
        from .data.hierarchy import mapping_from_dataset

        config = dataclasses.replace(config, hierarchy=mapping_from_dataset(train_set))
        info["config"] = config.to_dict()
    if args.subset:
        train_set = torch.utils.data.TensorDataset(*(t[: args.subset] for t in train_set.tensors))
    test_set = load_dataset(args.dataset, args.data_dir, split="test")
    info["model_kwargs"].setdefault("num_classes", int(train_set.tensors[1].max()) + 1)
    sample = tuple(int(v) for v in train_set.tensors[0].shape[1:])
    info["model_kwargs"].setdefault("in_channels", sample[0])
    # a run folder from before the sample shape was recorded resumes as it started (no image_size / input_shape)
    old = _run_info(run) if args.resume and (run / RUN_FILE).is_file() else None
    legacy = old is not None and "input_shape" not in old
    if (len(sample) == 3 and sample[1] == sample[2] and "image_size" in _model_kwargs_accepted(args.model)
            and not (legacy and "image_size" not in old.get("model_kwargs", {}))):
        info["model_kwargs"].setdefault("image_size", sample[1])  # LeNet-5 / MLP on 32x32 CIFAR, ...
    if not legacy:
        info["input_shape"] = list(sample)
    if args.resume and getattr(args, "overwrite", False):
        raise ValueError("--resume continues the run in --out, --overwrite starts it over: pass one of them")
    if old is not None:
        _check_same_run(old, info, run)
    torch.manual_seed(args.seed)
    model = build_model(info)
    _preflight(model, train_set, config)  # bad flags fail here, before anything in the folder changes
    if not args.resume and _rank() == 0:  # rank 0 alone: the other ranks would see its new run.json
        _fresh_run_folder(run, getattr(args, "overwrite", False))
    if _rank() == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / RUN_FILE).write_text(json.dumps(info, indent=2))
    result = train(model, train_set, test_set, config, run_dir=run, resume=args.resume)
    if _rank() == 0:
        save(model, run / MODEL_FILE, extra={"model": args.model, "model_kwargs": info["model_kwargs"],
                                             "input_shape": info.get("input_shape")})
        rows = [{"level": r["level"], "accuracy": r["accuracy"]} for r in result.final]
        print(format_table(rows))
        print(f"saved {run / MODEL_FILE}")
    return 0


#: what a run folder's earlier run leaves behind (a fresh run must not mix with them); a run.json
#: alone is a run that stopped before it saved anything, replaced without asking
RUN_OUTPUTS = (MODEL_FILE, EVAL_FILE, "checkpoint.safetensors", "metrics.jsonl", "pareto.png")


def _preflight(model: torch.nn.Module, train_set, config) -> None:
    """What ``train`` would refuse (device, level weights, labels vs outputs), checked up front."""
    from .train.trainer import _pick_device, check_train_inputs

    _pick_device(config)
    check_train_inputs(model, train_set, config, torch.device("cpu"))  # the model is still on the CPU here


def _fresh_run_folder(run: Path, overwrite: bool) -> None:
    """A new run may not start in a folder holding another run's files (a later ``--resume`` would
    continue that run's checkpoint); ``--overwrite`` removes them first."""
    found = [f for f in RUN_OUTPUTS if (run / f).exists()]
    if not found:
        return
    if not overwrite:
        raise ValueError(f"{run} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                         "--overwrite to start over there, or another --out")
    for f in found:
        (run / f).unlink()


def _check_same_run(old: dict, new: dict, run: Path) -> None:
    """A resumed run must have the settings it started with (progress bar and device aside)."""
    from .train.trainer import TrainConfig

    defaults = TrainConfig().to_dict()

    def key(d):  # settings a run folder from an older version lacks are the defaults it ran with
        cfg = {k: v for k, v in {**defaults, **d.get("config", {})}.items() if k not in ("progress", "device")}
        return {**{k: d.get(k) for k in set(old) | set(new) if k != "config"}, "config": cfg}

    a, b = key(old), key(new)
    diff = [f"{k}: recorded {a.get(k)!r}, given {b.get(k)!r}"
            for k in sorted((set(a) | set(b)) - {"config"}) if a.get(k) != b.get(k)]
    ca, cb = a["config"], b["config"]
    diff += [f"config.{k}: recorded {ca.get(k)!r}, given {cb.get(k)!r}"
             for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    if diff:
        raise ValueError(f"--resume with other settings than {run / RUN_FILE} records ({'; '.join(diff)}); "
                         "rerun with the same flags")


def cmd_eval(args) -> int:
    from .data.hierarchy import resolve_hierarchy
    from .metrics import level_summary
    from .train.loss import Hierarchy
    from .train.trainer import evaluate

    run = Path(args.run)
    _check_data_dir(args.data_dir)
    model, info = load_run_model(run)
    test_set = load_dataset(info["dataset"], args.data_dir or info.get("data_dir"), split="test")
    example = test_set.tensors[0][:1]
    cfg = info.get("config", {})
    hierarchy = None
    if cfg.get("hierarchy") is not None:
        hierarchy = Hierarchy(resolve_hierarchy(cfg["hierarchy"]), int(cfg.get("coarse_levels", 1)))
    if args.consensus:  # refused before the evaluation, not after it
        fine = [k for k in range(len(info["spec"]["densities"])) if hierarchy is None or not hierarchy.is_coarse(k)]
        if len(fine) < 2:
            raise ValueError(f"--consensus needs two or more (fine) levels, the run has {fine}")
        if args.consensus_epochs < 1:
            raise ValueError(f"--consensus-epochs must be >= 1, got {args.consensus_epochs}")
    ev = {r["level"]: r for r in evaluate(model, test_set, hierarchy=hierarchy)}
    keys = ["accuracy"] + (["coarse_accuracy", "coarse"] if hierarchy is not None else [])
    rows = [{**r, **{k: ev[r["level"]][k] for k in keys}} for r in level_summary(model, example)]
    print(format_table(rows, ["level", "density", "params", "macs", *keys]))
    out = {"model": info["model"], "dataset": info["dataset"], "levels": rows}
    if args.consensus:
        out["consensus"] = _consensus_rows(model, info, rows, hierarchy, args)
        print(format_table(out["consensus"], ["consensus", "levels", "macs", "accuracy"]))
    (run / EVAL_FILE).write_text(json.dumps(out, indent=2))
    print(f"wrote {run / EVAL_FILE}")
    return 0


def _consensus_rows(model, info: dict, rows: list[dict], hierarchy, args) -> list[dict]:
    """NestedNet's consensus A and L over the run's fine levels (L fitted on its training set)."""
    from .train.consensus import LevelConsensus, consensus_accuracy, fit_consensus

    levels = [r["level"] for r in rows if hierarchy is None or not hierarchy.is_coarse(r["level"])]
    if len(levels) < 2:
        raise ValueError(f"--consensus needs two or more (fine) levels, the run has {levels}")
    test_set = load_dataset(info["dataset"], args.data_dir or info.get("data_dir"), split="test")
    train_set = load_dataset(info["dataset"], args.data_dir or info.get("data_dir"), split="train")
    if info.get("subset"):
        train_set = torch.utils.data.TensorDataset(*(t[: info["subset"]] for t in train_set.tensors))
    macs = sum(r["macs"] for r in rows if r["level"] in levels)
    out = []
    for mode in ("average", "linear"):
        cons = LevelConsensus(model, levels, mode, num_classes=int(info["model_kwargs"]["num_classes"]))
        if mode == "linear":
            fit_consensus(cons, train_set, epochs=args.consensus_epochs)
        got = consensus_accuracy(cons, test_set)
        out.append({"consensus": "A" if mode == "average" else "L", "levels": ",".join(map(str, levels)),
                    "macs": macs, "accuracy": got["accuracy"]})
    return out


def cmd_plot(args) -> int:
    evals = [read_eval(r) for r in args.runs]
    first = Path(args.runs[0])
    out = Path(args.output) if args.output else (first if first.is_dir() else first.parent) / "pareto.png"
    if out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise ValueError(f"-o {out}: give an image path ending in .png, .pdf, .svg or .jpg")
    plot_pareto(evals, out, x=args.x, labels=[str(r) for r in args.runs] if len(args.runs) > 1 else None)
    print(f"wrote {out}")
    return 0


def _model_file(path: Path) -> Path:
    return path / MODEL_FILE if path.is_dir() else path


def cmd_pack(args) -> int:
    from .pack import pack

    src = _model_file(Path(args.run))
    meta = read_meta(src)["extra"]
    model = _architecture(meta)
    load_into_(model, src)
    packed = pack(model, dtype=args.dtype, model_name=meta["model"], model_kwargs=meta.get("model_kwargs", {}),
                  collapse=meta.get("collapse"))
    packed.save(args.output)
    print(format_table(packed.size_table(), ["level", "density", "spec_density", "nnz", "bytes",
                                             "vs_plain_csr_densest"]))
    print(f"wrote {args.output} ({Path(args.output).stat().st_size:,} bytes)")
    return 0


def cmd_collapse(args) -> int:
    """Layer sparsity's last two steps: merge a run's collapsible layers, then refit (a new run)."""
    from .nest import plain_model
    from .structure import collapse
    from .train.trainer import TrainConfig, train

    run, out = Path(args.run), Path(args.out)
    if out.resolve() == run.resolve():
        raise ValueError("--out must be a new run folder, not the run being collapsed")
    model, info = load_run_model(run)
    if info.get("depth"):
        raise ValueError(f"{run} uses layer scheduling (--depth); collapse traces the model into one graph and "
                         "would lose its block gates: collapse a run without --depth")
    spec = LevelSpec.from_dict(info["spec"])
    level = spec.num_levels - 1 if args.level is None else args.level
    plain = plain_model(model, level).eval()
    cfg = dict(info["config"])
    res = collapse(plain, input_nonneg=bool(cfg.get("input_nonneg", False)))
    rows = [{"first": lk.first, "into": lk.second} for lk in res.merged]
    if not rows:
        raise ValueError(f"no layer of {run} is collapsible ({len(res.remaining)} candidate(s), each with a negative "
                         "weight or bias): train longer or with a larger --layer-sparsity")
    print(format_table(rows))
    def n_params(m):
        return sum(p.numel() for p in m.parameters())

    print(f"layers {res.layers_before} -> {res.layers_after}, parameters {n_params(plain):,} -> "
          f"{n_params(res.model):,} (level {level}); {len(res.remaining)} candidate(s) left")
    recipe = res.recipe()
    if info.get("collapse"):  # collapsing a collapsed run: its merges come first when the recipe is replayed
        recipe["links"] = list(info["collapse"]["links"]) + recipe["links"]
        recipe["input_nonneg"] = bool(info["collapse"]["input_nonneg"] or recipe["input_nonneg"])
    new = res.model
    if getattr(model, "input_shape", None) is not None:
        new.input_shape = model.input_shape
    nestify_(new, spec, block=tuple(info.get("block", (1, 1))))
    if cfg.get("selector") == "channels":  # the thin levels are the run's design, refit or not
        from .structure import ChannelSelector

        ChannelSelector(**dict(cfg.get("selector_args") or {})).apply_(new)
    cfg.update(layer_sparsity=0.0, epochs=args.epochs or 1, progress=not args.no_progress)
    if args.lr is not None:
        cfg["lr"] = args.lr
    config = TrainConfig(**{k: v for k, v in cfg.items() if k != "version"})
    new_info = {**info, "collapse": recipe, "collapsed_from": str(run), "refit_epochs": args.epochs,
                "config": config.to_dict()}
    if args.resume and (out / RUN_FILE).is_file():
        _check_same_run(_run_info(out), new_info, out)
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(new_info, indent=2))
    if args.epochs:  # refit: the smaller network trained again, without the penalty
        train_set = load_dataset(info["dataset"], info.get("data_dir"), split="train")
        if info.get("subset"):
            train_set = torch.utils.data.TensorDataset(*(t[: info["subset"]] for t in train_set.tensors))
        test_set = load_dataset(info["dataset"], info.get("data_dir"), split="test")
        result = train(new, train_set, test_set, config, run_dir=out, resume=args.resume)
        if _rank() == 0:
            print(format_table([{"level": r["level"], "accuracy": r["accuracy"]} for r in result.final]))
    if _rank() == 0:
        save(new, out / MODEL_FILE, extra={"model": info["model"], "model_kwargs": info["model_kwargs"],
                                           "collapse": recipe, "input_shape": info.get("input_shape")})
        print(f"saved {out / MODEL_FILE}")
    return 0


def _check_data_dir(data_dir: str | None) -> None:
    """``--data-dir`` must name a folder (an empty one would fall back to the default folders)."""
    if data_dir is not None and (not data_dir.strip() or not Path(data_dir).is_dir()):
        raise FileNotFoundError(f"--data-dir {data_dir!r} is not a folder")


def _check_new_file(path: Path, what: str) -> None:
    """Refuse, before any work, an output path that cannot be written: a folder, or one under a
    file or an unwritable folder (its missing parent folders are only created when it is written)."""
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {parent} is not a folder this process can write to")


def cmd_bench(args) -> int:
    from .pack.bench import bench_packed

    if args.json:  # a bad path fails now, not after the whole benchmark; nothing is created yet
        _check_new_file(Path(args.json), "--json")
    rows = bench_packed(args.packed, batches=args.batch, threads=args.threads, repeats=args.repeats)
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_export(args) -> int:
    from .pack.onnx import export_level

    err = export_level(args.packed, args.level, args.output, slim=getattr(args, "slim", False))
    size = Path(args.output).stat().st_size
    print(f"wrote {args.output} ({size:,} bytes{', slim' if getattr(args, 'slim', False) else ''}; "
          f"max |onnxruntime - runtime| = {err:.2e})", file=sys.stdout)
    return 0
