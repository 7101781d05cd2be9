"""The benchmark scripts run end to end (tiny settings; their numbers are not checked here:
speed targets are judged by running the scripts themselves, never by timed tests)."""

from __future__ import annotations

import re

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
