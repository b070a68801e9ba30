"""Packed file size against the dense model, with and without the file's column coding.

For each model and level spec, packs the model (float32 and int8) and saves three files:
``dense`` (the float32 dense model's state as safetensors), ``uncoded`` (the packed file with every
column index stored, the layout every file had before the column coding) and ``file`` (the packed
file as ``PackedModel.save`` writes it: each level's columns as indices or a bitmap, whichever is
smaller, none for a complete densest level; ``csr.column_coding``). Sizes are the files' bytes on
disk; they depend on the level counts and dtypes only, so one run is exact (no timing involved).
``vs_plain_csr`` is the issue's size rule: all levels' arrays over a plain CSR of the densest level.

    python benchmarks/file_size.py        # writes benchmarks/results/file_size.{json,md,png}
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file

from nestedsparse import models
from nestedsparse.levels import LevelSpec
from nestedsparse.nest import nestify_
from nestedsparse.pack import format as packed_format
from nestedsparse.pack import pack

sys.path.insert(0, str(Path(__file__).parent))
from kernels import code_version, config_args, write_results  # noqa: E402 - shared benchmark helpers

RESULTS = Path(__file__).parent / "results"
CONFIGS = {  # name: (registry name, kwargs)
    "mlp1024": ("mlp_1024", {"image_size": 32}),
    "lenet5": ("lenet5", {}),
    "resnet20": ("resnet20", {"in_channels": 3}),
    "mobilenet_v1": ("mobilenet_v1", {"in_channels": 3}),
}
SPECS = {"5/10/100%": (0.05, 0.1, 1.0), "2/5/10/20/50/100%": (0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
         "5/10/50%": (0.05, 0.1, 0.5)}
TABLE_KEYS = ("config", "spec", "dtype", "dense_bytes", "uncoded_bytes", "file_bytes", "uncoded_vs_dense",
              "file_vs_dense", "vs_plain_csr")


def _uncoded(csr):
    return csr.col_indices, None, (), None


def measure(config: str, spec_name: str, tmp: Path) -> list[dict]:
    name, kw = CONFIGS[config]
    torch.manual_seed(0)
    m = models.create(name, **kw).eval()
    dense_path = tmp / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(dense_path))
    nestify_(m, LevelSpec(SPECS[spec_name]))
    rows = []
    for dtype in ("float32", "int8"):
        packed = pack(m, dtype=dtype, model_name=name, model_kwargs=kw)
        packed.save(tmp / "coded.nsp")
        with mock.patch.object(packed_format, "encode_columns", _uncoded):
            packed.save(tmp / "uncoded.nsp")
        dense_b = dense_path.stat().st_size
        coded_b, uncoded_b = (tmp / "coded.nsp").stat().st_size, (tmp / "uncoded.nsp").stat().st_size
        rows.append({"config": config, "spec": spec_name, "dtype": dtype, "dense_bytes": dense_b,
                     "uncoded_bytes": uncoded_b, "file_bytes": coded_b,
                     "uncoded_vs_dense": round(uncoded_b / dense_b, 3), "file_vs_dense": round(coded_b / dense_b, 3),
                     "vs_plain_csr": packed.size_table()[-1]["vs_plain_csr_densest"]})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(dict.fromkeys(r["spec"] for r in rows))
    fig, axes = plt.subplots(1, len(specs), figsize=(5.2 * len(specs), 3.8), squeeze=False, sharey=True)
    for ax, spec in zip(axes[0], specs):
        rs = [r for r in rows if r["spec"] == spec]
        labels = [f"{r['config']}\n{r['dtype']}" for r in rs]
        xs = range(len(rs))
        ax.bar([x - 0.2 for x in xs], [r["uncoded_vs_dense"] for r in rs], 0.4, label="every column stored")
        ax.bar([x + 0.2 for x in xs], [r["file_vs_dense"] for r in rs], 0.4, label="column coding (the file)")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7, rotation=60)
        ax.set_title(f"levels {spec}")
        ax.set_ylabel("file bytes / dense float32 model")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    configs, out = config_args(__doc__.split("\n")[0], CONFIGS, RESULTS / "file_size")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            for spec in SPECS:
                rows.extend(measure(config, spec, Path(tmp)))
    meta = {"code": code_version(), "torch": torch.__version__,
            "method": "bytes of the saved files; random-init weights (sizes depend on level counts and dtypes only)"}
    print(write_results(out, "Packed file size vs the dense model", rows, TABLE_KEYS, meta))
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
