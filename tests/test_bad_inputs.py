"""A corpus of bad inputs, generated in a tmp folder: each is a clear one-line error or a
counted skip with its reason, never a hang, a huge allocation or a traceback."""

from __future__ import annotations

import io
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsig.data.collection import load_collection
from medsig.data.images import image_problem, load_image
from medsig.data.inspect import inspect_collection, label_conflicts
from medsig.data.reader import read_batches
from medsig.data.table import read_table
from medsig.data.transforms import Preprocess, pad_to_square
from medsig.errors import ConfigError, DataError, ImageError

SPEC = """
name: bad
table: {table}
image_root: img
{extra}
columns:
  image: file
  id: image_id
  group: patient
labels:
  - name: urgency
    type: multiclass
    column: urgency
    classes: [Green, Yellow, Red]
"""


def _png(size: tuple[int, int], colour=(120, 40, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _spec(tmp: Path, rows: list[str], extra: str = "", table: str = "t.csv") -> Path:
    (tmp / "img").mkdir(exist_ok=True)
    (tmp / table).write_text("image_id,file,patient,urgency\n" + "\n".join(rows) + "\n")
    path = tmp / "spec.yaml"
    path.write_text(SPEC.format(table=table, extra=extra))
    return path


def _finishes(fn, seconds: float = 20.0):
    """Run fn in a daemon thread: (finished, result or exception)."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return (not t.is_alive()), (out[0] if out else None)


# -- 1. elongated images ------------------------------------------------------------------------
def _old_pad_resize(image: Image.Image, size: int) -> torch.Tensor:
    """The recipe before the fix: pad to the long side, then resize."""
    image = pad_to_square(image).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy())


@pytest.mark.parametrize("shape", [(1, 50_000), (50_000, 1), (3, 20_000)])
def test_elongated_image_never_builds_a_huge_canvas(shape, monkeypatch):
    image = load_image(_png(shape))  # 164 bytes of PNG, a 1 x 50,000 strip
    real_new = Image.new
    sizes: list[tuple[int, int]] = []

    def guarded(mode, size, *a, **k):
        sizes.append(tuple(size))
        assert size[0] * size[1] <= 4 * 448 * 448, f"canvas {size} allocated"
        return real_new(mode, size, *a, **k)

    monkeypatch.setattr(Image, "new", guarded)
    x = Preprocess(64)(image)
    assert x.shape == (3, 64, 64) and torch.isfinite(x).all()
    assert sizes and max(w * h for w, h in sizes) <= 64 * 64


def test_pad_resize_is_identical_on_ordinary_images():
    rng = np.random.default_rng(0)
    pre = Preprocess(64, mean=(0, 0, 0), std=(1, 1, 1))
    diffs = {}
    for w, h in [(640, 480), (480, 640), (300, 300), (500, 260), (97, 61), (64, 64)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        new = pre(image).permute(1, 2, 0) * 255
        diffs[(w, h)] = float((new - _old_pad_resize(image, 64)).abs().max())
    print(f"\nmax abs pixel difference, new vs pad-then-resize (0-255): {diffs}")
    assert max(diffs.values()) < 1e-3  # float rounding of /255 only: identical uint8
    # an elongated image (aspect 10:1) takes the resize-first path: close, not identical
    strip = Image.fromarray(rng.integers(0, 256, (40, 400, 3), dtype=np.uint8))
    diff = (pre(strip).permute(1, 2, 0) * 255 - _old_pad_resize(strip, 64)).abs()
    print(f"aspect 10:1: mean abs difference {float(diff.mean()):.2f}, "
          f"max {float(diff.max()):.0f} (edge rows)")
    assert float(diff.mean()) < 8


def test_byte_cap_is_checked_before_reading(tmp_path: Path):
    path = tmp_path / "big.png"
    path.write_bytes(_png((64, 64)) + b"\0" * 5000)
    with pytest.raises(ImageError) as info:
        load_image(path, max_bytes=1000)
    assert info.value.reason == "too_large" and "bytes" in str(info.value)
    with pytest.raises(ImageError, match="too large"):
        load_image(path.read_bytes(), max_bytes=1000)
    assert load_image(path).size == (64, 64)


# -- 2. paths escaping image_root ---------------------------------------------------------------
def _escape_corpus(tmp: Path, extra: str = "") -> Path:
    outside = tmp / "outside.png"
    outside.write_bytes(_png((8, 8)))
    spec = _spec(tmp, ["i1,ok.png,p1,Green", "i2,../outside.png,p2,Red",
                       f"i3,{outside},p3,Yellow", "i4,link.png,p4,Green",
                       "i5,sub/../ok.png,p5,Red"], extra)
    (tmp / "img" / "ok.png").write_bytes(_png((8, 8)))
    (tmp / "img" / "sub").mkdir()
    os.symlink(outside, tmp / "img" / "link.png")
    return spec


def test_paths_outside_the_root_are_counted_skips(tmp_path: Path):
    col = load_collection(_escape_corpus(tmp_path))
    reasons = []
    for p in col.image_paths:
        try:
            load_image(p)
            reasons.append("ok")
        except ImageError as exc:
            reasons.append(exc.reason)
            assert "outside the image root" in str(exc) and "\n" not in str(exc)
    assert reasons == ["ok", "outside_root", "outside_root", "outside_root", "ok"]
    # the same through the reader, in a worker process (the root survives pickling)
    pre = Preprocess(16)
    for workers in (0, 1):
        batches = list(read_batches(col.image_paths, list(range(5)), pre, 8, workers))
        skipped = {r: why for b in batches for r, why, _ in b.skipped}
        assert skipped == {1: "outside_root", 2: "outside_root", 3: "outside_root"}
    escaped = col.image_paths[1]
    assert pickle.loads(pickle.dumps(escaped)).image_root == escaped.image_root
    warnings = " ".join(inspect_collection(col).warnings)
    assert "3 image(s) outside the image root" in warnings


def test_allow_outside_root_opts_out(tmp_path: Path):
    col = load_collection(_escape_corpus(tmp_path, "allow_outside_root: true"))
    assert all(load_image(p).size == (8, 8) for p in col.image_paths)
    with pytest.raises(Exception, match="allow_outside_root"):
        load_collection(_spec(tmp_path, ["i1,ok.png,p1,Green"], "allow_outside_root: yes please"))


# -- 3. special files ---------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_special_files_are_skipped_not_read(tmp_path: Path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.png"
    os.symlink("/dev/zero", zero)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    for path in (fifo, zero, folder):
        done, result = _finishes(lambda p=path: load_image(p))
        assert done, f"loading {path.name} hangs"
        assert isinstance(result, ImageError) and result.reason == "not_a_file", result
        assert image_problem(path) == "not_a_file"


# -- 4. / 5. / 6. tables ------------------------------------------------------------------------
@pytest.mark.parametrize("value", ['""', '"   "'])
def test_empty_id_is_a_one_line_error(tmp_path: Path, value):
    spec = _spec(tmp_path, ["i1,a.png,p1,Green", f"{value},b.png,p2,Red"])
    with pytest.raises(DataError) as info:
        load_collection(spec)
    assert str(info.value) == f"{tmp_path / 't.csv'}: row 2: column 'image_id': empty id"


def test_conflicting_labels_in_a_group_are_reported(tmp_path: Path):
    spec = _spec(tmp_path, ["i1,a.png,p1,Green", "i2,b.png,p1,Red", "i3,c.png,p2,Red",
                            "i4,d.png,p2,Red", "i5,e.png,p1,Green", "i6,f.png,p3,"])
    col = load_collection(spec)
    conflicts = label_conflicts(col)
    assert [(c.label, c.group, c.values) for c in conflicts] == [
        ("urgency", "p1", {"Green": [1, 5], "Red": [2]})]
    warning = [w for w in inspect_collection(col).warnings if "disagree" in w]
    assert warning == ["label 'urgency': 1 group(s) whose rows disagree: group 'p1': "
                       "Green (rows 1, 5) vs Red (row 2)"]


def test_split_cli_reports_conflicts(tmp_path: Path):
    from typer.testing import CliRunner

    from medsig.cli import app

    rows = [f"i{i},a{i}.png,p{i // 2},{'Green' if i % 3 else 'Red'}" for i in range(12)]
    spec = _spec(tmp_path, rows)
    res = CliRunner().invoke(app, ["data", "split", str(spec), "--duplicates", "0"])
    assert res.exit_code == 0, res.output
    assert "whose rows disagree" in res.output and "group 'p1'" in res.output


def test_broken_jsonl_names_the_line(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3,\n{"a": 4}\n')
    with pytest.raises(DataError) as info:
        read_table(path)
    assert str(info.value).startswith(f"{path}: line 4, character ")
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        read_table(path)
    path.write_text('\ufeff{"a": 1, "b": [1, 2]}\n{"a": null}\n', encoding="utf-8")  # BOM
    frame = read_table(path)
    assert frame["a"].tolist() == ["1", ""] and frame["b"][0] == [1, 2]


# -- 7. resume never unpickles ------------------------------------------------------------------
class _Payload:
    """Pickles to a call that creates a file: what a crafted checkpoint would run."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("victim", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_crafted_pickle_in_a_checkpoint_is_refused(tmp_path: Path, victim: str):
    from medsig.train import checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    folder = tmp_path / "last"
    ckpt.save_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler,
                         scaler=None, state={"step": 1})
    ckpt.load_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler,
                         scaler=None)  # a genuine checkpoint loads
    pwned = tmp_path / "pwned"
    torch.save({"state": _Payload(pwned)}, folder / victim)
    if victim == "rng.pt":  # an old-format checkpoint: rng.pt instead of rng.json
        (folder / "rng.json").unlink()
    with pytest.raises(ConfigError) as info:
        ckpt.load_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler,
                             scaler=None)
    assert not pwned.exists(), "the pickle ran"
    assert "\n" not in str(info.value)
    assert ("refused to load" in str(info.value)) != (victim == "rng.pt")


def test_multi_frame_dicom_counts_every_frame_against_the_pixel_limit():
    pytest.importorskip("pydicom")
    from tests.test_serve import dicom_bytes

    data = dicom_bytes(np.arange(8 * 64 * 64, dtype=np.uint16).reshape(8, 64, 64))
    assert load_image(data, max_pixels=8 * 64 * 64).size == (64, 64)
    with pytest.raises(ImageError) as info:  # 8 frames are decoded, not one
        load_image(data, max_pixels=2 * 64 * 64)
    assert info.value.reason == "too_large"


def test_nul_byte_in_a_path_is_an_error_not_a_traceback(tmp_path: Path):
    spec = _spec(tmp_path, [], table="t.jsonl")
    (tmp_path / "t.jsonl").write_text('{"image_id": "i1", "file": "a\\u0000b.png", '
                                      '"patient": "p1", "urgency": "Red"}\n')
    with pytest.raises(DataError, match="row 1: column 'file': image path contains a NUL"):
        load_collection(spec)
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "a\x00b.png")
    assert info.value.reason == "missing" and "\x00" not in str(info.value)
    assert image_problem(tmp_path / "a\x00b.png") == "missing"
