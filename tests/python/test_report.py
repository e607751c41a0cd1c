from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest
from deepalign_fast.metrics import jacobian_determinant, ncc
from deepalign_fast.report import decompose_affine, write_report
from deepalign_fast.synth import compose, misalign_stack


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.imgs: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        if "id" in d:
            self.ids.append(d["id"])
        if tag == "img":
            self.imgs.append(d["src"])
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()


class _Lazy:
    """A stack that records which slices are read, like an on-disk reader."""

    def __init__(self, data):
        self.data, self.reads = data, []

    def __len__(self):
        return len(self.data)

    def read(self, i):
        self.reads.append(i)
        return self.data[i]


def _case(rng):
    base = cv2.GaussianBlur(rng.normal(size=(12, 80, 96)).astype(np.float32), (0, 0), 2)
    # a structure continuous along z so the reslices have something to show
    clean = (np.clip(base * 400 + 128, 0, 255)).astype(np.uint8)
    mis, truth = misalign_stack(clean, rng, profile="jitter", shift=6)
    m = truth.margin
    return clean[:, m:-m, m:-m], mis, truth


def test_decompose_affine():
    th, sx, sy, sh = np.deg2rad(2.0), 1.1, 0.95, 0.03
    r = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    lin = r @ np.array([[sx, sx * sh], [0, sy]])
    t = np.hstack([lin, [[4.0], [-3.0]]])
    d = decompose_affine([t, None])
    np.testing.assert_allclose([d[k][0] for k in ("tx", "ty", "rotation_deg", "scale_x",
                                                  "scale_y", "shear")],
                               [4, -3, 2, sx, sy, sh], atol=1e-12)
    assert np.isnan(d["tx"][1])


def test_report_sections_and_pngs(rng, tmp_path):
    after, mis, truth = _case(rng)
    lazy_before = _Lazy(mis)
    fold = np.stack([6 * np.sin(np.mgrid[0:32, 0:32][1] / 3.0), np.zeros((32, 32))])
    est = [compose(np.linalg.inv(np.vstack([t, [0, 0, 1]]))[:2], np.eye(2, 3))
           for t in truth.transforms]
    est[3] = None
    out = write_report(
        tmp_path / "sub" / "report.html", before=lazy_before, after=after, transforms=est,
        residuals=np.linspace(0.1, 0.5, 12), flagged={3: "no matches", 7: "fold"},
        timings={"features": 1.5, "solve": 0.25},
        jacobian_maps={5: jacobian_determinant(fold)}, title="synthetic <test>",
    )
    assert lazy_before.reads == list(range(12))  # one pass, one slice at a time
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "synthetic &lt;test&gt;" in text
    parser = _Collect()
    parser.feed(text)
    parser.close()
    assert parser.stack == []
    for section in ("summary", "reslices", "similarity", "residuals", "transforms", "flagged",
                    "jacobian", "timings"):
        assert section in parser.ids
    assert "no matches" in text and "fold" in text and "failed (no transform): 3" in text
    # neighbour NCC reported in the summary matches an independent computation
    before_mean = np.mean([ncc(mis[i], mis[i + 1]) for i in range(11)])
    assert f"{before_mean:.4g}" in text
    assert len(parser.imgs) >= 2 + 1 + 1 + 4 + 1
    sizes = []
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        img = cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8),
                           cv2.IMREAD_COLOR)
        assert img is not None and img.std() > 5  # decodable and not blank
        sizes.append(img.shape)
    # XZ reslice panel: before (w = 96 - 2 margin) and after side by side, z with 2x upscale
    xz = cv2.imdecode(np.frombuffer(base64.b64decode(parser.imgs[0].split(",", 1)[1]), np.uint8),
                      cv2.IMREAD_GRAYSCALE)
    assert xz.shape[0] == 22 + 12 * 2
    assert not list(tmp_path.joinpath("sub").glob(".*tmp"))  # no temp file left behind


def test_report_minimal_and_errors(rng, tmp_path):
    after, mis, _ = _case(rng)
    out = write_report(tmp_path / "r.html", before=mis, after=after)
    text = out.read_text()
    assert "id='reslices'" in text and "id='transforms'" not in text
    from deepalign_fast._errors import DeepAlignError

    bad = [mis[0], mis[1][:10]]
    with pytest.raises(DeepAlignError, match="slice 1"):
        write_report(tmp_path / "x.html", before=bad, after=after)
    assert not (tmp_path / "x.html").exists()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH")
def test_report_renders_in_headless_chromium(rng, tmp_path):
    after, mis, truth = _case(rng)
    out = write_report(tmp_path / "r.html", before=mis, after=after,
                       transforms=list(truth.transforms), title="render check")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1200,1600", f"--screenshot={shot}", out.as_uri()],
        capture_output=True, timeout=120, check=False,
    )
    assert shot.exists(), proc.stderr.decode(errors="replace")[-2000:]
    img = cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.shape == (1600, 1200)
    # non-blank: text and pictures give many dark pixels and real variance
    assert img.std() > 20 and (img < 128).mean() > 0.01
    assert re.search(r"render check", out.read_text())
