"""Pixel decoding into one float32 volume (CT in HU), and resampling of sheared grids.

Decoding goes through pydicom's pixel handlers, so every transfer syntax its plugins
decode works (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, deflate).
Each file is decoded once; the rescale (slope, intercept) is applied per frame while
copying into a preallocated array, which keeps peak memory near the output size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from scipy import ndimage

from diffugts.artifacts.geometry import Geometry
from diffugts.errors import InputError
from diffugts.stages.ingest.headers import Frame
from diffugts.stages.ingest.stacks import Stack
from diffugts.utils.progress import progress


def decode_stack(stack: Stack, show_progress: bool = True) -> np.ndarray:
    """The stack's slices as float32, rescaled, in volume order: shape (k, j, i)."""
    first = stack.frames[0].ds
    out = np.empty((len(stack.frames), int(first.Rows), int(first.Columns)), dtype=np.float32)
    cache_key, cache = None, None
    for k, f in enumerate(progress(stack.frames, desc="decode", unit="slice", enable=show_progress)):
        if f.frame is None:
            pixels = _decode(f)
        else:
            if cache is None or cache_key is not f.ds:  # multi-frame files: decode all frames once
                cache_key, cache = f.ds, _decode(f)
                if cache.ndim == 2:
                    cache = cache[None]
            pixels = cache[f.frame]
        if pixels.shape != out.shape[1:]:
            raise InputError(
                f.source.name, f"pixel data shape {pixels.shape} does not match {out.shape[1]}x{out.shape[2]} declared"
            )
        if f.slope == 1.0:
            np.add(pixels, f.intercept, out=out[k], casting="unsafe")
        else:
            np.multiply(pixels, f.slope, out=out[k], casting="unsafe")
            out[k] += f.intercept
    return out


def _decode(f: Frame) -> np.ndarray:
    """Stored values of a file (all frames): the rescale is the caller's job, and
    photometric / VOI transforms are display concerns."""
    ts = UID(getattr(getattr(f.ds, "file_meta", None), "TransferSyntaxUID", None) or ExplicitVRLittleEndian)
    try:
        native = not ts.is_compressed and ts != DeflatedExplicitVRLittleEndian
        if native and f.pixel_offset is not None and f.pixel_length is not None:
            return _decode_native(f, ts, f.pixel_offset, f.pixel_length)
        return f.ds.pixel_array
    except InputError:
        raise
    except Exception as err:  # decoders raise many types on corrupt data
        msg = " ".join(str(err).split())[:160] or type(err).__name__
        raise InputError(f.source.name, f"cannot decode pixel data ({ts.name}): {msg}") from None


def _decode_native(f: Frame, ts: UID, offset: int, length: int) -> np.ndarray:
    """Uncompressed data: read the bytes at the offset the header scan recorded and let
    pydicom's native decoder interpret them. ~6x faster than ``ds.pixel_array`` on a
    deferred element, which re-opens and re-parses the file."""
    with open(f.source.path, "rb") as fp:
        fp.seek(offset)
        buf = fp.read(length)
    ds = f.ds
    # A plain dict: pydicom's stub types each keyword argument as a whole DecodeOptions.
    options: dict[str, Any] = dict(
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        number_of_frames=int(ds.get("NumberOfFrames") or 1),
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1)),
        bits_allocated=int(ds.BitsAllocated),
        bits_stored=int(ds.get("BitsStored") or ds.BitsAllocated),
        pixel_representation=int(ds.get("PixelRepresentation", 0)),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        pixel_keyword="PixelData",
    )
    arr, _ = get_decoder(ts).as_array(buf, **options)
    return arr


def resample(volume: np.ndarray, src: Geometry, dst: Geometry) -> np.ndarray:
    """Trilinear resampling of ``volume`` (on grid ``src``) onto grid ``dst``.

    Voxels of ``dst`` outside the source volume get its minimum (air on CT).
    """
    # index_src = A @ index_dst + b, in (i, j, k); scipy wants (k, j, i).
    a = np.linalg.solve(src.matrix, dst.matrix)
    b = np.linalg.solve(src.matrix, dst.origin - src.origin)
    flip = np.eye(3)[::-1]
    out = ndimage.affine_transform(
        volume,
        flip @ a @ flip,
        offset=flip @ b,
        output_shape=dst.shape,
        order=1,
        mode="constant",
        cval=float(volume.min()),
        output=np.float32,
    )
    return out
