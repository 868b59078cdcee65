"""Evaluations of a trained model, read through the trainer's public encode/decode/interpolate:
the lines metrics (Mean Distance, Smoothness), the linear probe's accuracy and the K-means
clustering accuracy of the latents."""
from .cluster import (cluster_latents, clustering_accuracy, evaluate_clustering, hungarian_accuracy,
                      kmeans, pca_whiten)
from .lines import evaluate_lines, line_metrics
from .probe import probe_accuracy

__all__ = ["cluster_latents", "clustering_accuracy", "evaluate_clustering", "evaluate_lines",
           "hungarian_accuracy", "kmeans", "line_metrics", "pca_whiten", "probe_accuracy"]
