"""OME-NGFF (0.4) label images inside an image's OME-Zarr group: ``IMAGE/labels/NAME``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._errors import DeepAlignError
from ..outputs import write_atomic

__all__ = ["image_shape", "label_group_files", "label_target", "list_label", "mark_label",
           "prepare_label_group"]


def _attrs(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=1), doing="cannot write the label metadata")


def label_target(output: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """``(image_group, name)`` when ``output`` is ``IMAGE/labels/NAME`` inside an OME-Zarr
    image group (NGFF 0.4, Zarr v2), else None."""
    out = Path(output)
    if out.parent.name != "labels":
        return None
    image = out.parent.parent
    if "multiscales" not in _attrs(image):
        if image.suffix.lower() == ".zarr":
            what = "does not exist" if not os.path.lexists(image) else \
                "is not an OME-Zarr image (align -o NAME.ome.zarr writes one)"
            raise DeepAlignError(f"{out}: a label image goes inside the OME-Zarr image it "
                                 f"labels, but {image} {what}; align into it first, or write "
                                 "the labels elsewhere")
        return None
    if out.suffix.lower() in (".tif", ".tiff", ".btf"):
        raise DeepAlignError(f"{out}: a label image inside the OME-Zarr image {image} is a "
                             f"Zarr group, not a TIFF; name it without the suffix "
                             f"({out.with_suffix('')}) or write the TIFF elsewhere")
    return image, out.name


def image_shape(image: Path) -> tuple[int, ...] | None:
    """The shape of the full-resolution level of the OME-Zarr image group ``image`` (its first
    multiscales dataset), or None where the metadata does not say."""
    try:
        path = _attrs(image)["multiscales"][0]["datasets"][0]["path"]
        meta = json.loads((image / str(path) / ".zarray").read_text(encoding="utf-8"))
        return tuple(int(v) for v in meta["shape"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def prepare_label_group(image: Path) -> None:
    """Create ``IMAGE/labels`` as a Zarr group if it is not there yet."""
    labels = image / "labels"
    try:
        labels.mkdir(exist_ok=True)
        if not (labels / ".zgroup").exists():
            _write_json(labels / ".zgroup", {"zarr_format": 2})
        if not (labels / ".zattrs").exists():
            _write_json(labels / ".zattrs", {"labels": []})
    except OSError as exc:
        raise DeepAlignError(f"{labels}: cannot create the labels group: {exc}") from exc


def mark_label(store: Path) -> None:
    """Mark the label store ``store`` as an image-label of the image two levels up (its
    ``.zattrs``, updated atomically): called on the unfinished store, so the label image is
    put in place with its mark."""
    attrs = _attrs(store)
    attrs["image-label"] = {"version": "0.4", "source": {"image": "../../"}}
    _write_json(store / ".zattrs", attrs)


def list_label(image: Path, name: str) -> None:
    """List ``NAME`` in ``IMAGE/labels`` (updated atomically) once its label image is in
    place."""
    group = _attrs(image / "labels")
    names = [n for n in group.get("labels", []) if isinstance(n, str)]
    if name not in names:
        names.append(name)
    group["labels"] = names
    _write_json(image / "labels" / ".zattrs", group)


def label_group_files(image: Path) -> list[Path]:
    """The metadata files of ``IMAGE/labels`` this tool writes (atomically: a killed run's
    temporary files are theirs, see :func:`~deepalign_fast.outputs.remove_stale_temps`)."""
    return [image / "labels" / ".zgroup", image / "labels" / ".zattrs"]
