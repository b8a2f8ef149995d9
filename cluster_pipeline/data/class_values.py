"""A sample's class in users' own shards (`cluster-pipeline index --class-from`): where it comes
from, how a .cls or .json member's value is read, and the labels and class names of the index.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from cluster_pipeline.config import ConfigError
from cluster_pipeline.data.reader import ShardError

CLASS_FROM = ("auto", "cls", "json:FIELD", "key-prefix", "none")
INT_RE = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class ClassSource:
    """Where a sample's class comes from (`--class-from`)."""

    kind: str  # auto, cls, json, key-prefix or none
    field: str = ""  # the .json field, for kind json

    @classmethod
    def parse(cls, spec: str) -> ClassSource:
        if spec in ("auto", "cls", "key-prefix", "none"):
            return cls(spec)
        if spec.startswith("json:") and spec[5:]:
            return cls("json", spec[5:])
        raise ConfigError(
            f"--class-from {spec!r}: use auto (the .cls member when there is one), cls, "
            "json:FIELD (e.g. json:label), key-prefix (n01440764 of n01440764_10026) or none"
        )

    def describe(self) -> str:
        return {
            "auto": "classes from .cls members",
            "cls": "classes from .cls members",
            "json": f"classes from the .json field {self.field!r}",
            "key-prefix": "classes from the key prefix before '_'",
            "none": "no classes",
        }[self.kind]


def cls_value(data: bytes, where: str) -> int | str:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ShardError(f"{where}: a .cls member must be text, an integer or a name") from None
    if INT_RE.fullmatch(text):
        return _class_id(int(text), where)
    if not text:
        raise ShardError(f"{where} is empty: a .cls member holds an integer class or a name")
    return text


def json_value(data: bytes, name: str, where: str) -> int | str | None:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ShardError(f"{where} is not JSON ({exc})") from None
    if not isinstance(obj, dict) or name not in obj:
        fields = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, dict) else "not an object"
        raise ShardError(f"{where} has no field {name!r} ({fields})")
    value = obj[name]
    if value is None:
        return None  # null: class unknown
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ShardError(f"{where}: {name}={value!r} is not a class (an integer >= 0 or a name)")
    return _class_id(value, where) if isinstance(value, int) else value


def _class_id(value: int, where: str) -> int:
    if value < 0:
        raise ShardError(
            f"{where}: class {value} is negative; classes are integers >= 0 or names "
            "(--class-from none indexes the shards without classes)"
        )
    return value


def labels_of(
    values: list[int | str | None], first_of_type: dict[type, str]
) -> tuple[np.ndarray, list[str]]:
    """(label per sample, -1 unknown; class names): integers as they are, names sorted."""
    if int in first_of_type and str in first_of_type:
        raise ShardError(
            f"class values are mixed: {first_of_type[int]} gives an integer, "
            f"{first_of_type[str]} a name; make them all one kind"
        )
    if str in first_of_type:
        classes = sorted({v for v in values if isinstance(v, str)})
        position = {c: i for i, c in enumerate(classes)}
        labels = [-1 if v is None else position[str(v)] for v in values]
        return np.asarray(labels, dtype=np.int64), classes
    ints = [-1 if v is None else int(v) for v in values]
    top = max(ints, default=-1)
    return np.asarray(ints, dtype=np.int64), [str(c) for c in range(top + 1)]
