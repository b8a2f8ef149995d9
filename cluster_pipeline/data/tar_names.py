"""The name field of a sample's own tar header, matched against the member it should name.

The reader checks it before decoding each sample (bytes at a stale offset belong to another
sample), and `index` refuses a sample whose header the reader could not match: both use the
one rule here.
"""

from __future__ import annotations

TAR_HEADER = 512
# The ustar name field: a longer name is cut here, the directory part may sit in the prefix.
NAME_FIELD = 100


def header_name(header: bytes) -> bytes:
    """The name field of a tar header (its first NAME_FIELD bytes), up to the first NUL."""
    return header[:NAME_FIELD].split(b"\0", 1)[0]


def names_member(header: bytes, sample_id: int, expected: str | None) -> bool:
    """Whether a tar header's name field is that of the sample's image member. The field holds
    100 bytes: a longer name is cut there and a non-ASCII one may be written as '?'s (pax and
    GNU headers keep the whole name in a record of their own), and a ustar header keeps the
    directory part in its prefix field. `expected` None: make-shards' `%09d` key of the id."""
    if expected is None:
        return header.partition(b".")[0] == b"%09d" % sample_id
    if not header:
        return False
    forms = (expected.encode("utf-8", "surrogateescape"), expected.encode("ascii", "replace"))
    return any(form.startswith(header) or form.endswith(header) for form in forms)
