"""The build-once cache: an entry is built by the first process that asks, reused while intact,
and rebuilt when damaged, incomplete or of an older layout."""

from __future__ import annotations

from operators.io import cache


def test_caches_heal_themselves(tmp_path, caplog):
    """A folder left without its .complete mark (a dead builder), a file cut short after the build
    (an interrupted export), a dead builder's scratch folder: rebuilt, never an error forever."""
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "model.onnx").write_bytes(b"x" * 1000)
        (folder / "sub").mkdir()
        (folder / "sub" / "config.json").write_text("{}")

    dest = tmp_path / "engines" / "onnx-abc"
    dest.mkdir(parents=True)
    (dest / "model.onnx").write_bytes(b"half")  # an export that died before its mark
    (tmp_path / "engines" / "onnx-abc.partial").mkdir()  # and its builder's scratch
    cache.build_once(dest, build)
    assert len(calls) == 1 and (dest / "model.onnx").stat().st_size == 1000
    assert not (tmp_path / "engines" / "onnx-abc.partial").exists()
    cache.build_once(dest, build)
    assert len(calls) == 1  # intact: reused
    with open(dest / "model.onnx", "r+b") as f:  # cut short after the build
        f.truncate(10)
    caplog.set_level("WARNING")
    cache.build_once(dest, build)
    assert len(calls) == 2 and (dest / "model.onnx").stat().st_size == 1000 and "model.onnx is damaged" in caplog.text
    (dest / ".complete").write_text(str(dest))  # the layout before checksums: rebuilt once
    cache.build_once(dest, build)
    assert len(calls) == 3 and cache.cache_damage(dest) is None
