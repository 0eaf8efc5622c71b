"""PeakVI differential accessibility on one simulated design: AUPRC, calls, observed FDP and recall at the 5 % target.

Usage (from the repo root):

    PYTHONPATH=src python benchmarks/check_peakvi_da.py N_CELLS N_REGIONS SEED GROUP1 GROUP2
    # e.g. the designs in BENCHMARKS.md: 600 3000 21 type_2 type_3 / 3000 2000 22 type_1 type_3 / 400 1500 23 type_0 type_2

``cellvi.datasets.simulate_atac``, PeakVI at its default sizes, 100 epochs, lr 1e-3; truth: the regions simulated
as differentially accessible in either group.
"""
import sys

from sklearn.metrics import average_precision_score

import cellvi

n_cells, n_regions, seed = (int(v) for v in sys.argv[1:4])
a = cellvi.datasets.simulate_atac(n_cells, n_regions, seed=seed)
cellvi.settings.seed = 0
cellvi.settings.progress_bar = False
cellvi.PeakVI.setup_anndata(a, batch_key="batch")
m = cellvi.PeakVI(a)
m.train(max_epochs=100, lr=1e-3, early_stopping=False, train_size=0.9, accelerator="cpu")
g1, g2 = sys.argv[4], sys.argv[5]
d = m.differential_accessibility(groupby="cell_type", group1=g1, group2=g2).loc[a.var_names]
truth = a.var[f"da_{g1}"].values | a.var[f"da_{g2}"].values
c = d["is_da_fdr"].values
print("SUMMARY", sys.argv[1:], "AUPRC", round(average_precision_score(truth, d["prob_da"]), 3), "calls", c.sum(),
      "FDP", round((c & ~truth).sum() / max(c.sum(), 1), 3), "recall", round((c & truth).sum() / truth.sum(), 3))
