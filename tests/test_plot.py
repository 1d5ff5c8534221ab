"""Plots: `dtsync plot`, `replay --plot`, `rank --plot`; each PNG is opened and looked at (size, not blank,
the event and interval colours present exactly when they should be)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dtsync.cli import app
from dtsync.offline.sample import write_samples
from dtsync.plot import plot_ranking, plot_timeline, read_timeline

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
EVENT_RGB = (214, 39, 40)  # dtsync.plot.EVENT_COLOR
BAND_RGB = (210, 227, 240)  # tab:blue at alpha 0.2 on white


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).astype(int)


def share_near(px: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> float:
    return float((np.abs(px - np.array(rgb)).max(axis=-1) <= tol).mean())


def assert_drawn(px: np.ndarray) -> None:
    """Not blank: mostly white background, but a real share of ink in several colours."""
    ink = (px < 240).any(axis=-1).mean()
    colours = len({tuple(c) for c in px.reshape(-1, 3)[::7]})
    assert 0.01 < ink < 0.6 and colours > 50, (ink, colours)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp("samples"), seed=7)


def record(t: float, twin: str, mismatch: float, **extra: Any) -> dict[str, Any]:
    return {"t": t, "cell": "c", "twin": twin, "mismatch": mismatch, "fired": False, **extra}


def test_timeline_marks_events_only_where_there_are_some(tmp_path: Path) -> None:
    quiet = [record(float(t), "a", 0.3 + 0.01 * (t % 5), threshold=1.0, noise_floor=0.2) for t in range(50)]
    loud = [dict(r, twin="b", mismatch=r["mismatch"] + (1.0 if r["t"] >= 30 else 0.0), fired=r["t"] == 30)
            for r in quiet]  # fmt: skip
    out = plot_timeline(quiet + loud, tmp_path / "both.png", dpi=100)
    px = pixels(out)
    assert px.shape == (int(100 * (2.6 * 2 + 0.6)), 900, 3)  # one panel per twin
    assert_drawn(px)
    top, bottom = px[: px.shape[0] // 2], px[px.shape[0] // 2 :]
    assert share_near(top, EVENT_RGB) == 0.0  # twin a: no event
    assert share_near(bottom, EVENT_RGB) > 0.0005  # twin b: the event's line and marker
    quiet_only = pixels(plot_timeline(quiet, tmp_path / "quiet.png", dpi=100))
    assert quiet_only.shape == (int(100 * (2.6 + 0.6)), 900, 3) and share_near(quiet_only, EVENT_RGB) == 0.0


@pytest.mark.parametrize(("keys", "band"), [(("interval_low", "interval_high"), True),
                                            (("mismatch_lower", "mismatch_upper"), True), ((), False)])  # fmt: skip
def test_interval_is_drawn_from_whichever_keys_the_records_have(tmp_path: Path, keys: tuple[str, ...],
                                                                band: bool) -> None:  # fmt: skip
    rs = []
    for t in range(40):
        m = 1.0 + 0.1 * np.sin(t / 4)
        rs.append(record(float(t), "a", m, **dict(zip(keys, (m - 0.4, m + 0.4), strict=False))))
    px = pixels(plot_timeline(rs, tmp_path / "band.png", dpi=100))
    assert_drawn(px)
    assert (share_near(px, BAND_RGB, tol=6) > 0.02) == band


def test_records_missing_keys_or_with_bad_values_are_drawn_defensively(tmp_path: Path) -> None:
    rs = [record(float(t), "a", 0.5) for t in range(20)]
    rs += [{"t": 3.5, "twin": "a", "mismatch": None}, {"twin": "a", "mismatch": 1.0}, {"t": "x", "mismatch": 2}]
    rs += [record(float(t), "a", 0.5, threshold=None, noise_floor="n/a", mismatch_upper=float("inf"))
           for t in range(20, 25)]  # fmt: skip
    assert_drawn(pixels(plot_timeline(rs, tmp_path / "partial.png")))
    with pytest.raises(ValueError, match="nothing|no evaluation"):
        plot_timeline([{"twin": "a"}], tmp_path / "none.png")


def test_ranking_bars_with_intervals(tmp_path: Path) -> None:
    rs = [{"twin": f"twin-{i}", "mismatch": 0.2 * i + 0.1, "mismatch_lower": 0.2 * i, "mismatch_upper": 0.2 * i + 0.3,
           "noise_floor": 0.15, "threshold": 0.5} for i in range(4)]  # fmt: skip
    px = pixels(plot_ranking(rs, tmp_path / "rank.png", dpi=100))
    assert px.shape == (420, int(100 * max(5.0, 0.9 * 4 + 2.5)), 3)
    assert_drawn(px)


def test_replay_plot_and_plot_command_write_pngs(samples: dict[str, Path], tmp_path: Path) -> None:
    timeline, png = tmp_path / "timeline.jsonl", tmp_path / "replay.png"
    out = runner.invoke(app, ["replay", "--real", str(samples["real"]), "--twin", f"faithful={samples['faithful']}",
                              "--twin", f"drifting={samples['drifting']}", "--config", str(ROOT / "config.yaml"),
                              "--timeline", str(timeline), "--plot", str(png)])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert f"plot: {png}" in out.output
    px = pixels(png)
    assert px.shape[0] == int(110 * (2.6 * 2 + 0.6)) and px.shape[1] == 990
    assert_drawn(px)
    fired = [r for r in read_timeline(timeline) if r["fired"]]
    assert [r["twin"] for r in fired] == ["drifting"]
    assert share_near(px[: px.shape[0] // 2], EVENT_RGB) > 0  # panels in name order: drifting first
    assert share_near(px[px.shape[0] // 2 :], EVENT_RGB) == 0.0
    again = tmp_path / "plot.png"
    out = runner.invoke(app, ["plot", str(timeline), "--out", str(again), "--twin", "faithful"])
    assert out.exit_code == 0, out.output
    assert "wrote" in out.output and pixels(again).shape[0] == int(110 * (2.6 + 0.6))


def test_rank_plot(samples: dict[str, Path], tmp_path: Path) -> None:
    png = tmp_path / "rank.png"
    out = runner.invoke(app, ["rank", "--real", str(samples["real"]), "--twin", f"faithful={samples['faithful']}",
                              "--twin", f"drifting={samples['drifting']}", "--json", "--plot", str(png)])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert [r["twin"] for r in json.loads(out.output)] == ["faithful", "drifting"]  # --json output stays JSON
    assert_drawn(pixels(png))


def test_plot_errors_are_reported_not_raised(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 1, "mismatch": 0.5}\nnot json\n')
    out = runner.invoke(app, ["plot", str(bad), "--out", str(tmp_path / "x.png")])
    assert out.exit_code == 2 and "bad.jsonl:2: not JSON" in out.output
    out = runner.invoke(app, ["plot", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.png")])
    assert out.exit_code == 2 and "no such file" in out.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"twin": "a"}\n')
    out = runner.invoke(app, ["plot", str(empty), "--out", str(tmp_path / "x.png")])
    assert out.exit_code == 2 and "no evaluation" in out.output
    out = runner.invoke(app, ["plot", str(bad), "--out", str(tmp_path / "no-such-dir" / "x.png")])
    assert out.exit_code == 2 and "not a directory" in out.output
