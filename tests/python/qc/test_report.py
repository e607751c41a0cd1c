from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest
from deepalign_fast.fields import jacobian_determinant
from deepalign_fast.qc.metrics import ncc
from deepalign_fast.qc.report import decompose_affine, write_report
from deepalign_fast.qc.synth import compose, misalign_stack
from deepalign_fast.warp import warp_affine


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
    # XZ reslice panel: before (w = 96 - 2 margin) and after side by side. The voxel size of
    # an in-memory array is unknown: 12 slices are stretched to 96 rows ("display stretch"),
    # then enlarged 2x.
    xz = cv2.imdecode(np.frombuffer(base64.b64decode(parser.imgs[0].split(",", 1)[1]), np.uint8),
                      cv2.IMREAD_GRAYSCALE)
    assert xz.shape[0] == 22 + 96 * 2
    assert "display stretch" in text and "true voxel proportions" not in text
    # one total: the given wall time, not a second sum of the stages
    assert text.count(">total") == 1 and "total (sum of the stages)" in text
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


def _summary_value(text, label):
    m = re.search(re.escape(label) + r"[^<]*</td><td>([^<]+)</td>", text)
    assert m, label
    return m.group(1)


def _crop(lucchi, n=10):
    image, _ = lucchi
    return np.ascontiguousarray(image[40 : 40 + n, 60:220, 80:280])


def test_half_pixel_shift_scores_no_improvement(lucchi, tmp_path):
    """Interpolation alone (every slice shifted by the same half pixel) must not score as an
    improvement, although it raises the raw neighbour NCC a lot."""
    before = _crop(lucchi)
    m = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])
    after = np.stack([warp_affine(s, m) for s in before])
    raw_b = np.mean([ncc(before[i], before[i + 1]) for i in range(len(before) - 1)])
    raw_a = np.mean([ncc(after[i][:-1, :-1], after[i + 1][:-1, :-1])
                     for i in range(len(after) - 1)])
    assert (raw_a - raw_b) / (1 - raw_b) > 0.2  # the confound is real on this data
    out = write_report(tmp_path / "r.html", before=before, after=after,
                       transforms=[m] * len(before))
    text = out.read_text()
    n_ncc = float(_summary_value(text, "normalised improvement"))
    assert abs(n_ncc) < 1e-9
    nb = float(_summary_value(text, "mean neighbour NCC before (at the after"))
    na = float(_summary_value(text, "mean neighbour NCC after"))
    assert nb == na


def test_real_alignment_still_scores_an_improvement(lucchi, rng, tmp_path):
    clean = _crop(lucchi, 12)
    mis, truth = misalign_stack(clean, rng, profile="jitter", shift=4)
    # the perfect pull maps from the clean frame (cropped by the margin) to each misaligned slice
    m = truth.margin
    crop = np.array([[1.0, 0.0, m], [0.0, 1.0, m]])
    est = [compose(np.linalg.inv(np.vstack([t, [0, 0, 1]]))[:2], crop) for t in truth.transforms]
    shape = (clean.shape[1] - 2 * m, clean.shape[2] - 2 * m)
    after = np.stack([warp_affine(s, e, shape) for s, e in zip(mis, est, strict=True)])
    out = write_report(tmp_path / "r.html", before=mis, after=after, transforms=est)
    n_ncc = float(_summary_value(out.read_text(), "normalised improvement"))
    assert n_ncc > 0.3


def test_report_records_run_and_true_voxel_aspect(tmp_path):
    import tifffile
    from deepalign_fast import __version__
    from deepalign_fast.io import open_stack

    rng = np.random.default_rng(5)
    stack = (cv2.GaussianBlur(rng.random((8, 64, 64)).astype(np.float32), (0, 0), 2) * 255
             ).astype(np.uint8)
    src = tmp_path / "in.tif"
    # ImageJ: 0.01 um pixels (100 px per unit), slices 0.03 um apart: z aspect 3
    tifffile.imwrite(src, stack, imagej=True, resolution=(100.0, 100.0),
                     metadata={"spacing": 0.03, "unit": "micron"})
    m = [np.array([[1.0, 0.001 * z, 0.3 * z], [0.0, 1.0, 0.0]]) for z in range(8)]
    with open_stack(src) as b:
        out = write_report(tmp_path / "r.html", before=b, after=stack, transforms=m,
                           options={"model": "rigid", "threshold": 2.5},
                           timings={"match": 1.0, "warp": 2.0})
    text = out.read_text()
    assert __version__ in text and str(src.resolve()) in text
    assert "0.03 x 0.01 x 0.01 \u00b5m" in text
    assert "z aspect 3" in text and "display stretch" not in text
    assert "option model" in text and "&quot;rigid&quot;" in text and "2.5" in text
    assert "total (sum of the stages)</td><td>3.000" in text
    # the XZ panel shows true proportions: 8 slices x aspect 3 = 24 rows, enlarged 2x
    img = re.findall(r'src="data:image/png;base64,([^"]+)"', text)[0]
    xz = cv2.imdecode(np.frombuffer(base64.b64decode(img), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert xz.shape[0] == 22 + 24 * 2


def test_tick_labels_differ():
    from deepalign_fast.qc.report import format_tick, nice_ticks

    for lo, hi in ((0.99996, 1.00003), (0.9, 1.1), (1e-7, 3e-7), (-2.5, 2.5), (12000, 12001)):
        ticks, step = nice_ticks(lo, hi)
        labels = [format_tick(t, step) for t in ticks]
        assert len(labels) >= 2 and len(set(labels)) == len(labels), (lo, hi, labels)
