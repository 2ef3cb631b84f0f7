"""Fingerprints of the inputs a dataset is prepared from (no TensorFlow).

`prepare` records one in the dataset's metadata.json (``inputs``) and compares it on a rerun, so
that a build of other inputs is never reused silently. A fingerprint holds:
* ``format``: the revision of the records this code writes (`FORMAT`), so that a build made by a
  version of `prepare` that wrote other records from the same files is not reused either;
* per split: the annotation file's SHA-256, and a SHA-256 over the image list (each image entry's
  ``file_name`` with its file's size in bytes and modification time in whole seconds, in the
  annotation file's order), with the number of image files and their total size.

Sizes and times rather than the images' contents: hashing COCO train2017's 118k images (18 GB)
would read them all again on every rerun; their sizes and times take one stat call each. A rerun
costs hashing and parsing the annotation files (COCO train2017's is 448 MB) and those stat calls.
An image edited in place to the same size within the same second goes unseen;
a folder copied without its times (``cp -r``; ``cp -a``, ``rsync -a`` and ``mv`` keep them) reads
as changed. Paths are recorded but not compared: a dataset folder moved elsewhere still matches.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

# Revision of the records the builder writes from given files (2: EXIF orientation applied).
FORMAT = 2


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def image_list(image_dir: str, images: list[dict[str, Any]]) -> dict[str, Any]:
  """num_image_files, image_bytes and image_list_sha256 of the image entries' files (a missing
  file counts as size and time -1; the build itself then names it)."""
  digest, total = hashlib.sha256(), 0
  for image in images:
    name = str(image.get('file_name') if isinstance(image, dict) else image)
    try:
      st = os.stat(os.path.join(image_dir, name))
      size, mtime = st.st_size, int(st.st_mtime)
    except OSError:
      size, mtime = -1, -1
    total += max(size, 0)
    digest.update(f'{name}\t{size}\t{mtime}\n'.encode('utf-8', 'surrogateescape'))
  return {'num_image_files': len(images), 'image_bytes': total,
          'image_list_sha256': digest.hexdigest()}


def split_inputs(ann_path: str, image_dir: str, images: list[dict[str, Any]] | None,
                 ann_sha256: str | None = None) -> dict[str, Any]:
  """One split's entry of a fingerprint; images None leaves the image list out."""
  entry = {'annotations': os.path.abspath(ann_path), 'images': os.path.abspath(image_dir),
           'annotations_sha256': ann_sha256 or file_sha256(ann_path)}
  if images is not None:
    entry.update(image_list(image_dir, images))
  return entry


def inputs(splits: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The fingerprint recorded in the metadata: splits = {split: `split_inputs(...)`}."""
  return {'format': FORMAT, 'splits': splits}


def current_inputs(split_paths: dict[str, tuple[str, str]], recorded: dict[str, Any],
                   load_images) -> dict[str, Any]:
  """The fingerprint of split_paths ({split: (annotation file, image folder)}) now.

  The image list of a split is read (``load_images(annotation file)`` -> the image entries) only
  when its annotation file still matches `recorded`: otherwise that difference already decides.
  """
  splits = {}
  for split, (ann_path, image_dir) in split_paths.items():
    if not os.path.isfile(ann_path):
      splits[split] = {'annotations': os.path.abspath(ann_path), 'annotations_sha256': None}
      continue
    sha = file_sha256(ann_path)
    same = recorded.get('splits', {}).get(split, {}).get('annotations_sha256') == sha
    splits[split] = split_inputs(ann_path, image_dir, load_images(ann_path) if same else None,
                                 sha)
  return inputs(splits)


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """What differs between two fingerprints, one short phrase each ([] when they match)."""
  out = []
  if recorded.get('format') != current['format']:
    out.append(f'records format {recorded.get("format")} -> {current["format"]} '
               '(made by another version of prepare)')
  old, new = recorded.get('splits', {}), current['splits']
  if sorted(old) != sorted(new):
    out.append(f'splits {sorted(old)} -> {sorted(new)}')
  for split in sorted(set(old) & set(new)):
    a, b = old[split], new[split]
    if b['annotations_sha256'] is None:
      out.append(f'{split}: annotation file {b["annotations"]} not found')
    elif a.get('annotations_sha256') != b['annotations_sha256']:
      out.append(f'{split}: annotation file {b["annotations"]} differs (sha256 '
                 f'{str(a.get("annotations_sha256"))[:12]} -> {b["annotations_sha256"][:12]})')
    elif a.get('image_list_sha256') != b.get('image_list_sha256'):
      out.append(f'{split}: image files in {b["images"]} differ in names, sizes or '
                 f'modification times ({a.get("num_image_files")} files of '
                 f'{a.get("image_bytes")} bytes -> {b.get("num_image_files")} files of '
                 f'{b.get("image_bytes")} bytes)')
  return out
