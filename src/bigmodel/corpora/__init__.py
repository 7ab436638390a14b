"""Built-in corpora, shipped compressed inside the package so that nothing is downloaded.

`shakespeare`: the complete works, one document per work (42 plays and poems, ~5.1 MB of ASCII text,
public domain, Project Gutenberg texts).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from importlib import resources

BUILTIN: dict[str, str] = {"shakespeare": "shakespeare.tar.xz"}


def iter_documents(name: str) -> Iterator[tuple[str, bytes]]:
    """Yield (document name, raw bytes) for each text file of a built-in corpus, in name order."""
    archive = resources.files(__name__).joinpath(BUILTIN[name])
    with archive.open("rb") as raw, tarfile.open(fileobj=raw, mode="r:xz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.endswith(".txt"):
                f = tar.extractfile(member)
                assert f is not None
                yield f"{name}/{member.name}", f.read()
