"""Evaluations of a trained model, read through the trainer's public encode/decode/interpolate:
the lines metrics (Mean Distance, Smoothness) and the linear probe's accuracy."""
from .lines import evaluate_lines, line_metrics
from .probe import probe_accuracy

__all__ = ["evaluate_lines", "line_metrics", "probe_accuracy"]
