"""The benchmark scripts run end to end (tiny settings; their numbers are not checked here:
speed targets are judged by running the scripts themselves, never by timed tests)."""

from __future__ import annotations

import json
import re

import pytest

from simulations import bench_core


def test_bench_core_runs_and_reports_its_ratios(capsys):
    assert bench_core.main(["--model", "vgg", "--clients", "2", "--batch", "4", "--repeats", "2", "--routes", "2"]) == 0
    out = capsys.readouterr().out
    ratio = re.search(r"pooled / centralised = ([0-9.]+), median of 2 back-to-back pairs", out)
    assert ratio and float(ratio.group(1)) > 0
    assert re.search(r"replay to mid-backward = [0-9.]+ x centralised step", out)
    # fan-out diagnostics: a VGG has no activation shared by two BatchNorm inputs
    fan = re.search(r"would visit (\d+) autograd nodes for (\d+) unique", out)
    assert fan and fan.group(1) == fan.group(2)
    assert "per-root backwards: False" in out
    assert re.search(r"routes: mode on every step [0-9.]+; default [0-9.]+ \(median \(a\)/\(b\) of 2 ", out)


def _point(model, nodes, batch, seconds, ratio, pss_gb, replays=(0.0, 0.0)):
    return {"model": model, "nodes": nodes, "batch-size": batch, "fedtan-round-seconds": seconds, "ratio": ratio,
            "client-replays": list(replays), "live-bytes": [1.5e6, 2.5e6], "peak-pss-bytes": pss_gb * 1e9,
            "peak-rss-bytes": 2 * pss_gb * 1e9}


def test_the_scaling_table_and_figure_show_every_run_of_every_point(tmp_path):
    from simulations import plot_scale

    first, second = tmp_path / "run-1.json", tmp_path / "run-2.json"
    first.write_text(json.dumps([_point("cnn", 50, 32, 6.99, 1.83, 4.06), _point("cnn", 5, 32, 1.13, 0.95, 3.18),
                                 _point("resnet20", 200, 16, 80.0, 2.0, 9.5, replays=(0.25, 0.5))]))
    second.write_text(json.dumps([_point("cnn", 50, 32, 7.51, 1.91, 4.10)]))
    grouped = plot_scale.load_points([first, second])

    assert list(grouped) == [("cnn", 5, 32), ("cnn", 50, 32), ("resnet20", 200, 16)]
    rows = plot_scale.markdown_table(grouped).splitlines()
    assert rows[2] == "| CNN | 5 | 32 | 1.13 | 0.95 | 0 | 2 | 3.18 | 6.36 |"
    assert rows[3] == "| CNN | 50 | 32 | 6.99 / 7.51 | 1.83 / 1.91 | 0 | 2 | 4.06 / 4.10 | 8.12 / 8.20 |"
    assert rows[4] == "| ResNet-20 | 200 | 16 | 80.00 | 2.00 | ≤ 0.50 | 2 | 9.50 | 19.00 |"

    compact = plot_scale.nodes_table(grouped).splitlines()
    assert compact[0] == "| model | figure | 5 nodes | 50 nodes | 200 nodes |"
    assert compact[2] == "| CNN (batch 32) | FedTAN round (s) | 1.1 | 7.2 | - |"  # median of 6.99 and 7.51
    assert compact[3] == "| CNN (batch 32) | ratio | 0.95 | 1.87 | - |"
    assert compact[7] == "| ResNet-20 (batch 16) | peak PSS (GB) | - | - | 9.5 |"

    figure = tmp_path / "scale.png"
    plot_scale.plot(grouped, figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_scaling_table_refuses_a_file_that_is_not_a_list_of_points(tmp_path):
    from simulations import plot_scale

    wrong = tmp_path / "summary.json"
    wrong.write_text(json.dumps({"bench": {}}))
    with pytest.raises(ValueError, match="summary.json.*list of points"):
        plot_scale.load_points([wrong])
