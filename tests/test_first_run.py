"""The README's first command as a user types it: the `vdistill` console script, a fresh empty folder, default paths.

Only the set, the iteration and the epoch counts are shrunk to fit the suite; DM+S2D is added so that the
artifact is chosen between two S2D methods, and two distillation workers so that the distillation stages (DM
and MTT) run on a Ray Train worker group from the command line; `run.root` stays the default relative `runs`, which Ray workers
(running in other directories) must still find.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.cli import vdistill
from vdistill.stage import SCORES_FOLDER

SMALL = ["demo.classes=4", "demo.train_per_class=6", "demo.test_per_class=3", "static.iterations=3",
         "dynamic.iterations=3", "dynamic.syn_steps=2", "dynamic.max_start_epoch=2", "evaluate.epochs=3",
         "evaluate.num_eval=2", "validation.epochs=5", "baselines.s2d_methods=[dm]",
         "baselines.s2d_overrides={dm: {iterations: 3}}", "run.distill_workers=2"]


@pytest.mark.slow
def test_vdistill_demo_runs_from_an_empty_folder_with_the_default_relative_run_root(tmp_path):
    proc = vdistill(["demo", *SMALL], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "top-1 %" in proc.stdout and "MTT+S2D" in proc.stdout and "DM+S2D" in proc.stdout, proc.stdout[-2000:]
    run = tmp_path / "runs" / "demo"
    assert json.loads((run / "artifact" / "meta.json").read_text())["kind"] == "s2d"
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["root"] == str(tmp_path / "runs")  # resolved once, on the driver
    assert f"distilled artifact: {run / 'artifact'}" in proc.stdout
    cache = json.loads((run / "cache" / "manifest.json").read_text())
    assert cache["splits"] == ["test", "train", "val"] and all(n == 1 for n in cache["counts"]["val"].values())
    outputs = {stage: json.loads((run / stage / "manifest.json").read_text())["outputs"]
               for stage in ("static", "dynamic-dm", "dynamic-mtt")}
    assert {stage: out["workers"] for stage, out in outputs.items()} == {"static": 2, "dynamic-dm": 2,
                                                                          "dynamic-mtt": 2}
    for stage, out in outputs.items():  # rank 0 scored the start and the end on validation, every worker kept it
        scores = out["validation"]["scores"]
        assert scores[0][0] == 0 and scores[-1][0] == 3 and all(0 <= s <= 1 for _, s in scores), stage
    assert list((run / SCORES_FOLDER).iterdir())  # scores kept by set content
    chosen = json.loads((run / "export" / "manifest.json").read_text())["outputs"]["method"]
    assert f"{chosen.upper()}+S2D, best on the validation split" in proc.stdout
    for name in ("static_memory", "dynamic_memory", "integrator"):  # the artifact is the chosen stage's kept iterate
        shipped = load_file(run / "artifact" / f"{name}.safetensors")
        kept = load_file(run / f"dynamic-{chosen}" / "set" / f"{name}.safetensors")
        assert shipped.keys() == kept.keys() and all(torch.equal(shipped[k], kept[k]) for k in kept), name
