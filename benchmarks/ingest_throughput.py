"""Ingestion throughput against plain ``pydicom.dcmread`` + ``numpy.stack``, same files, same run.

    python benchmarks/ingest_throughput.py                  # synthetic 512x512x300 CT
    python benchmarks/ingest_throughput.py --series DIR     # any series of your own

Prints the median of several alternating runs for:
  baseline   dcmread every file, ds.pixel_array, np.stack (no sorting, no checks, no output)
  load       diffugts: scan, group, select, validate geometry, decode to float32 HU (in memory)
  ingest     load + write the study artifact (volume.nii, header copies, series.json)
and the ratios load/baseline and ingest/baseline. Files are read once first so that every
variant sees a warm page cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from diffugts.stages.ingest import ingest, load_series


def synthetic_ct(folder: Path, slices: int, size: int) -> list[Path]:
    """An uncompressed CT series (random file names, so order comes from positions)."""
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = rng.normal(1000, 60, (size, size)).clip(0, 4095).astype(np.uint16).tobytes()
    files = []
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "BENCH^CT", "BENCH", 1, k + 1
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-180.0, -180.0, -1.0 * k]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = pixels
        path = folder / f"{rng.integers(1 << 40):012x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def baseline(files: list[Path]) -> np.ndarray:
    return np.stack([pydicom.dcmread(f).pixel_array for f in files])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, help="folder with one DICOM series (default: synthetic CT)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp = Path(tmp)
        if args.series:
            folder = args.series
            files = sorted(p for p in folder.rglob("*") if p.is_file())
        else:
            folder = tmp / "series"
            folder.mkdir()
            t = time.perf_counter()
            files = synthetic_ct(folder, args.slices, args.size)
            print(f"wrote synthetic CT {args.size}x{args.size}x{args.slices} in {time.perf_counter() - t:.1f} s")
        nbytes = sum(f.stat().st_size for f in files)
        baseline(files)  # warm the page cache for everyone

        runs: dict[str, list[float]] = {"baseline": [], "load": [], "ingest": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            baseline(files)
            runs["baseline"].append(time.perf_counter() - t)
            t = time.perf_counter()
            load_series(folder, show_progress=False)
            runs["load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ingest(folder, tmp / "out", show_progress=False)
            runs["ingest"].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"{len(files)} files, {nbytes / 2**20:.0f} MiB, median of {args.repeats} alternating runs")
    for name, sec in med.items():
        print(f"  {name:9s} {sec:6.2f} s  {len(files) / sec:7.0f} slices/s  {nbytes / 2**20 / sec:6.0f} MiB/s")
    for name in ("load", "ingest"):
        ratio = med[name] / med["baseline"]
        print(f"  {name:6s} / baseline = {ratio:.2f}  (overhead {100 * (ratio - 1):+.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
