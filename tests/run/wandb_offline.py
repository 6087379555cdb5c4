"""Read a W&B offline run file (``offline-run-*/run-*.wandb``) without the W&B service: the
records of the run, config, summary and history, as ``wandb sync`` would upload them."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768  # the LevelDB log format W&B writes: 32 KiB blocks of CRC + length + type + payload
HEADER = 7  # ":W&B" + magic + version


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, out, buf = HEADER, [], b""
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # FULL, FIRST
            buf = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            buf += chunk
        if kind in (1, 4) and buf:
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_dir: Path) -> dict[str, Any]:
    """``{"name", "group", "tags", "notes", "config" (top-level keys, decoded), "history" (key -> last
    value), "summary"}`` of one offline run folder."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    run: dict[str, Any] = {"config": {}, "history": {}, "summary": {}}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.update(name=r.run.display_name, group=r.run.run_group, tags=list(r.run.tags), notes=r.run.notes,
                       job_type=r.run.job_type)
            for item in r.run.config.update:
                run["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                run["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            for item in r.history.item:
                run["history"][_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in r.summary.update:
                run["summary"][_key(item)] = json.loads(item.value_json)
    return run
