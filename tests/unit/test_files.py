"""Atomic writes and the temporaries they leave when a process dies: named by machine and process, so that a
later writer removes those of dead processes of its own machine, and only those."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_models import files

REPO = Path(__file__).resolve().parents[2]


def dead_process_temporaries(folder: Path, names: list[str]) -> list[Path]:
    """Temporaries of `names` in `folder` that a process made, as `atomic_target` names them, and then died."""
    script = ("import sys\nfrom sae_models import files\n"
              "for name in sys.argv[2:]:\n"
              "    p = files.temporary_name(sys.argv[1] + '/' + name)\n"
              "    p.write_bytes(b'partial')\n    print(p)\n")
    out = subprocess.run([sys.executable, "-c", script, str(folder), *names], cwd=REPO, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    return [Path(line) for line in out.split()]


def test_a_temporary_names_its_machine_and_process(tmp_path):
    tmp = files.temporary_name(tmp_path / "shard.safetensors")
    assert tmp.parent == tmp_path and tmp.name.startswith(".shard.safetensors.") and tmp.name.endswith(".tmp")
    host, pid, rand = tmp.name[len(".shard.safetensors."):-len(".tmp")].split("-")
    assert len(host) == 8 and int(pid) == os.getpid() and len(rand) == 8
    assert files.temporary_name(tmp_path / "x") != files.temporary_name(tmp_path / "x")


@pytest.mark.skipif(os.name != "posix", reason="a process's life is asked with kill(pid, 0)")
def test_only_temporaries_of_dead_processes_of_this_machine_are_removed(tmp_path):
    dead = dead_process_temporaries(tmp_path, ["a.safetensors", "manifest.json"])
    live = files.temporary_name(tmp_path / "b.safetensors")  # this process's: alive
    live.write_bytes(b"writing")
    host, rest = dead[0].name.rsplit(".", 2)[1].split("-", 1)
    other_host = tmp_path / f".c.png.{'0' * 8 if host != '0' * 8 else '1' * 8}-{rest}.tmp"  # a shared disk
    other_host.write_bytes(b"")
    kept = [tmp_path / "notes.tmp", tmp_path / ".d.json.1234abcd.tmp", tmp_path / "e.safetensors"]
    for p in kept:
        p.write_bytes(b"")
    assert sorted(files.remove_stale_temporaries(tmp_path)) == sorted(dead)
    assert sorted(tmp_path.iterdir()) == sorted([live, other_host, *kept])
    assert files.remove_stale_temporaries(tmp_path / "absent") == []


def test_an_interrupted_atomic_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with files.atomic_target(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
