"""Tiny image-caption datasets on disk, in the three forms the pretraining data reads.

Image ``i`` has a left half of colour ``image_colors(i)[0]`` and a right half of
``image_colors(i)[1]`` (so pixel means identify images and a horizontal flip shows), key
``item_key(i)`` and captions ``caption(i, j)``. Images are JPEG (quality 95); ``corrupt``
indices get bytes that are no image, ``missing`` (jsonl form) get no file at all.
"""
import base64
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

CORRUPT_BYTES = b"this is not an image"
_NOUNS = ("cat", "dog", "car", "person", "pizza", "bus", "horse", "umbrella")


def item_key(i):
    return f"{i:06d}"


def caption(i, j=0):
    return f"a photo of a {_NOUNS[i % len(_NOUNS)]} number {i} view {j}"


def image_colors(i):
    left = ((37 * i + 40) % 256, (91 * i + 80) % 256, (53 * i + 120) % 256)
    return left, tuple((c + 128) % 256 for c in left)


def make_image(i, image_size):
    """uint8 [h, w, 3] RGB of image ``i``."""
    height, width = image_size
    array = np.empty((height, width, 3), dtype=np.uint8)
    left, right = image_colors(i)
    array[:, : width // 2] = left
    array[:, width // 2:] = right
    return array


def expected_mean(i, image_size):
    """Per-channel mean of image ``i`` in [0, 1]."""
    return make_image(i, image_size).reshape(-1, 3).mean(axis=0) / 255.0


def encode_jpeg(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _image_bytes(i, image_size, corrupt):
    return CORRUPT_BYTES if i in corrupt else encode_jpeg(make_image(i, image_size))


def write_tsv_dataset(root, num_images=4, captions_per_image=2, image_size=(48, 64),
                      corrupt=(), lineidx=True, prefix="train"):
    """``{prefix}.images.tsv`` + ``{prefix}.text.tsv`` (JSON captions) in ``root``; returns it.

    ``lineidx`` False leaves the ``.lineidx`` files for the reader to generate.
    """
    os.makedirs(root, exist_ok=True)
    image_rows, text_rows = [], []
    for i in range(num_images):
        encoded = base64.b64encode(_image_bytes(i, image_size, corrupt)).decode("ascii")
        image_rows.append(f"{item_key(i)}\t{encoded}\n")
        captions = [caption(i, j) for j in range(captions_per_image)]
        text_rows.append(f"{item_key(i)}\t{json.dumps({'captions': captions})}\n")
    for kind, rows in (("images", image_rows), ("text", text_rows)):
        path = os.path.join(root, f"{prefix}.{kind}.tsv")
        with open(path, "w") as f:
            f.writelines(rows)
        if lineidx:
            _write_lineidx(path, rows)
    return str(root)


def _write_lineidx(tsv_path, rows):
    offsets = np.cumsum([0] + [len(row.encode()) for row in rows[:-1]])
    with open(os.path.splitext(tsv_path)[0] + ".lineidx", "w") as f:
        f.writelines(f"{offset}\n" for offset in offsets)


def _add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(root, num_images=4, image_size=(48, 64), num_shards=1, corrupt=()):
    """img2dataset layout in ``root``: ``00000.tar``... each with ``{key}.jpg``, ``{key}.txt``
    (``caption(i, 0)``) and ``{key}.json`` (same caption), plus ``{shard}_stats.json``.
    Images are spread over the shards in contiguous runs. Returns ``root``."""
    os.makedirs(root, exist_ok=True)
    for shard, indices in enumerate(np.array_split(np.arange(num_images), num_shards)):
        with tarfile.open(os.path.join(root, f"{shard:05d}.tar"), "w") as tar:
            for i in indices.tolist():
                key = item_key(i)
                meta = {"key": key, "caption": caption(i, 0), "status": "success",
                        "url": f"http://example.com/{key}.jpg", "height": image_size[0],
                        "width": image_size[1]}
                _add_member(tar, f"{key}.jpg", _image_bytes(i, image_size, corrupt))
                _add_member(tar, f"{key}.txt", caption(i, 0).encode())
                _add_member(tar, f"{key}.json", json.dumps(meta).encode())
        with open(os.path.join(root, f"{shard:05d}_stats.json"), "w") as f:
            json.dump({"count": len(indices), "successes": len(indices)}, f)
    return str(root)


def write_jsonl_dataset(root, num_images=4, captions_per_image=2, image_size=(48, 64),
                        corrupt=(), missing=()):
    """``images/{key}.jpg`` and ``captions.jsonl`` in ``root`` (a ``"caption"`` string when
    ``captions_per_image`` is 1, else a ``"captions"`` list). Returns ``root``."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
        for i in range(num_images):
            file_name = f"images/{item_key(i)}.jpg"
            if i not in missing:
                with open(os.path.join(root, file_name), "wb") as image_file:
                    image_file.write(_image_bytes(i, image_size, corrupt))
            captions = [caption(i, j) for j in range(captions_per_image)]
            entry = {"file_name": file_name}
            if captions_per_image == 1:
                entry["caption"] = captions[0]
            else:
                entry["captions"] = captions
            f.write(json.dumps(entry) + "\n")
    return str(root)
