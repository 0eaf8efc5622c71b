"""SCVI differential abundance on simulations with known abundance shifts: does the stim-vs-ctrl log density ratio
rank the up-shifted type first and the down-shifted type last? With and without leaving each cell's own posterior
out of its sample's mixture (``omit_own_cell``; ``False`` computes the densities as scvi-tools does).

    python benchmarks/bench_da.py --seeds 7 8
"""

import argparse

from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

import cellvi


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[7, 8])
    args = p.parse_args()
    cellvi.settings.progress_bar = False
    print("seed | omit_own_cell | AUROC up-shifted type (x3) | AUROC down-shifted type (x1/3)")
    for seed in args.seeds:
        adata = cellvi.datasets.simulate(2400, 200, n_cell_types=4, abundance_shift=[3.0, 1.0, 1 / 3, 1.0], seed=seed)
        cellvi.SCVI.setup_anndata(adata, batch_key="batch")
        model = cellvi.SCVI(adata, n_latent=6)
        model.train(max_epochs=40, n_epochs_kl_warmup=10, seed=0)
        condition = adata.obs.groupby("sample", observed=True)["condition"].first()
        cell_type = adata.obs["cell_type"].astype(str).to_numpy()
        for own in (True, False):
            table = model.differential_abundance(sample_key="sample", omit_own_cell=own)
            stim = [s for s in table.columns if condition[s] == "stim"]
            ctrl = [s for s in table.columns if condition[s] == "ctrl"]
            score = logsumexp(table[stim].to_numpy(), 1) - logsumexp(table[ctrl].to_numpy(), 1)
            up = roc_auc_score(cell_type == "type_0", score)
            down = roc_auc_score(cell_type == "type_2", -score)
            print(f"{seed} | {own} | {up:.3f} | {down:.3f}")


if __name__ == "__main__":
    main()
