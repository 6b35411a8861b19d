"""One way for tests to write a small uncompressed DICOM file with pydicom, as a hospital export
might hold: one sample per pixel, unsigned 16-bit storage, explicit VR little endian."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int = 12, slope: float | None = None, intercept: float | None = None,
                window: tuple[float, float] | None = None, modality: str | None = "CR") -> Path:
    """Write `pixels` (2-D, stored values) to `path` and return `path`.

    `slope`/`intercept` set RescaleSlope/RescaleIntercept, `window` is (center, width); each is left
    out of the file when None. `modality` None leaves out the Modality tag.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be 2-D, got shape {pixels.shape}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
