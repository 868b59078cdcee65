"""Training data: the generated lines (SPEC.md section 4) and the image datasets of the paper
(SPEC.md section 3), scaled to [-1, 1]."""
from .idx import load_idx_dataset
from .lines import angle_labels, draw_lines, lines_batches

__all__ = ["angle_labels", "draw_lines", "lines_batches", "load_idx_dataset"]
