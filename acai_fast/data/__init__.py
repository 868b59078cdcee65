"""Training data: the generated lines (SPEC.md section 4), the image datasets of the paper (SPEC.md
section 3: MNIST, Fashion-MNIST, SVHN, CIFAR-10, CelebA) scaled to [-1, 1], your own images (a
folder or an .npy/.npz array, prepared as CelebA: acai_fast.data.images), and device-resident
training batches."""
from .batches import DeviceBatches, device_batches
from .celeba import resize_bicubic
from .common import to_unit_range
from .datasets import DATASETS, data_folder, dataset_of_preset, is_official, load_dataset, load_pixels
from .idx import load_idx_dataset
from .images import ImageSet, is_own_data, load_images
from .lines import angle_labels, draw_lines, lines_batches

__all__ = ["DATASETS", "DeviceBatches", "ImageSet", "angle_labels", "data_folder", "dataset_of_preset",
           "device_batches", "draw_lines", "is_official", "is_own_data", "lines_batches", "load_dataset",
           "load_idx_dataset", "load_images", "load_pixels", "resize_bicubic", "to_unit_range"]
