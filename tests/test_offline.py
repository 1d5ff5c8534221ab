"""End to end: `dtsync replay` and `dtsync rank` on generated traces, through the real CLI."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dtsync.cli import app
from dtsync.config import load_config
from dtsync.offline.replay import replay
from dtsync.offline.sample import write_samples

ROOT = Path(__file__).resolve().parent.parent
CHANGE_AT = 100.0  # write_samples: 20,000 steps of 0.01 s, dynamics change at the midpoint
TIMELINE_KEYS = {"t", "twin", "mismatch", "mismatch_lower", "mismatch_upper", "noise_floor", "tv_bound",
                 "regret_bound", "samples_real", "samples_twin", "coverage", "fired", "event_id"}  # fmt: skip

runner = CliRunner()


@pytest.fixture(scope="module", params=[7, 11])
def samples(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp(f"seed{request.param}"), seed=request.param)


def test_drifting_twin_flagged_after_the_change_and_faithful_never(samples: dict[str, Path]) -> None:
    config = load_config(ROOT / "config.yaml")
    result = replay(config, samples["real"], {"faithful": samples["faithful"], "drifting": samples["drifting"]})
    fired = [r for r in result.reports if r.fired]
    assert [r.twin for r in fired] == ["drifting"], [(r.twin, r.t, r.reason) for r in fired]
    assert CHANGE_AT < fired[0].t < CHANGE_AT + 30
    drifting = [r for r in result.reports if r.twin == "drifting"]
    assert all(r.state != "drifted" for r in drifting if r.t < CHANGE_AT)
    assert drifting[-1].state == "drifted"
    assert result.transitions == {"real": 20_000, "faithful": 20_000, "drifting": 20_000}


def test_replay_cli_writes_the_timeline(samples: dict[str, Path], tmp_path: Path) -> None:
    timeline = tmp_path / "timeline.jsonl"
    out = runner.invoke(app, ["replay", "--real", str(samples["real"]), "--twin", f"faithful={samples['faithful']}",
                              "--twin", f"drifting={samples['drifting']}", "--config", str(ROOT / "config.yaml"),
                              "--timeline", str(timeline)])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "resync events: 1" in out.output
    rows = [json.loads(line) for line in timeline.read_text().splitlines()]
    assert rows and all(TIMELINE_KEYS <= row.keys() for row in rows)
    events = [r for r in rows if r["fired"]]
    assert len(events) == 1 and events[0]["twin"] == "drifting" and events[0]["event_id"]
    assert all(r["event_id"] is None for r in rows if not r["fired"])
    assert all(r["mismatch_lower"] <= r["mismatch"] <= r["mismatch_upper"] for r in rows)
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows)


def test_cli_flags_override_the_config(samples: dict[str, Path]) -> None:
    # Without a config the threshold applies to the point mismatch; a huge one never fires.
    out = runner.invoke(app, ["replay", "--real", str(samples["real"]), "--twin", f"d={samples['drifting']}",
                              "--threshold", "1000", "--window", "2000", "--gamma", "0.8"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "resync events: 0" in out.output


def test_rank_orders_twins_and_compares_cells(samples: dict[str, Path], tmp_path: Path) -> None:
    other = write_samples(tmp_path / "other-cell", seed=99)["real"]  # a different network altogether
    out = runner.invoke(app, ["rank", "--real", str(samples["real"]), "--twin", f"other-cell={other}",
                              "--twin", f"drifting={samples['drifting']}", "--twin", f"faithful={samples['faithful']}",
                              "--json"])  # fmt: skip
    assert out.exit_code == 0, out.output
    ranked = json.loads(out.output)
    assert [r["twin"] for r in ranked] == ["faithful", "drifting", "other-cell"]
    assert ranked[0]["mismatch"] < ranked[1]["mismatch"] < ranked[2]["mismatch"]
    for r in ranked:
        assert r["top_states"] and r["samples_needed"] > 0 and 0 <= r["coverage"] <= 1
        assert r["mismatch"] <= r["tv_bound"] + 1e-9
    table = runner.invoke(app, ["rank", "--real", str(samples["real"]), "--twin", f"faithful={samples['faithful']}"])
    assert table.exit_code == 0 and "faithful" in table.output and "regret bound" in table.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--twin", "no-equals-sign"], "NAME=FILE"),
        (["--twin", "x=/nonexistent.jsonl"], "no such file"),
        (["--twin", "bad name=SAMPLE"], "invalid name"),
        ([], "at least one --twin"),
    ],
)
def test_cli_errors_are_clear(samples: dict[str, Path], args: list[str], message: str) -> None:
    args = [a.replace("SAMPLE", str(samples["faithful"])) for a in args]
    out = runner.invoke(app, ["replay", "--real", str(samples["real"]), *args])
    assert out.exit_code == 2
    assert message in out.output


def test_bad_lines_are_counted_not_fatal(samples: dict[str, Path], tmp_path: Path) -> None:
    twin = tmp_path / "twin.jsonl"
    lines = samples["faithful"].read_text().splitlines()[:3000]
    lines[10:10] = ['{"s": 1, "a": 0, "r": NaN, "s_next": 2}', "not json", '{"s": 1, "a": 0, "s_next": 2}', "[]"]
    twin.write_text("\n".join(lines) + "\n")
    out = runner.invoke(app, ["replay", "--real", str(samples["real"]), "--twin", f"t={twin}"])
    assert out.exit_code == 0, out.output
    assert "rejected 4" in out.output
    assert "invalid_json" in out.output and "missing_field" in out.output
