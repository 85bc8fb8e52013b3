"""Progressive knowledge transfer (MobileBERT) as a stage list: which parameters move and at
which learning rate in every step, which losses are active, and per-stage layer selection."""

import pytest
import torch
from omegaconf import OmegaConf

from components.errors import ConfigError
from components.training import progressive_stages
from components.training.run import execute
from recipes.distill_recursive import DistillRecursiveRecipe
from tests.recipe_helpers import tiny_config


class RecordingRecipe(DistillRecursiveRecipe):
    """Records, for every optimizer step: the parameters that train and those it changed (a
    trained parameter may not move: adapters' down-projections get no gradient while their
    up-projection is still 0), each parameter's learning rate in that step, and the metrics."""

    steps = None

    def train_step(self):
        lrs = {name: group["lr"] for group in self.optimizer.param_groups for name in group["names"]}
        before = {n: p.detach().clone() for n, p in self.trainable_named_parameters()}
        metrics = super().train_step()
        changed = {n for n, p in self.trainable_named_parameters() if not torch.equal(p.detach(), before[n])}
        trainable = {n for n, p in self.trainable_named_parameters() if p.requires_grad}
        self.steps.append(
            {
                "changed": changed,
                "trainable": trainable,
                "lr": lrs,
                "metrics": metrics,
                "layers": list(self.loss_fn.active_layer_map),
            }
        )
        return metrics


def run(cfg):
    recipe = RecordingRecipe(OmegaConf.create(cfg))
    recipe.steps = []
    execute(recipe)
    return recipe


def _progressive_config(out, teacher_dir, corpus_file, **stage_args):
    cfg = tiny_config(out, teacher_dir, corpus_file, max_steps=6, save_every_n_steps=None)
    cfg["loss"]["layer_map"] = [2, 4]
    cfg["stages"] = {
        "_component_": "components.training.progressive_stages",
        "num_layers": 2,
        "steps_per_layer": 2,
        # the recursive student's per-iteration parameters are its adapters
        "layer_parameters": "student.adapters.{index}.*",
        **stage_args,
    }
    return cfg


def test_progressive_schedule_moves_each_layer_in_its_phase(tmp_path, teacher_dir, corpus_file):
    recipe = run(_progressive_config(tmp_path / "run", teacher_dir, corpus_file))
    steps = recipe.steps
    assert len(steps) == 6
    names = {n for n, _ in recipe.trainable_named_parameters()}
    adapters = [{n for n in names if n.startswith(f"student.adapters.{i}.")} for i in (0, 1)]
    projection = {n for n in names if n.startswith("loss.")}
    assert adapters[0] and adapters[1] and projection  # the tiny student is narrower: a projection trains

    for step in steps[0:2]:  # phase 1: iteration 1's adapters (3x) and the projection, nothing else
        assert step["trainable"] == adapters[0] | projection and step["changed"] <= step["trainable"]
        assert step["layers"] == [(1, 2)]
        a0 = next(iter(adapters[0]))
        assert step["lr"][a0] == pytest.approx(3 * step["lr"][next(iter(projection))])
    for step in steps[2:4]:  # phase 2: iteration 2 at 3x, iteration 1 at 0.3x; embeddings frozen
        assert step["trainable"] == adapters[0] | adapters[1] | projection
        assert step["changed"] <= step["trainable"]
        assert {"student.adapters.0.ffn_in.up.weight", "student.adapters.1.ffn_in.up.weight"} <= step["changed"]
        assert step["layers"] == [(2, 4)]
        a0, a1 = next(iter(adapters[0])), next(iter(adapters[1]))
        assert step["lr"][a1] == pytest.approx(10 * step["lr"][a0])
        assert step["lr"][a1] == pytest.approx(3 * step["lr"][next(iter(projection))])
    for step in steps[4:6]:  # pre-training distillation: everything trains, every pair, at 1x
        assert step["trainable"] == names
        assert {"student.embeddings.word_embeddings.weight", "student.layer.ffn_in.weight"} <= step["changed"]
        assert step["layers"] == [(1, 2), (2, 4)]
        assert len({round(lr, 12) for lr in step["lr"].values()}) == 1
    layerwise = {"loss/feature_map", "loss/attention", "loss/feature_mean", "loss/feature_variance"}
    assert all(layerwise <= set(s["metrics"]) and "loss/mlm" not in s["metrics"] for s in steps[:4])
    assert all(
        {"loss/mlm", "loss/output"} <= set(s["metrics"]) and "loss/feature_map" not in s["metrics"] for s in steps[4:]
    )
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")  # the resolved config lists every stage
    assert [s.name for s in saved.stages] == ["layer_1", "layer_2", "pretrain_distill"]


def test_per_stage_layer_selection_changes_the_loss(tmp_path, teacher_dir, corpus_file):
    """A stage covering only iteration 2 computes exactly that pair's share of the all-pairs loss."""
    losses = {}
    for layers in ([1], [2], None):
        cfg = tiny_config(tmp_path / f"run_{layers}", teacher_dir, corpus_file, max_steps=1, save_every_n_steps=None)
        cfg["loss"].update(layer_map=[2, 4], weights={"feature_map": 1.0})
        cfg["stages"] = [{"name": "only", "layers": layers, "trainable": ["student.adapters.*", "loss.*"]}]
        losses[str(layers)] = run(cfg).steps[0]["metrics"]["loss/feature_map"]
    assert losses["[1]"] != pytest.approx(losses["[2]"])
    assert losses["[1]"] + losses["[2]"] == pytest.approx(losses["None"], rel=1e-5)


def test_bad_progressive_settings_are_config_errors(tmp_path, teacher_dir, corpus_file):
    cfg = _progressive_config(tmp_path / "a", teacher_dir, corpus_file, layer_parameters="student.adapters.*")
    with pytest.raises(ConfigError, match="must contain '\\{index\\}'"):
        run(cfg)
    cfg = tiny_config(tmp_path / "b", teacher_dir, corpus_file, max_steps=2)
    cfg["stages"] = [{"name": "x", "layers": [3]}]
    with pytest.raises(ConfigError, match=r"layers \[3\] are not student layers of the layer map"):
        run(cfg)


def test_progressive_stages_as_data():
    stages = progressive_stages(3, 10, final_steps=5)
    assert [s["name"] for s in stages] == ["layer_1", "layer_2", "layer_3", "pretrain_distill"]
    assert stages[2]["trainable"] == ["student.blocks.0.*", "student.blocks.1.*", "student.blocks.2.*", "loss.*"]
    assert stages[2]["lr_scale"] == {"student.blocks.2.*": 3.0, "student.blocks.0.*": 0.3, "student.blocks.1.*": 0.3}
    assert stages[2]["layers"] == [3] and stages[3]["steps"] == 5
    assert stages[3]["loss_weights"] == {"mlm": 0.5, "output": 0.5}
    assert progressive_stages(2, 1, final_weights={})[-1]["name"] == "layer_2"
