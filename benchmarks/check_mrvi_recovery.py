"""MrVI's recovery of a simulated cohort over seeds (cellvi only; fast: no DE).

Usage (from the repo root):

    PYTHONPATH=src python benchmarks/check_mrvi_recovery.py --seeds 0-7 --n-cells 1200 --n-genes 100 --de-lfc 2.5
    PYTHONPATH=src python benchmarks/check_mrvi_recovery.py --seeds 2,3 --n-cells 4000 --n-genes 500 \
        --module-file /tmp/mrvi_before.py      # an older models/mrvi.py (git show <rev>:src/cellvi/models/mrvi.py)
    PYTHONPATH=src python benchmarks/check_mrvi_recovery.py --seeds 0-5 --n-cells 4000 --n-genes 500 \
        --model-kwargs '{"mlp_inner_width": 32}'  # MrVIConfig fields
    /work/venv-scvi/bin/python benchmarks/check_mrvi_recovery.py --seeds 0-5 --n-cells 4000 --n-genes 500 \
        --library scvi                                # scvi-tools' torch MRVI, same data, seeds and metrics

For each seed: ``simulate_cohort(n_cells, n_genes, de_lfc=..., seed=seed)``, ``cellvi.settings.seed = seed``,
``--epochs`` of training, then one line with the Spearman correlation of the DE subset's averaged distances with
the simulated ones, the largest other subset's mean distance over the DE subset's, the AUPRC of |DA log ratio|
for the DA cells, and the mean DA log ratio (cov2 high vs low) in type_1 and type_2. The recovery test and
BENCHMARKS.md quote it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import scipy.stats
from sklearn.metrics import average_precision_score

import cellvi
from cellvi.models import mrvi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_mrvi_step import load_module_file  # noqa: E402


def seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = map(int, text.split("-"))
        return list(range(lo, hi + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=seeds, default=[0])
    p.add_argument("--n-cells", type=int, default=1200)
    p.add_argument("--n-genes", type=int, default=100)
    p.add_argument("--de-lfc", type=float, default=1.5)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--module-file", default=None)
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON, e.g. \'{"mlp_inner_width": 32}\'')
    p.add_argument("--library", choices=["cellvi", "scvi"], default="cellvi")
    p.add_argument("--compile-kernels", choices=["auto", "on", "off"], default="auto",
                   help="cellvi's compile_kernels (on: its network compiled, as runs of 2M cell passes are)")
    args = p.parse_args()
    if args.library == "scvi":
        import warnings

        import scvi

        warnings.filterwarnings("ignore")
    if args.module_file:
        mrvi.MrVIModule = load_module_file(args.module_file).MrVIModule
    cellvi.settings.progress_bar = False
    for seed in args.seeds:
        a = cellvi.datasets.simulate_cohort(args.n_cells, args.n_genes, de_lfc=args.de_lfc, seed=seed)
        if args.library == "scvi":
            scvi.settings.seed = seed
            scvi.external.MRVI.setup_anndata(a, sample_key="sample", backend="torch")
            m = scvi.external.MRVI(a, **args.model_kwargs)
            m.train(max_epochs=args.epochs, accelerator="cpu", enable_progress_bar=False)
        else:
            cellvi.settings.seed = seed
            cellvi.MrVI.setup_anndata(a, sample_key="sample")
            m = cellvi.MrVI(a, **args.model_kwargs)
            m.train(max_epochs=args.epochs, compile_kernels={"auto": None, "on": True, "off": False}[args.compile_kernels])
        avg = m.get_local_sample_distances(groupby="cell_type", keep_cell=False)["cell_type"]
        truth = a.uns["truth"]["sample_distances"]
        iu = np.triu_indices(truth.shape[0], 1)
        de = avg.sel(cell_type_name="type_0").values[iu]
        other = max(avg.sel(cell_type_name=t).values[iu].mean() for t in ("type_1", "type_2", "type_3", "type_4"))
        da = m.differential_abundance(sample_cov_keys=["cov2"])
        ratio = (da["cov2_log_probs"].sel(cov2="high") - da["cov2_log_probs"].sel(cov2="low")).values
        ct = a.obs["cell_type"].astype(str).to_numpy()
        auprc = average_precision_score(np.isin(ct, ["type_1", "type_2"]), np.abs(ratio))
        rho = scipy.stats.spearmanr(de, truth[iu])[0]
        print(f"{args.library} {args.module_file or 'current'} {json.dumps(args.model_kwargs)} seed {seed}: spearman {rho:.3f} "
              f"max_other/de {other / de.mean():.3f} da_auprc {auprc:.3f} type_1 {ratio[ct == 'type_1'].mean():.2f} "
              f"type_2 {ratio[ct == 'type_2'].mean():.2f}", flush=True)


if __name__ == "__main__":
    main()
