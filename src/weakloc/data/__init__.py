"""Data: images, image-level labels, ground-truth annotations and synthetic data."""

from weakloc.data.annotations import GroundTruth, ImageAnnotation, read_annotations, read_coco, read_voc
from weakloc.data.dataset import ImageDataset, SkipLog, SkippedImage, collate_skip_bad, eval_transform, train_transform
from weakloc.data.images import get_max_pixels, read_image, set_max_pixels
from weakloc.data.labels import LabeledImages, load_labels, read_class_folders, read_labels_csv, split_train_val
from weakloc.text import display_path

__all__ = [
    "GroundTruth", "ImageAnnotation", "ImageDataset", "LabeledImages", "SkipLog", "SkippedImage", "collate_skip_bad",
    "display_path", "eval_transform", "get_max_pixels", "load_labels", "read_annotations", "read_class_folders", "read_coco",
    "read_image", "read_labels_csv", "read_voc", "set_max_pixels", "split_train_val", "train_transform",
]
