#!/usr/bin/env python3
"""Build a small REAL binary segmentation set (nucleus vs background) from the fluorescence-nuclei image that the
`stardist` wheel ships (stardist/data/images/img2d.tif + mask2d.tif: a 512x512 image from the 2018 Kaggle Data
Science Bowl, Caicedo et al., Nature Methods 16 (2019), with an instance-label mask of 125 nuclei). For benchmarks
and docs (docs/benchmarks.md), not for tests or CI: it reads a wheel or folder that is already here and downloads
nothing.

    python3 scripts/real_small_data.py /path/to/stardist-0.9.2-*.whl OUT
    python3 scripts/real_small_data.py /path/to/unzipped/wheel/ OUT   # the folder that holds stardist/data/...

The image is cut into three regions that share no pixel, so no tile of one split overlaps a tile of another:
train = rows 0-319 (all columns), val = rows 320-511 x columns 0-255, test = rows 320-511 x columns 256-511.
Each region is tiled in 128x128 tiles with stride 64 (tiles overlap inside their own split only): 28 train tiles,
6 val, 6 test. Images are 8-bit gray PNGs (the file's values are 0..235 and are kept as they are); masks are PNGs
with 255 = nucleus (any instance label > 0), 0 = background. The layout is raysegtrain's `folders` layout:
OUT/images/{train,val,test}/*.png and OUT/masks/{train,val,test}/*.png.

(The wheel's 3-D stack, img3d.tif / mask3d.tif, is not used: stardist documents it as *synthetic* nuclei, and its
planes are only 61x57 pixels.)
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

IMAGE = "stardist/data/images/img2d.tif"
MASK = "stardist/data/images/mask2d.tif"
TILE, STRIDE = 128, 64
# (split, row0, row1, col0, col1): disjoint regions of the 512x512 image
REGIONS = (("train", 0, 320, 0, 512), ("val", 320, 512, 0, 256), ("test", 320, 512, 256, 512))


def read_tiffs(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D image and its label mask, from the wheel (a zip) or from the folder it was unzipped into."""
    import tifffile

    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            names = set(z.namelist())
            missing = [n for n in (IMAGE, MASK) if n not in names]
            if missing:
                sys.exit(f"error: {source} has no {missing[0]} (is it the stardist wheel?)")
            return (tifffile.imread(io.BytesIO(z.read(IMAGE))), tifffile.imread(io.BytesIO(z.read(MASK))))
    if source.is_dir():
        for base in (source, source / ".."):  # the unzipped wheel, or its stardist/ folder
            if (base / IMAGE).is_file() and (base / MASK).is_file():
                return tifffile.imread(base / IMAGE), tifffile.imread(base / MASK)
        sys.exit(f"error: {source} holds no {IMAGE} and {MASK} (give the stardist wheel or the folder it was "
                 f"unzipped into)")
    sys.exit(f"error: {source} is missing (give the stardist wheel, e.g. stardist-0.9.2-cp311-*.whl, or the folder "
             f"it was unzipped into)")


def tiles(r0: int, r1: int, c0: int, c1: int):
    for r in range(r0, r1 - TILE + 1, STRIDE):
        for c in range(c0, c1 - TILE + 1, STRIDE):
            yield r, c


def build(source: Path, out: Path) -> dict[str, int]:
    from PIL import Image

    image, labels = read_tiffs(source)
    if image.shape != (512, 512) or labels.shape != image.shape:
        sys.exit(f"error: expected a 512x512 image and mask, got {image.shape} and {labels.shape}")
    if image.max() > 255:
        sys.exit(f"error: image values reach {image.max()}; this script expects the 8-bit range of stardist 0.9's "
                 f"img2d.tif")
    image8 = image.astype(np.uint8)
    mask8 = np.where(labels > 0, 255, 0).astype(np.uint8)
    counts = {}
    for split, r0, r1, c0, c1 in REGIONS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "masks" / split).mkdir(parents=True, exist_ok=True)
        n = 0
        for r, c in tiles(r0, r1, c0, c1):
            stem = f"nuclei_r{r:03d}_c{c:03d}"
            Image.fromarray(image8[r:r + TILE, c:c + TILE]).save(out / "images" / split / f"{stem}.png")
            Image.fromarray(mask8[r:r + TILE, c:c + TILE]).save(out / "masks" / split / f"{stem}.png")
            n += 1
        region = labels[r0:r1, c0:c1]
        counts[split] = n
        print(f"{split}: {n} tiles from rows {r0}-{r1 - 1}, columns {c0}-{c1 - 1}; "
              f"{len(np.unique(region[region > 0]))} nuclei (whole or cut), "
              f"{(region > 0).mean():.1%} foreground")
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="the stardist wheel (.whl) or the folder it was unzipped into")
    p.add_argument("out", type=Path, help="dataset folder to write (raysegtrain's folders layout)")
    args = p.parse_args(argv)
    build(args.source, args.out)
    print(f"wrote {args.out} (use it as data.root={args.out})")


if __name__ == "__main__":
    main()
