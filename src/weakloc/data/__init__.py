"""Data: images, image-level labels, ground-truth annotations and synthetic data."""

from weakloc.data.annotations import GroundTruth, ImageAnnotation, read_annotations, read_coco, read_voc
from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform, train_transform
from weakloc.data.images import read_image
from weakloc.data.labels import LabeledImages, load_labels, read_class_folders, read_labels_csv, split_train_val

__all__ = [
    "GroundTruth", "ImageAnnotation", "ImageDataset", "LabeledImages", "collate_skip_bad", "eval_transform",
    "load_labels", "read_annotations", "read_class_folders", "read_coco", "read_image", "read_labels_csv",
    "read_voc", "split_train_val", "train_transform",
]
