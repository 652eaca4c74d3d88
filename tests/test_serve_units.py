"""Serving building blocks without a server: micro-batching, decisions, uploads, paths."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from medsig.models.heads import Head
from medsig.serve.batching import MicroBatcher, as_list
from medsig.serve.security import ApiError, parse_multipart
from medsig.serve.state import ServeSettings, resolve_image, scrub_paths
from medsig.serve.summary import CAVEAT, head_info, summarize
from medsig.serve.summary import label_results as decide

HEADS = [
    Head("urgency", "binary", ["home care", "needs attention"], 0, 1, [0.41]),
    Head("infection_risk", "multiclass", ["Low", "Medium", "High"], 1, 3, []),
    Head("condition", "multilabel", ["Eczema", "Wart"], 4, 2, [0.5, 0.3]),
]


def _run(coro):
    return asyncio.run(coro)


def test_batcher_groups_concurrent_requests_and_keeps_order() -> None:
    calls: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [x * 10 for x in items]

    async def main() -> list:
        with ThreadPoolExecutor(1) as ex:
            b = MicroBatcher(fn, collate=as_list, executor=ex, max_batch=4, max_wait_ms=50)
            out = await asyncio.gather(*(b.submit(i) for i in range(10)))
            await b.close()
            return out

    out = _run(main())
    assert [row for row, _ in out] == [i * 10 for i in range(10)]
    assert max(len(c) for c in calls) == 4 and sum(len(c) for c in calls) == 10
    assert len(calls) == 3  # 4 + 4 + 2, not ten separate model calls
    assert {info.size for _, info in out} == {4, 2}


def test_batcher_disabled_runs_one_by_one_and_errors_reach_every_caller() -> None:
    calls: list[int] = []

    def fn(items: list[int]) -> list[int]:
        calls.append(len(items))
        return list(items)

    def boom(items: list[int]) -> list[int]:
        raise RuntimeError("model failed")

    async def main() -> tuple:
        with ThreadPoolExecutor(1) as ex:
            off = MicroBatcher(fn, collate=as_list, executor=ex, enabled=False)
            rows = await asyncio.gather(*(off.submit(i) for i in range(5)))
            bad = MicroBatcher(boom, collate=as_list, executor=ex, max_wait_ms=20)
            errors = await asyncio.gather(*(bad.submit(i) for i in range(3)),
                                          return_exceptions=True)
            await bad.close()
            return rows, errors

    rows, errors = _run(main())
    assert [r for r, _ in rows] == list(range(5)) and calls == [1] * 5
    assert all(isinstance(e, RuntimeError) and "model failed" in str(e) for e in errors)


def test_decide_follows_thresholds_and_readable_states() -> None:
    probs = np.array([0.83, 0.2, 0.5, 0.3, 0.6, 0.29])
    labels = {lab.name: lab for lab in decide(HEADS, probs)}
    urgency = labels["urgency"]
    assert urgency.decision == "needs attention" and urgency.present == ["needs attention"]
    assert urgency.threshold == pytest.approx(0.41)
    low = decide(HEADS, np.array([0.40, 0.2, 0.5, 0.3, 0.1, 0.1]))[0]
    assert low.decision == "home care" and low.present == []
    risk = labels["infection_risk"]
    assert risk.decision == "Medium" and risk.probability == pytest.approx(0.5)
    assert [s.positive for s in risk.scores] == [False, True, False]
    cond = labels["condition"]
    assert cond.present == ["Eczema"] and cond.decision == "Eczema"  # 0.29 < 0.3 for Wart
    text = summarize(list(labels.values()), "wound-probe", "0.1.0")
    assert "urgency: needs attention (P(needs attention) = 0.83, at or above the threshold " \
        "0.41)" in text
    assert "infection_risk: Medium (P(Medium) = 0.50; P(High) = 0.30, P(Low) = 0.20)" in text
    assert "condition: Eczema (P(Eczema) = 0.60, threshold 0.50)" in text
    assert text.endswith(CAVEAT)
    assert "not a diagnosis" in CAVEAT


def test_summary_names_the_strongest_multilabel_findings_and_counts_the_rest() -> None:
    from medsig.serve.summary import MAX_LISTED

    classes = [f"c{i}" for i in range(12)]
    head = Head("condition", "multilabel", classes, 0, 12, [0.1] * 12)
    probs = np.linspace(0.9, 0.35, 12)
    text = summarize(decide([head], probs), "m", "1")
    assert "c0 (P(c0) = 0.90" in text and f"c{MAX_LISTED - 1} " in text
    assert f"c{MAX_LISTED} " not in text and f"{12 - MAX_LISTED} more above threshold" in text


def test_findings_name_the_state_their_probability_is_for() -> None:
    """A negative binary decision shows P(positive state) labelled as such, never a bare p
    beside the negative state; multiclass and multilabel name each probability's class."""
    low = decide(HEADS, np.array([0.31, 0.7, 0.2, 0.1, 0.2, 0.1]))
    urgency, risk, cond = low
    assert (urgency.decision, urgency.probability_of) == ("home care", "needs attention")
    text = summarize(low, "m", "1")
    assert "urgency: home care (P(needs attention) = 0.31, below the threshold 0.41)" in text
    assert "infection_risk: Low (P(Low) = 0.70; P(Medium) = 0.20, P(High) = 0.10)" in text
    assert "condition: none above its threshold (highest P(Eczema) = 0.20, below the " \
        "threshold 0.50)" in text
    assert "p=" not in text and (risk.probability_of, cond.probability_of) == ("Low", "Eczema")


def test_similar_cases_show_missing_labels_and_flag_the_query_itself() -> None:
    from medsig.serve.summary import case_labels, same_image

    shown = case_labels({"urgency": None, "condition": [], "risk": "Low", "tags": ["a", "b"]})
    assert shown == {"urgency": "not recorded", "condition": "none", "risk": "Low",
                     "tags": ["a", "b"]}
    assert same_image(0.99999, True) and not same_image(0.99999, False)
    assert not same_image(0.98, True)


def test_head_from_medsig_json_dict() -> None:
    h = Head.of({"name": "edema", "kind": "binary", "classes": ["no edema", "edema"],
                 "offset": 3, "size": 1, "thresholds": [0.7], "threshold_rule": "youden"})
    assert (h.offset, h.size, h.thresholds, head_info(h).threshold_rule) == (3, 1, [0.7], "youden")


def _form(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_multipart_parsing_in_memory_with_limits() -> None:
    ctype = "multipart/form-data; boundary=XyZ"
    body = _form([("file", "a.png", b"\x89PNG" + b"x" * 100), ("k", None, b"3"),
                  ("where", None, b"split=test"), ("where", None, b"sex=F")])
    up = parse_multipart(body, ctype, max_file_bytes=1000)
    assert up.file is not None and len(up.file) == 104
    assert up.first("k") == "3" and up.fields["where"] == ["split=test", "sex=F"]
    with pytest.raises(ApiError) as big:
        parse_multipart(body, ctype, max_file_bytes=50)
    assert big.value.status == 413
    with pytest.raises(ApiError) as two:
        parse_multipart(_form([("file", "a", b"1"), ("file", "b", b"2")]), ctype, 1000)
    assert two.value.status == 422
    with pytest.raises(ApiError) as nob:
        parse_multipart(body, "multipart/form-data", 1000)
    assert nob.value.code == "invalid_multipart"


def test_scrub_paths_never_returns_absolute_paths(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    payload = {"image": "sub/a.jpg", "source": str(root / "sub" / "a.jpg"),
               "other": "/etc/secret/file.txt", "win": "C:\\data\\x.png",
               "nested": [{"p": "file:///srv/x/y.dcm"}], "n": 3, "note": "left side"}
    clean = scrub_paths(payload, root.resolve())
    assert clean["source"] == "sub/a.jpg" and clean["other"] == "file.txt"
    assert clean["win"] == "x.png" and clean["nested"][0]["p"] == "y.dcm"
    assert clean["image"] == "sub/a.jpg" and clean["n"] == 3 and clean["note"] == "left side"


def test_resolve_image_stays_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "secret.jpg", root / "link.jpg")
    r = root.resolve()
    assert resolve_image(r, "a.jpg") == r / "a.jpg"
    for bad in ("../secret.jpg", str(tmp_path / "secret.jpg"), "link.jpg", "missing.jpg",
                "", None, "a.jpg\x00"):
        assert resolve_image(r, bad) is None, bad


def test_settings_defaults_and_api_key_from_environment(monkeypatch) -> None:
    monkeypatch.delenv("MEDSIG_API_KEY", raising=False)
    s = ServeSettings()
    assert s.max_upload_bytes == 20 * 1024 * 1024 and s.max_pixels == 50_000_000
    assert s.api_key is None and s.cors_origins == [] and s.batching
    monkeypatch.setenv("MEDSIG_API_KEY", "k123")
    assert ServeSettings().api_key == "k123"
