"""The README's `fastdin.patch` examples run verbatim (each where its peer is installed)."""
import contextlib
import os
import re
import runpy

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
PEER_PACKAGES = {"DeepCTR-Torch": "deepctr_torch", "FuxiCTR": "fuxictr", "torch-rechub": "torch_rechub",
                 "RecBole": "recbole"}


def examples():
    with open(README) as f:
        text = f.read()
    section = text[text.index("## Patching an existing DIN"):]
    section = section[:section.index("### What each peer computes")]
    found = {}
    for part in re.split(r"^### ", section, flags=re.M)[1:]:
        title = part.split("\n", 1)[0]
        peer = next(name for name in PEER_PACKAGES if title.startswith(name))
        found[peer] = re.search(r"```python\n(.*?)```", part, flags=re.S).group(1)
    return found


def test_every_peer_has_an_example():
    assert set(examples()) == set(PEER_PACKAGES)


@pytest.mark.parametrize("peer", list(PEER_PACKAGES))
def test_example_runs(peer, tmp_path, monkeypatch):
    pytest.importorskip(PEER_PACKAGES[peer], reason=f"{peer} is not installed (tests/requirements-peers.txt)")
    monkeypatch.chdir(tmp_path)  # what a peer writes (logs, checkpoints) stays out of the repository
    script = tmp_path / "example.py"
    script.write_text(examples()[peer])
    with pytest.warns() if peer in ("torch-rechub", "RecBole") else contextlib.nullcontext():  # their own Dice is reported
        runpy.run_path(str(script))

