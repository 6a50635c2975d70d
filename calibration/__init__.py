"""Calibration data: dataset readers, preprocessing and range estimators. Needs only numpy and Pillow."""

from edgeres.calibration.errors import DataError
from edgeres.calibration.preprocess import Preprocess
from edgeres.calibration.readers import ImageDataset, open_dataset

__all__ = ["DataError", "ImageDataset", "Preprocess", "open_dataset"]
