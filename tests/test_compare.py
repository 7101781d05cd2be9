"""The grid driver simulations/experiments/compare.py: resuming, seeds into mean +/- std, variants.

Every run goes through an injected ``runner`` (no Flower run): it records its calls and
returns (and, like the server app, writes) a summary with a known accuracy curve.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from simulations.experiments import compare

DECLARED = compare.app_config_defaults()
ROUNDS = 3


def curve_for(run_config: dict) -> list[float]:
    """A known accuracy curve per (strategy, seed, sync-steps): rounds 0..ROUNDS."""
    top = {"fedtan": 0.70, "fedavg": 0.60}.get(run_config["strategy"], 0.5)
    top += 0.04 * int(run_config["seed"]) + 0.1 * (int(run_config.get("sync-steps", 1)) - 1)
    return [0.1] + [top * r / ROUNDS for r in range(1, ROUNDS + 1)]


def summary_for(run_config: dict, accuracies: list[float], seconds: float = 10.0) -> dict:
    return {
        "config": {**DECLARED, **run_config},
        "seconds": seconds,
        "test": {str(r): {"test-accuracy": a, "test-loss": 1.0 - a} for r, a in enumerate(accuracies)},
        "communication": {str(r): {"train-exchanges": 1, "train-bytes-down": 1e6, "train-bytes-up": 1e6}
                          for r in range(1, len(accuracies))},
    }


class FakeRunner:
    """Writes the results file like the server app, and counts its calls."""

    def __init__(self, fail=lambda config: False, rounds_done=None) -> None:
        self.calls: list[dict] = []
        self.fail = fail
        self.rounds_done = rounds_done

    def __call__(self, run_config, num_supernodes, **kwargs):
        self.calls.append(dict(run_config, _nodes=num_supernodes))
        if self.fail(run_config):
            raise RuntimeError("run ended finished:failed")
        accuracies = curve_for(run_config)
        if self.rounds_done is not None:
            accuracies = accuracies[: self.rounds_done + 1]
        summary = summary_for(run_config, accuracies)
        Path(run_config["results-file"]).write_text(json.dumps(summary))
        return summary


def plan(tmp_path, methods=("fedtan", "fedavg"), seeds=(0, 1), variants=None, **settings):
    settings = {"num-server-rounds": ROUNDS, "local-steps": 2, **settings}
    return compare.plan_runs(list(methods), ["pathological"], list(seeds), settings, num_clients=5,
                             out_dir=tmp_path, declared=DECLARED, variants=variants)


def quiet(runs, runner, **kwargs):
    lines: list[str] = []
    records = compare.run_all(runs, runner, echo=lines.append, **kwargs)
    return records, lines


# ---------------------------------------------------------------------- resuming
def test_a_rerun_skips_complete_runs_and_redoes_the_others(tmp_path):
    runs = plan(tmp_path)
    runner = FakeRunner(fail=lambda c: c["strategy"] == "fedavg" and c["seed"] == 1)
    records, _ = quiet(runs, runner)
    assert [r.status for r in records] == ["ran", "ran", "ran", "failed"]
    assert not runs[3].results_file.exists()

    fedavg0, fedtan1 = runs[1], runs[2]
    # A summary cut short while being written, and one without the last round; fedtan
    # seed 0 stays complete, fedavg seed 1 failed (no file).
    fedavg0.results_file.write_text(fedavg0.results_file.read_text()[:50])
    partial = summary_for(fedtan1.run_config, curve_for(fedtan1.run_config)[:2])
    fedtan1.results_file.write_text(json.dumps(partial))
    states = [compare.result_state(spec)[0] for spec in runs]
    assert states == ["complete", "unreadable", "incomplete", "missing"]

    runner = FakeRunner()
    records, lines = quiet(runs, runner)
    assert [r.status for r in records] == ["reused", "ran", "ran", "ran"]
    assert [(c["strategy"], c["seed"]) for c in runner.calls] == [("fedavg", 0), ("fedtan", 1), ("fedavg", 1)]
    assert (fedavg0.results_file.parent / (fedavg0.results_file.name + ".old")).exists()
    assert any("unreadable" in line and "moved to" in line for line in lines)
    assert all(compare.result_state(spec)[0] == "complete" for spec in runs)
    # The summary on disk carries the run's wall time; a third pass runs nothing.
    assert "wall-seconds" in json.loads(fedtan1.results_file.read_text())
    runner = FakeRunner()
    records, _ = quiet(runs, runner)
    assert runner.calls == [] and {r.status for r in records} == {"reused"}
    # --force runs everything again.
    quiet(runs, runner, force=True)
    assert len(runner.calls) == len(runs)


def test_a_changed_setting_reruns_and_names_the_mismatch(tmp_path):
    quiet(plan(tmp_path, methods=["fedtan"], seeds=[0], lr=0.05), FakeRunner())
    same = plan(tmp_path, methods=["fedtan"], seeds=[0], lr=0.05 * (1 + 1e-15))
    assert compare.result_state(same[0])[0] == "complete"  # float noise is no change
    changed = plan(tmp_path, methods=["fedtan"], seeds=[0], lr=0.1)
    state, summary, reason = compare.result_state(changed[0])
    assert (state, summary) == ("mismatched", None) and "lr" in reason and "0.1" in reason
    runner = FakeRunner()
    records, _ = quiet(changed, runner)
    assert len(runner.calls) == 1 and records[0].status == "ran"
    assert json.loads(changed[0].results_file.read_text())["config"]["lr"] == 0.1


def test_a_run_older_than_an_option_matches_only_its_default(tmp_path):
    runs = plan(tmp_path, methods=["fedtan"], seeds=[0])
    quiet(runs, FakeRunner())
    summary = json.loads(runs[0].results_file.read_text())
    del summary["config"]["sync-steps"]  # as if written before the option existed
    runs[0].results_file.write_text(json.dumps(summary))
    default = plan(tmp_path, methods=["fedtan"], seeds=[0], **{"sync-steps": DECLARED["sync-steps"]})
    assert compare.result_state(default[0], DECLARED)[0] == "complete"
    other = plan(tmp_path, methods=["fedtan"], seeds=[0], **{"sync-steps": DECLARED["sync-steps"] + 1})
    state, _, reason = compare.result_state(other[0], DECLARED)
    assert state == "mismatched" and "sync-steps: '(absent)'" in reason


def test_a_fedtan_run_from_before_the_statistics_pass_is_not_reused(tmp_path):
    """Runs recorded before ``statistics`` existed ran with the running statistics: a FedTAN
    one is redone now that the default is the pass; FedAvg's (which the key does not
    touch) is reused, and so is FedTAN's when ``statistics=running`` is asked for."""
    runs = plan(tmp_path, methods=["fedtan", "fedavg"], seeds=[0])
    quiet(runs, FakeRunner())
    for spec in runs:
        summary = json.loads(spec.results_file.read_text())
        del summary["config"]["statistics"]
        spec.results_file.write_text(json.dumps(summary))
    states = {spec.method: compare.result_state(spec, DECLARED) for spec in runs}
    assert states["fedtan"][0] == "mismatched" and "statistics" in states["fedtan"][2]
    assert states["fedavg"][0] == "complete"
    running = plan(tmp_path, methods=["fedtan"], seeds=[0], statistics="running")
    assert compare.result_state(running[0], DECLARED)[0] == "complete"


def test_a_moved_output_folder_is_still_reused(tmp_path):
    quiet(plan(tmp_path / "a", methods=["fedtan"], seeds=[0]), FakeRunner())
    (tmp_path / "a").rename(tmp_path / "b")
    runner = FakeRunner()
    records, _ = quiet(plan(tmp_path / "b", methods=["fedtan"], seeds=[0]), runner)
    assert runner.calls == [] and records[0].status == "reused"


def test_a_run_returning_too_few_rounds_counts_as_failed(tmp_path):
    runs = plan(tmp_path, methods=["fedtan"], seeds=[0])
    records, lines = quiet(runs, FakeRunner(rounds_done=ROUNDS - 1))
    assert records[0].status == "failed" and "round 2 of 3" in records[0].error
    assert "FAILED" in lines[-1]
    assert compare.result_state(runs[0])[0] == "incomplete"  # and is redone next time


# ---------------------------------------------------------------------- mean +/- std
def test_seeds_aggregate_into_mean_and_sample_std(tmp_path):
    runs = plan(tmp_path, methods=["fedtan"], seeds=[0, 1, 2])
    records, _ = quiet(runs, FakeRunner())
    # Final accuracies 0.70, 0.74, 0.78: mean 0.74; sample variance
    # (0.04^2 + 0 + 0.04^2) / (3 - 1) = 0.0016, std 0.04.
    # Round 1: 0.70/3, 0.74/3, 0.78/3: mean 0.74/3, std 0.04/3.
    row, = compare.summarise(records, target=0.5)
    assert row["seeds"] == 3
    assert row["final_mean"] == pytest.approx(0.74) and row["final_std"] == pytest.approx(0.04)
    assert row["best_mean"] == pytest.approx(0.74) and row["best_std"] == pytest.approx(0.04)
    # Rounds 1-3 (fewer than LAST_ROUNDS): each seed's mean is 2/3 of its final accuracy.
    assert row["last_mean"] == pytest.approx(0.74 * 2 / 3) and row["last_std"] == pytest.approx(0.04 * 2 / 3)
    assert row["rounds_to_target"] == 3  # seed mean 0.493 in round 2, 0.74 in round 3
    assert row["wall_seconds_mean"] == 10.0 and row["wall_seconds_std"] == 0.0

    csv_path, md_path = compare.write_tables([row], tmp_path, wall_seconds=3600.0)
    assert "| 0.7400 ± 0.0400 | 0.7400 ± 0.0400 | 0.4933 ± 0.0267 | 3 |" in md_path.read_text()
    assert "3600 s (1.00 h)" in md_path.read_text()
    assert float(next(csv.DictReader(open(csv_path)))["final_std"]) == pytest.approx(0.04)

    curves = list(csv.DictReader(open(compare.write_curves(records, tmp_path))))
    round1 = next(c for c in curves if c["round"] == "1")
    assert float(round1["accuracy_mean"]) == pytest.approx(0.74 / 3, abs=1e-6)
    assert float(round1["accuracy_std"]) == pytest.approx(0.04 / 3, abs=1e-6)
    assert round1["seeds"] == "3"


def test_the_plot_band_is_mean_plus_minus_std(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    bands = []
    original = Axes.fill_between

    def spy(self, x, low, high, **kwargs):
        bands.append((list(x), list(low), list(high)))
        return original(self, x, low, high, **kwargs)

    monkeypatch.setattr(Axes, "fill_between", spy)
    records, _ = quiet(plan(tmp_path, methods=["fedtan"], seeds=[0, 1, 2]), FakeRunner())
    path, = compare.plot_accuracy(records, tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (rounds, low, high), = bands
    assert rounds == [0, 1, 2, 3]
    assert low[3] == pytest.approx(0.70) and high[3] == pytest.approx(0.78)  # 0.74 -/+ 0.04
    assert low[0] == pytest.approx(0.1) and high[0] == pytest.approx(0.1)  # every seed starts at 0.1


# ---------------------------------------------------------------------- variants
def test_variants_expand_to_run_configs_folders_and_labels(tmp_path):
    variants = [compare.parse_variant("sync1:sync-steps=1"), compare.parse_variant("sync-steps=5,lr=0.1")]
    assert variants[1].name == "sync-steps=5,lr=0.1" and variants[1].overrides == {"sync-steps": 5, "lr": 0.1}
    runs = plan(tmp_path, methods=["fedtan", "centralised"], seeds=[0], variants=variants, lr=0.05)
    assert [(r.method, r.variant) for r in runs] == [
        ("fedtan", "sync1"), ("centralised", "sync1"),
        ("fedtan", "sync-steps=5,lr=0.1"), ("centralised", "sync-steps=5,lr=0.1")]
    assert [r.run_config["sync-steps"] for r in runs] == [1, 1, 5, 5]
    assert [r.run_config["lr"] for r in runs] == [0.05, 0.05, 0.1, 0.1]  # the variant wins
    assert runs[0].results_file == (tmp_path / "runs" / "sync1" / "pathological" / "fedtan-seed0.json").resolve()
    assert runs[0].label == "fedtan [sync1]" and runs[1].num_supernodes == 1
    assert len({r.results_file for r in runs}) == 4

    records, lines = quiet(runs, FakeRunner())
    assert "fedtan [sync1]" in lines[0]
    rows = compare.summarise(records, target=0.5)
    by_label = {(r["method"], r["variant"]): r["final_mean"] for r in rows}
    assert by_label[("fedtan", "sync1")] == pytest.approx(0.70)
    assert by_label[("fedtan", "sync-steps=5,lr=0.1")] == pytest.approx(1.10)  # curve_for adds 0.1 per sync step
    _, md_path = compare.write_tables(rows, tmp_path)
    assert "| fedtan | sync1 | pathological | 1 |" in md_path.read_text()
    curves = list(csv.DictReader(open(compare.write_curves(records, tmp_path))))
    assert {c["variant"] for c in curves} == {"sync1", "sync-steps=5,lr=0.1"}


def test_a_variant_can_change_the_federation_size(tmp_path):
    runs = plan(tmp_path, methods=["fedavg", "centralised"], seeds=[0],
                variants=[compare.parse_variant("k10:num-partitions=10")])
    assert [(r.num_supernodes, r.run_config["num-partitions"]) for r in runs] == [(10, 10), (1, 10)]


def test_bad_variants_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="no KEY=VALUE"):
        compare.parse_variant("name:")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        compare.parse_variant("name:sync-steps")
    with pytest.raises(ValueError, match="names a folder"):
        compare.parse_variant("a/b:lr=0.1")
    assert compare.parse_variant("src:data-sources=a,b").overrides == {"data-sources": "a,b"}
    with pytest.raises(ValueError, match="unique"):
        compare.plan_runs(["fedtan"], ["iid"], [0], {}, 5, Path("x"), declared=DECLARED,
                          variants=[compare.parse_variant("a:lr=0.1"), compare.parse_variant("a:lr=0.2")])
    with pytest.raises(ValueError, match="grid sets"):
        compare.plan_runs(["fedtan"], ["iid"], [0], {}, 5, Path("x"), declared=DECLARED,
                          variants=[compare.parse_variant("s:seed=3")])
    with pytest.raises(ValueError, match="not declared"):
        compare.plan_runs(["fedtan"], ["iid"], [0], {}, 5, Path("x"), declared=DECLARED,
                          variants=[compare.parse_variant("s:no-such-key=3")])


# ---------------------------------------------------------------------- command line
def test_main_dry_run_then_a_resumed_grid_with_variants(tmp_path, capsys):
    argv = ["--methods", "fedtan", "--partitions", "iid", "--seeds", "0,1", "--rounds", str(ROUNDS),
            "--local-steps", "2", "--dataset", "synthetic", "--variant", "s1:sync-steps=1",
            "--variant", "s2:sync-steps=2", "--out", str(tmp_path)]
    runner = FakeRunner(fail=lambda c: c["seed"] == 1 and c["sync-steps"] == 2)
    assert compare.main(argv + ["--dry-run"], runner=runner) == 0
    out = capsys.readouterr().out
    assert runner.calls == [] and not (tmp_path / "runs").exists()
    assert "4 runs (1 methods x 1 partitions x 2 seeds x 2 variants)" in out and "4 of 4 runs to do" in out

    assert compare.main(argv, runner=runner) == 1  # one run failed
    assert len(runner.calls) == 4
    compare.main(argv + ["--only-plan"], runner=runner)
    out = capsys.readouterr().out
    assert "1 of 4 runs to do, 3 complete" in out
    assert out.count("reuse ") == 3 and "run   fedtan [s2]" in out

    runner = FakeRunner()
    assert compare.main(argv, runner=runner) == 0
    assert [(c["seed"], c["sync-steps"]) for c in runner.calls] == [(1, 2)]
    table = (tmp_path / "results.md").read_text()
    assert "| fedtan | s1 | iid | 2 |" in table and "| fedtan | s2 | iid | 2 |" in table
    assert "Grid wall time" in table
    assert not (tmp_path / ".compare.lock").exists()
    assert (tmp_path / "accuracy-iid.png").exists()


def test_one_grid_per_output_folder(tmp_path):
    with compare.GridLock(tmp_path):
        with pytest.raises(SystemExit, match="in use by a running grid"):
            with compare.GridLock(tmp_path):
                pass
    with compare.GridLock(tmp_path):  # released
        pass


class ModelWritingRunner(FakeRunner):
    """Also saves a final model, like the server app; ``nudge`` changes one weight by one ulp."""

    nudge = False

    def __call__(self, run_config, num_supernodes, **kwargs):
        import torch

        summary = super().__call__(run_config, num_supernodes, **kwargs)
        weight = torch.linspace(-1.0, 1.0, 12, dtype=torch.float32).reshape(3, 4) * (1 + int(run_config["seed"]))
        if self.nudge:
            weight[1, 2] = torch.nextafter(weight[1, 2], torch.tensor(10.0))
        state = {"conv.weight": weight, "bn.num_batches_tracked": torch.tensor(7)}
        torch.save(state, Path(run_config["results-file"]).with_suffix(".pt"))
        return summary


def test_the_final_model_digest_is_recorded_and_a_forced_rerun_says_whether_it_reproduced(tmp_path):
    import torch

    runs = plan(tmp_path, methods=("fedtan",), seeds=(0, 1))
    runner, lines = ModelWritingRunner(), []
    compare.run_all(runs, runner=runner, echo=lines.append)
    digests = [json.loads(spec.results_file.read_text())["final-model-sha256"] for spec in runs]
    assert len(set(digests)) == 2  # seeds 0 and 1 saved different weights

    # The same tensors saved another way (cloned, other file) give the same digest.
    state = torch.load(runs[0].results_file.with_suffix(".pt"), weights_only=True)
    resaved = tmp_path / "resaved.pt"
    torch.save({name: tensor.clone() for name, tensor in state.items()}, resaved)
    assert compare.model_digest(resaved) == digests[0]

    lines.clear()
    compare.run_all(runs, runner=runner, force=True, echo=lines.append)
    assert all(json.loads(spec.results_file.read_text())["reproduced-previous"] is True for spec in runs)
    assert sum("is identical to the previous run's" in line for line in lines) == 2

    runner.nudge, lines[:] = True, []
    compare.run_all(runs[:1], runner=runner, force=True, echo=lines.append)
    rerun = json.loads(runs[0].results_file.read_text())
    assert rerun["reproduced-previous"] is False and rerun["final-model-sha256"] != digests[0]
    assert any("differs from the previous run's" in line for line in lines)


def test_the_log_pacing_does_not_make_a_run_stale(tmp_path):
    runner = FakeRunner()
    quiet(plan(tmp_path, methods=("fedtan",), seeds=(0,)), runner)
    quiet(plan(tmp_path, methods=("fedtan",), seeds=(0,), **{"progress-interval": 0.0}), runner)
    assert len(runner.calls) == 1
    quiet(plan(tmp_path, methods=("fedtan",), seeds=(0,), **{"local-steps": 3}), runner)
    assert len(runner.calls) == 2
