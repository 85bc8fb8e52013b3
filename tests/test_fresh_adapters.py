"""Fresh adapters: tuning=adapters on a model without any (an adapter-free student, a BERT
checkpoint) adds identity adapters, trains them with the head, and saves an adapter set that
MultiTaskModel puts back onto the bare base, beside head-only sets."""

import itertools
import json
import shutil

import pytest
import torch

from components.checkpointing import save_student
from components.checkpointing.finetuned import base_fingerprint, load_encoder, load_task_model, save_task_model
from components.checkpointing.resume import load_checkpoint
from components.errors import CheckpointError, ConfigError
from components.inference import MultiTaskModel
from components.models import add_adapters, BertEncoder, bottleneck_tiny, recursive_tiny, RecursiveEncoder
from components.models.heads import TaskModel
from components.smoke.tasks import smoke_task
from tests.test_finetune import finetune_config, read_predictions, run_finetune


def _tiny_bert(**kwargs):
    return BertEncoder(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, **kwargs)


def _tiny_student(**kwargs):
    return RecursiveEncoder(
        vocab_size=50,
        embedding_size=16,
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        num_iterations=3,
        adapter_placement=None,
        **kwargs,
    )


@pytest.mark.parametrize("build", [_tiny_bert, _tiny_student])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_fresh_adapters_are_exact_identities_and_rebuild_from_the_config(build, placement):
    torch.manual_seed(0)
    encoder = build().eval()
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    before = encoder(ids, mask, attention_layers=(1, 2))
    add_adapters(encoder, placement, reduction_factor=8)
    after = encoder.eval()(ids, mask, attention_layers=(1, 2))
    assert len(encoder.adapters) == encoder.spec.num_layers  # one set per layer (iteration)
    for a, b in zip(before.hidden_states, after.hidden_states):
        assert torch.equal(a, b)  # x + up(act(down x)) with up = 0 is exactly x
    assert all(torch.equal(before.attentions[i], after.attentions[i]) for i in (1, 2))
    assert torch.equal(before.logits, after.logits)
    assert encoder.config["adapter_placement"] == placement and encoder.config["adapter_reduction_factor"] == 8
    rebuilt = type(encoder)(**encoder.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in encoder.state_dict().items()
    }
    assert {n for n, _ in encoder.named_parameters() if "adapters." in n} == {
        f"adapters.{n}" for n, _ in encoder.adapters.named_parameters()
    }
    assert sum(p.numel() for p in encoder.adapter_parameters()) > 0


def test_add_adapters_refuses_what_would_not_be_an_identity():
    with pytest.raises(ValueError, match="must start as the identity.*LayerNorm"):
        add_adapters(_tiny_bert(), "minialbert")
    with pytest.raises(ValueError, match="already has minialbert adapters"):
        add_adapters(RecursiveEncoder(50, 16, 32, 4, 64, 2), "houlsby")  # MiniALBERT's own
    with pytest.raises(ValueError, match="BottleneckEncoder has no adapter sites"):
        add_adapters(bottleneck_tiny(vocab_size=50), "houlsby")
    with pytest.raises(ValueError, match="does not divide hidden_size 32"):
        add_adapters(_tiny_bert(), "houlsby", 5)


@pytest.mark.parametrize("build", [_tiny_bert, _tiny_student])
def test_a_full_model_with_added_adapters_reloads_with_equal_outputs(build, tmp_path):
    torch.manual_seed(0)
    encoder = build(dropout=0.0, attention_dropout=0.0)
    add_adapters(encoder, "houlsby", 4)
    with torch.no_grad():
        for p in encoder.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # trained adapters, not identities
    model = TaskModel(encoder, "classification", 3, dropout=0.0).eval()
    save_task_model(model, tmp_path / "model", {"type": "classification", "label_names": ["a", "b", "c"]})
    loaded, _ = load_task_model(str(tmp_path / "model"))
    assert loaded.encoder.config["adapter_placement"] == "houlsby"
    ids = torch.randint(1, 50, (2, 7))
    assert torch.equal(loaded(ids), model(ids))
    from transformers import AutoModelForSequenceClassification  # the Auto class rebuilds them too

    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(auto(input_ids=ids).logits, model(ids), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ through the recipe
@pytest.fixture(scope="module")
def stsb(tmp_path_factory):
    """The smoke STS-B task (regression: predictions written with 6 digits show any change)."""
    return smoke_task(str(tmp_path_factory.mktemp("tasks")), "stsb")


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tokenizer, teacher_dir):
    """Two adapter-free bases: a tiny recursive student (written as ALBERT) and a BERT checkpoint."""
    torch.manual_seed(0)
    student = recursive_tiny(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        adapter_placement=None,
        max_position_embeddings=80,
    )
    folder = tmp_path_factory.mktemp("albert") / "student"
    save_student(student, folder, tokenizer)
    return {"student": folder, "bert": teacher_dir}


def _validation_inputs(stsb):
    return [(row["sentence1"], row["sentence2"]) for row in map(json.loads, open(stsb["validation"]))]


@pytest.mark.parametrize("kind", ["student", "bert"])
def test_adapter_tuning_adds_fresh_adapters_and_the_set_goes_back_on_the_bare_base(kind, bases, stsb, tmp_path):
    base = bases[kind]
    adapters, head = tmp_path / "adapters", tmp_path / "head"
    common = dict(kind="stsb", max_steps=6, eval_every_n_steps=3, adapters={"reduction_factor": 8})
    recipe = run_finetune(finetune_config(adapters, base, stsb, tuning="adapters", **common))
    run_finetune(finetune_config(head, base, stsb, tuning="head", **common))

    # only the fresh adapters and the head trained; every base tensor is bit-identical
    bare, _ = load_encoder(str(base))
    assert bare.adapters is None
    after = load_checkpoint(adapters / "checkpoints" / "step_00000006")["model"]
    for name, tensor in bare.state_dict().items():
        assert torch.equal(after[f"encoder.{name}"], tensor), name
    fresh = [n for n in after if n.startswith("encoder.adapters.")]
    assert fresh and all(n.startswith(("encoder.adapters.", "head.")) for n, _ in recipe.trained)
    assert sorted(n for n, _ in recipe.trained) == sorted(fresh + [n for n in after if n.startswith("head.")])
    assert all(after[n].abs().max() > 0 for n in fresh if n.endswith("up.weight"))  # trained from 0

    # the set says it adds them, and names the base as it is on disk
    manifest = json.loads((adapters / "adapter_set" / "adapter_set.json").read_text())
    assert manifest["base"]["adds_adapters"] == {"placement": "houlsby", "reduction_factor": 8}
    assert manifest["base"]["sha256"] == base_fingerprint(bare.state_dict())
    assert manifest["encoder"]["config"]["adapter_placement"] == "houlsby"
    assert manifest["base_bytes"] == sum(t.numel() * t.element_size() for t in bare.state_dict().values())
    head_manifest = json.loads((head / "adapter_set" / "adapter_set.json").read_text())
    assert (
        "adds_adapters" not in head_manifest["base"] and head_manifest["base"]["sha256"] == manifest["base"]["sha256"]
    )

    # both sets on the one bare base, in either order, predict what their runs wrote
    inputs = _validation_inputs(stsb)
    expected = {
        name: [read_predictions(folder / "predictions" / "validation.tsv")[i] for i in range(len(inputs))]
        for name, folder in (("adapters", adapters), ("head", head))
    }
    for order in itertools.permutations(expected):
        model = MultiTaskModel(str(base))
        for name in order:
            model.add(name, str(tmp_path / name / "adapter_set"))
        for name in (*order, *order):
            got = [f"{g:.6g}" for g in model.predict(name, inputs, batch_size=64)]  # the runs' batches
            assert got == expected[name], (order, name)

    # a set adding other adapters to the same base is refused, naming both
    other = tmp_path / "pfeiffer"
    shutil.copytree(adapters / "adapter_set", other)
    manifest["base"]["adds_adapters"] = {"placement": "pfeiffer", "reduction_factor": 8}
    (other / "adapter_set.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"adds pfeiffer adapters .* added houlsby adapters .* the same ones"):
        model.add("other", str(other))
    assert "other" not in model.tasks


def test_tuning_full_or_head_adds_nothing_and_a_bottleneck_student_is_refused(bases, stsb, tmp_path, tokenizer):
    base = bases["student"]
    run_finetune(finetune_config(tmp_path / "full", base, stsb, "stsb", tuning="full", max_steps=2))
    config = json.loads((tmp_path / "full" / "model" / "config.json").read_text())
    assert config["encoder"]["config"]["adapter_placement"] is None
    model, _ = load_task_model(str(tmp_path / "full" / "model"))
    assert model.encoder.adapters is None

    folder = tmp_path / "mobilebert"
    save_student(bottleneck_tiny(vocab_size=len(tokenizer), max_position_embeddings=80), folder, tokenizer)
    with pytest.raises(
        ConfigError, match="tuning=adapters but .* has no adapters and a BottleneckEncoder has no sites"
    ):
        run_finetune(finetune_config(tmp_path / "b", folder, stsb, "stsb"))
    with pytest.raises(ConfigError, match=r"^adapters: adapter reduction_factor 5 does not divide hidden_size 64"):
        run_finetune(finetune_config(tmp_path / "c", base, stsb, "stsb", adapters={"reduction_factor": 5}))
    with pytest.raises(ConfigError, match="adapters.placement"):
        run_finetune(finetune_config(tmp_path / "d", base, stsb, "stsb", adapters={"placement": "minialbert"}))
