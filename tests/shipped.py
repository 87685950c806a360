"""dist/cxi taken apart: its sh launcher, the content id naming its unpack folder, the tools it
runs on the host, and the appended program (tar.gz), for the portability and launcher tests."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

PAGE = 4096


class Launched:
    """The parts of a launcher binary, read from its first bytes."""

    def __init__(self, binary: Path):
        self.binary = Path(binary)
        data = self.binary.read_bytes()
        head = data[:8192].decode("latin-1")
        offset = re.search(r"tail -c \+(\d+) ", head)
        content_id = re.search(r"^id=([0-9a-f]{16})$", head, re.M)
        tools = re.search(r'^tools="([^"]+)"$', head, re.M)
        assert data.startswith(b"#!/bin/sh\n") and offset and content_id and tools, \
            f"{binary} is not the cxi launcher"
        self.launcher = data[: int(offset.group(1)) - 1].decode()
        self.payload = data[int(offset.group(1)) - 1:]
        self.content_id = content_id.group(1)
        self.folder = f".cxi-{self.content_id}"
        self.tools = tools.group(1).split()

    def write_payload(self, path: Path) -> Path:
        path.write_bytes(self.payload)
        return path

    def unpacked_bytes(self, path: Path) -> int:
        """What one unpacked copy takes on a tmpfs: whole pages per file, one per folder."""
        total = 0
        with tarfile.open(self.write_payload(path)) as archive:
            for member in archive.getmembers():
                total += PAGE if member.isdir() else -(-member.size // PAGE) * PAGE
        return total
