"""Build the Fashion-MNIST subset that ships with the app (``simulations/app/embedded_data``).

The subset is what ``flwr run .`` trains on when no full copy of Fashion-MNIST can be
found (see :mod:`simulations.app.datasets`): the first ``--train-per-class`` training
images and the first ``--test-per-class`` test images of every class, in their
original order, read from the official IDX files (for example the Debian package
``dataset-fashion-mnist``: ``apt-get install dataset-fashion-mnist``)::

    python -m simulations.app.build_embedded_data --source /usr/share/datasets/fashion-mnist

Flower bundles only some file types into a FAB (``.py``, ``.toml``, ``.md``,
``.json``, ...; see ``FAB_INCLUDE_PATTERNS`` in ``flwr.common.constant``) and
``flwr app publish`` refuses files over 1 MB, so the pixels are stored as an
xz-compressed byte string, Base85-encoded (``base64.b85encode``, whose alphabet needs
no escaping in JSON) and cut into JSON shards of at most :data:`SHARD_CHARS`
characters, with a ``manifest.json`` that records shapes, class counts and SHA-256
digests. The same input always gives byte-identical output.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import lzma
from pathlib import Path

import numpy as np

from .datasets import EMBEDDED_DATA_DIR, EMBEDDED_FORMAT, read_idx_folder

SHARD_CHARS = 900_000
"""Characters of Base85 per shard file (below ``flwr app publish``'s 1 MB per file)."""

LICENSE_TEXT = """\
# Fashion-MNIST subset: licence and attribution

The files `manifest.json` and `part-*.json` in this folder hold a subset of
**Fashion-MNIST** (Han Xiao, Kashif Rasul and Roland Vollgraf, *Fashion-MNIST: a Novel
Image Dataset for Benchmarking Machine Learning Algorithms*, arXiv:1708.07747, 2017;
<https://github.com/zalandoresearch/fashion-mnist>): the first {train_per_class} training
and the first {test_per_class} test images of each of the 10 classes, pixels and labels
unchanged, re-encoded by `simulations/app/build_embedded_data.py`.

Fashion-MNIST is distributed under the MIT licence:

The MIT License (MIT)

Copyright © 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify,
merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
permit persons to whom the Software is furnished to do so, subject to the following
conditions:

The above copyright notice and this permission notice shall be included in all copies
or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A
PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT
HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` examples of every class, in original order."""
    chosen = []
    for label in np.unique(labels):
        positions = np.flatnonzero(labels == label)
        if len(positions) < per_class:
            raise ValueError(f"class {label} has only {len(positions)} examples, {per_class} wanted")
        chosen.append(positions[:per_class])
    return np.sort(np.concatenate(chosen))


def build(source: Path, out_dir: Path, train_per_class: int, test_per_class: int) -> dict:
    """Write the subset's manifest, shards and licence to ``out_dir``; return the manifest."""
    arrays: list[tuple[str, np.ndarray]] = []
    splits = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        all_images, all_labels = read_idx_folder(source, split)
        keep = first_per_class(all_labels, per_class)
        images, labels = np.ascontiguousarray(all_images[keep]), np.ascontiguousarray(all_labels[keep])
        arrays += [(f"{split}-images", images), (f"{split}-labels", labels)]
        splits[split] = {"count": len(labels), "of": len(all_labels),
                         "class-counts": np.bincount(labels, minlength=10).tolist()}
    payload = b"".join(array.tobytes() for _, array in arrays)
    encoded = base64.b85encode(lzma.compress(payload, format=lzma.FORMAT_XZ,
                                             preset=9 | lzma.PRESET_EXTREME)).decode("ascii")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("part-*.json"):
        stale.unlink()
    shards = []
    for number, start in enumerate(range(0, len(encoded), SHARD_CHARS)):
        name = f"part-{number:02d}.json"
        (out_dir / name).write_text(json.dumps({"base85": encoded[start:start + SHARD_CHARS]}) + "\n")
        shards.append(name)
    manifest = {
        "format": EMBEDDED_FORMAT,
        "dataset": "fashion-mnist",
        "source": "https://github.com/zalandoresearch/fashion-mnist (official IDX files)",
        "license": "MIT, Copyright (c) 2017 Zalando SE; see LICENSE.md",
        "selection": f"first {train_per_class} train and {test_per_class} test images of each class, original order",
        "splits": splits,
        "arrays": [{"name": name, "dtype": "uint8", "shape": list(array.shape),
                    "sha256": hashlib.sha256(array.tobytes()).hexdigest()} for name, array in arrays],
        "encoding": "xz, then base85 (base64.b85encode), cut into the shards in order",
        "shards": shards,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out_dir / "LICENSE.md").write_text(
        LICENSE_TEXT.format(train_per_class=train_per_class, test_per_class=test_per_class))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="folder with Fashion-MNIST's four IDX files (default: the Debian package's)")
    parser.add_argument("--out", type=Path, default=EMBEDDED_DATA_DIR / "fashion-mnist",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=1200)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args(argv)
    manifest = build(args.source, args.out, args.train_per_class, args.test_per_class)
    size = sum((args.out / name).stat().st_size for name in manifest["shards"])
    print(f"wrote {len(manifest['shards'])} shards ({size / 1e6:.2f} MB) and the manifest to {args.out}")


if __name__ == "__main__":
    main()
