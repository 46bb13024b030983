"""Small DomainBed-shaped image trees for tests, benchmarks and demos (random but seeded images)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from linft.data.datasets import FOLDER_DATASETS


def make_image_tree(root: str | Path, dataset: str = "PACS", classes=("dog", "horse", "person"),
                    n_per_class: int = 3, size: int = 32, fmt: str = "png", seed: int = 0) -> Path:
    """Write ``<root>/<subdir>/<domain folder>/<class>/<i>.<fmt>`` for every domain of ``dataset``.

    Images are RGB ``size`` x ``size``: a class-dependent colour blob plus noise, so that a model
    can learn something. Returns the dataset folder (``<root>/<subdir>``).
    """
    spec = FOLDER_DATASETS[dataset]
    rng = np.random.default_rng(seed)
    base = Path(root) / spec.subdir
    yy, xx = np.mgrid[0:size, 0:size] / size
    for d, folder in enumerate(spec.folders):
        for c, cls in enumerate(classes):
            out = base / folder / cls
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                cx, cy = (c + 1) / (len(classes) + 1), rng.uniform(0.3, 0.7)
                blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)
                colour = np.array([(c * 97 + d * 31) % 256, (c * 53) % 256, (d * 71) % 256]) / 255.0
                img = 0.6 * blob[..., None] * (0.3 + colour) + 0.2 * rng.random((size, size, 3))
                Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(out / f"{i:04d}.{fmt}")
    return base
