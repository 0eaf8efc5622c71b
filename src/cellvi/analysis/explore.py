"""Exploration helpers for MrVI's workflow: group cells by their sample distance matrices, then
cluster samples on a group's average matrix (Boyeau et al., 2025, Methods, "sample stratification")."""

from __future__ import annotations

import numpy as np


def cluster_distance_matrices(dists: np.ndarray, n_clusters: int, n_components: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster cells by their flattened sample distance matrices (PCA, then k-means).

    Parameters
    ----------
    dists
        ``(cells, S, S)`` distance matrices.
    n_clusters
        Number of cell clusters.
    n_components
        PCA components kept before clustering.

    Returns
    -------
    ``(cells,)`` integer cluster labels.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    S = dists.shape[-1]
    iu = np.triu_indices(S, 1)
    flat = np.asarray(dists)[:, iu[0], iu[1]]  # the upper triangle holds all the information
    k = max(1, min(n_components, flat.shape[0], flat.shape[1]))
    emb = PCA(k, random_state=seed).fit_transform(flat) if flat.shape[1] > k else flat
    return KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(emb)


def average_by_cluster(dists: np.ndarray, labels: np.ndarray) -> dict:
    """Average ``(S, S)`` matrix of the cells in each cluster: ``{label: matrix}``."""
    labels = np.asarray(labels)
    return {lab: np.asarray(dists)[labels == lab].mean(0) for lab in np.unique(labels)}


def sample_linkage(dist: np.ndarray, method: str = "complete") -> np.ndarray:
    """Hierarchical clustering of samples from one ``(S, S)`` distance matrix (scipy linkage matrix)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(dist, dtype=np.float64)
    d = 0.5 * (d + d.T)
    np.fill_diagonal(d, 0.0)
    return linkage(squareform(d, checks=False), method=method)


def sample_clusters(dist: np.ndarray, n_clusters: int, method: str = "complete") -> np.ndarray:
    """Cut :func:`sample_linkage` into ``n_clusters`` groups of samples; ``(S,)`` labels from 1."""
    from scipy.cluster.hierarchy import fcluster

    return fcluster(sample_linkage(dist, method), n_clusters, criterion="maxclust")
