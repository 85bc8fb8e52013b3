"""Students and teachers against their reference implementations in transformers."""

import pytest
import torch
from transformers import AlbertForMaskedLM, BertForMaskedLM, BertModel, RobertaForMaskedLM

from components.checkpointing import CheckpointError, hf_teacher, load_student, save_student
from components.models import (
    FrozenTeacher,
    minialbert_128,
    minialbert_312,
    recursive_tiny,
    RecursiveEncoder,
)
from components.models.layers import attention_bias
from tests.helpers import make_hf_teacher

TOL = 1e-5


def no_head_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mlm_head"))


def batch(vocab=1000, pad_id=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = pad_id
    return ids, mask


def test_parameter_counts_match_the_paper():
    # MiniALBERT (arXiv 2210.06425), miniALBERT-128: 12.07M with adapters, 11.16M without;
    # the shared layer 7,087,872; 12 adapters of r=16, 912,960.
    student = minialbert_128()
    assert no_head_params(student) == 12_072_768
    assert no_head_params(minialbert_128(adapter_placement=None)) == 11_159_808
    assert sum(p.numel() for p in student.layer.parameters()) == 7_087_872
    assert sum(p.numel() for p in student.adapter_parameters()) == 912_960
    # E=312 with BioBERT's vocabulary: the paper's "17.5M"; no factorisation (E=768): 31.8M.
    assert no_head_params(minialbert_312()) == 17_448_960
    assert no_head_params(minialbert_128(embedding_size=768)) == 31_838_016


@pytest.mark.parametrize("tied", [False, True])
def test_adapter_free_student_is_albert(tmp_path, tied):
    torch.manual_seed(0)
    student = recursive_tiny(adapter_placement=None, tie_word_embeddings=tied).eval()
    assert save_student(student, tmp_path / "s") == "albert"
    albert = AlbertForMaskedLM.from_pretrained(str(tmp_path / "s"), attn_implementation="eager").eval()
    ids, mask = batch()
    ours = student(ids, mask, attention_layers={1, 2})
    theirs = albert(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    valid = mask.bool()
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert (a - b)[valid].abs().max() <= TOL
    assert (ours.logits - theirs.logits)[valid].abs().max() <= TOL
    for i in (1, 2):
        assert (ours.attentions[i] - theirs.attentions[i - 1]).abs().max() <= TOL
    # and our loader reads the ALBERT folder back
    reloaded = load_student(str(tmp_path / "s")).eval()
    assert torch.equal(reloaded(ids, mask, attention_layers={1, 2}).logits, ours.logits)


def test_headless_adapter_free_student_is_an_albert_model(tmp_path):
    """What hidden-state distillation from an embedding teacher produces: no MLM head."""
    from transformers import AlbertModel

    torch.manual_seed(0)
    student = recursive_tiny(adapter_placement=None, mlm_head=False).eval()
    assert save_student(student, tmp_path / "s") == "albert"
    albert = AlbertModel.from_pretrained(str(tmp_path / "s"), attn_implementation="eager").eval()
    ids, mask = batch()
    ours = student(ids, mask)
    theirs = albert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    valid = mask.bool()
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert (a - b)[valid].abs().max() <= TOL
    reloaded = load_student(str(tmp_path / "s"))
    assert reloaded.mlm_head is None
    assert torch.equal(reloaded.eval()(ids, mask).last_hidden_state, ours.last_hidden_state)
    # and an AlbertModel that transformers saved itself (no "albert." prefix, a pooler) reads too
    albert.save_pretrained(str(tmp_path / "hf"))
    again = load_student(str(tmp_path / "hf")).eval()
    assert again.mlm_head is None
    assert (again(ids, mask).last_hidden_state - ours.last_hidden_state)[valid].abs().max() <= TOL


@pytest.mark.parametrize("placement", ["minialbert", "houlsby", "pfeiffer"])
def test_student_with_adapters_round_trips_exactly(tmp_path, tokenizer, placement):
    torch.manual_seed(0)
    student = recursive_tiny(adapter_placement=placement, vocab_size=len(tokenizer)).eval()
    for p in student.adapter_parameters():  # make the adapters matter
        torch.nn.init.normal_(p, std=0.1)
    assert save_student(student, tmp_path / "s", tokenizer) == "native"
    assert (tmp_path / "s" / "tokenizer.json").is_file()
    reloaded = load_student(str(tmp_path / "s")).eval()
    assert reloaded.config == student.config
    for (k, a), (k2, b) in zip(student.state_dict().items(), reloaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    ids, mask = batch(len(tokenizer))
    assert torch.equal(reloaded(ids, mask).logits, student(ids, mask).logits)


def test_zero_initialised_houlsby_adapters_are_identities():
    torch.manual_seed(0)
    with_adapters = recursive_tiny(adapter_placement="houlsby").eval()
    plain = recursive_tiny(adapter_placement=None).eval()
    plain.load_state_dict({k: v for k, v in with_adapters.state_dict().items() if not k.startswith("adapters")})
    ids, mask = batch()
    assert torch.equal(with_adapters(ids, mask).logits, plain(ids, mask).logits)
    torch.nn.init.normal_(with_adapters.adapters[1]["ffn_out"].up.weight, std=0.1)
    assert not torch.allclose(with_adapters(ids, mask).logits, plain(ids, mask).logits)


def test_iteration_embeddings_start_as_the_plain_student_and_make_each_depth_differ(tmp_path, tokenizer):
    torch.manual_seed(0)
    embedded = recursive_tiny(adapter_placement=None, iteration_embeddings=True, vocab_size=len(tokenizer)).eval()
    plain = recursive_tiny(adapter_placement=None, vocab_size=len(tokenizer)).eval()
    plain.load_state_dict({k: v for k, v in embedded.state_dict().items() if k != "iteration_embeddings"})
    ids, mask = batch(len(tokenizer))
    assert torch.equal(embedded(ids, mask).logits, plain(ids, mask).logits)  # zeros: the same function
    # iteration i's input is the previous output plus vector i, by hand through the shared layer
    torch.nn.init.normal_(embedded.iteration_embeddings, std=0.5)
    out = embedded(ids, mask, return_logits=False)
    bias = attention_bias(mask, torch.float32)
    for i in range(1, embedded.num_iterations + 1):
        expected, _ = embedded.layer(out.hidden_states[i - 1] + embedded.iteration_embeddings[i - 1], bias, None, False)
        torch.testing.assert_close(out.hidden_states[i], expected, rtol=0, atol=0)
    assert not torch.allclose(out.hidden_states[-1], plain(ids, mask, return_logits=False).hidden_states[-1])
    # saved natively (no transformers format has them) and read back exactly
    assert save_student(embedded, tmp_path / "s", tokenizer) == "native"
    reloaded = load_student(str(tmp_path / "s")).eval()
    assert reloaded.config["iteration_embeddings"] is True
    assert torch.equal(reloaded(ids, mask).logits, embedded(ids, mask).logits)


def test_adapter_sites_per_placement():
    sites = {
        p: set(recursive_tiny(adapter_placement=p).adapters[0].keys()) for p in ("minialbert", "houlsby", "pfeiffer")
    }
    assert sites == {
        "minialbert": {"attention_in", "ffn_in"},
        "houlsby": {"attention_out", "ffn_out"},
        "pfeiffer": {"ffn_out"},
    }
    with pytest.raises(ValueError, match="Unknown adapter placement"):
        recursive_tiny(adapter_placement="lora")


def test_explicit_attention_path_matches_sdpa():
    torch.manual_seed(0)
    student = recursive_tiny().eval()
    ids, mask = batch()
    fast = student(ids, mask)
    explicit = student(ids, mask, attention_layers={1, 2})
    assert fast.attentions == {} and set(explicit.attentions) == {1, 2}
    for a, b in zip(fast.hidden_states, explicit.hidden_states):
        assert (a - b)[mask.bool()].abs().max() <= TOL
    probs = explicit.attentions[1]
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
    assert probs[1, :, :, 8:].abs().max() == 0  # padded keys get no attention


def test_logits_only_at_requested_positions():
    torch.manual_seed(0)
    student = recursive_tiny().eval()
    ids, mask = batch()
    where = torch.zeros_like(mask, dtype=torch.bool)
    where[0, 3] = where[2, 1] = True
    out = student(ids, mask, logits_mask=where)
    full = student(ids, mask).logits
    assert out.logits.shape == (2, 1000)
    assert torch.allclose(out.logits, full[where], atol=1e-6)
    assert student(ids, mask, return_logits=False).logits is None


@pytest.mark.parametrize("kind", ["bert", "roberta", "bert-no-head"])
def test_teacher_matches_transformers(tmp_path, tokenizer, kind):
    folder = make_hf_teacher(tmp_path / kind, tokenizer, kind=kind, layers=3)
    reference_class = {"bert": BertForMaskedLM, "roberta": RobertaForMaskedLM, "bert-no-head": BertModel}[kind]
    reference = reference_class.from_pretrained(str(folder), attn_implementation="eager").eval()
    teacher = hf_teacher(str(folder))
    assert isinstance(teacher, FrozenTeacher) and len(teacher.tokenizer) == len(tokenizer)
    assert teacher.spec.has_mlm_head == (kind != "bert-no-head")
    ids, mask = batch(len(tokenizer), pad_id=tokenizer.pad_token_id)
    ours = teacher(ids, mask, attention_layers={1, 3})
    theirs = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    valid = mask.bool()
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert (a - b)[valid].abs().max() <= TOL
    if kind != "bert-no-head":
        assert (ours.logits - theirs.logits)[valid].abs().max() <= TOL
    else:
        assert ours.logits is None
    # query rows of padding differ for RoBERTa (HF numbers pad positions differently); they
    # are masked out everywhere, so compare the rows of real tokens
    assert (ours.attentions[3] - theirs.attentions[2]).transpose(1, 2)[valid].abs().max() <= TOL


def test_teacher_is_frozen_and_its_outputs_train_a_student(teacher_dir):
    teacher = hf_teacher(str(teacher_dir))
    teacher.train()
    assert not teacher.encoder.training
    assert not any(p.requires_grad for p in teacher.parameters())
    ids, mask = batch(300)
    first = teacher(ids, mask)
    assert torch.equal(first.hidden_states[2], teacher(ids, mask).hidden_states[2])  # no dropout
    assert not first.hidden_states[2].requires_grad
    student_hidden = torch.randn_like(first.hidden_states[2], requires_grad=True)
    torch.nn.functional.cosine_similarity(student_hidden, first.hidden_states[2], dim=-1).sum().backward()
    assert student_hidden.grad is not None


def test_teacher_errors_name_what_is_wrong(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="Checkpoint folder not found: ./nowhere"):
        hf_teacher("./nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        hf_teacher(str(empty))
    folder = make_hf_teacher(tmp_path / "t", tokenizer, layers=2)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="No weights in"):
        hf_teacher(str(folder))
    albert = tmp_path / "albert"
    save_student(recursive_tiny(adapter_placement=None), albert)
    with pytest.raises(CheckpointError, match="model_type 'albert' is not supported as a teacher"):
        hf_teacher(str(albert))
    with pytest.raises(CheckpointError, match="not a local folder, and fetching it from the Hugging Face Hub failed"):
        hf_teacher("no-such-model-id")


def test_student_loader_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_student(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a student"):
        load_student(str(tmp_path))


def test_builder_signature_lists_every_argument():
    import inspect

    params = inspect.signature(minialbert_128).parameters
    assert params["embedding_size"].default == 128 and params["num_iterations"].default == 6
    assert set(params) == set(inspect.signature(RecursiveEncoder).parameters)
    assert minialbert_128(num_iterations=2, vocab_size=50).num_iterations == 2


def _grads(model, ids, mask):
    model.zero_grad()
    out = model(ids, mask, attention_layers={1, 2})
    (out.logits.square().mean() + sum(a.square().sum() for a in out.attentions.values())).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["recursive", "bert"])
def test_activation_checkpointing_gives_the_same_gradients(family):
    from components.models.bert import BertEncoder

    torch.manual_seed(0)
    if family == "recursive":
        student = recursive_tiny(dropout=0.0, attention_dropout=0.0)
    else:  # an untied student (every layer its own)
        student = BertEncoder(1000, 64, 2, 4, 128, dropout=0.0, attention_dropout=0.0, max_position_embeddings=64)
    ids, mask = batch()
    plain = _grads(student, ids, mask)
    student.activation_checkpointing = True
    checkpointed = _grads(student, ids, mask)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


@pytest.mark.slow  # torch.compile (inductor builds C++ kernels)
def test_compiled_student_matches_eager():
    torch.manual_seed(0)
    student = recursive_tiny(dropout=0.0, attention_dropout=0.0)
    ids, mask = batch()
    eager = _grads(student, ids, mask)
    student.compile(dynamic=True)
    compiled = _grads(student, ids, mask)
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], rtol=1e-4, atol=1e-6), name


def test_adapters_can_be_added_to_a_saved_adapter_free_student(tmp_path):
    torch.manual_seed(0)
    plain = recursive_tiny(adapter_placement=None).eval()
    save_student(plain, tmp_path / "albert")
    with_adapters = load_student(str(tmp_path / "albert"), adapter_placement="houlsby").eval()
    assert with_adapters.adapters is not None
    ids, mask = batch()
    assert torch.allclose(with_adapters(ids, mask).logits, plain(ids, mask).logits, atol=1e-6)  # identities at start


def test_bf16_teacher_is_close_to_fp32(teacher_dir):
    full, half = hf_teacher(str(teacher_dir)), hf_teacher(str(teacher_dir), dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16
    ids, mask = batch(300)
    a, b = full(ids, mask, attention_layers={2}), half(ids, mask, attention_layers={2})
    assert b.attentions[2].dtype == torch.float32  # probabilities stay fp32
    assert torch.allclose(a.logits, b.logits.float(), atol=0.1)
    assert (a.attentions[2] - b.attentions[2]).abs().max() < 0.02
    with pytest.raises(ValueError, match="teacher dtype must be one of"):
        hf_teacher(str(teacher_dir), dtype="fp16")


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about():
    from components.training.parallel import bf16_cpu_warning, cpu_has_native_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    message = bf16_cpu_warning(cpu, ["teacher.dtype=bf16"], native=False)
    assert (
        message.startswith("teacher.dtype=bf16 on a CPU without bf16 instructions")
        and "Use fp32 or dtype=auto here" in message
    )
    assert bf16_cpu_warning(cpu, ["dtype=bf16", "teacher.dtype=bf16"], native=False).startswith(
        "dtype=bf16 and teacher.dtype=bf16"
    )
    assert bf16_cpu_warning(cpu, ["teacher.dtype=bf16"], native=True) is None
    assert bf16_cpu_warning(cpu, ["teacher.dtype=bf16"], native=None) is None or cpu_has_native_bf16() is False
    assert bf16_cpu_warning(cuda, ["teacher.dtype=bf16"], native=False) is None
    assert bf16_cpu_warning(cpu, [], native=False) is None


CPUINFO = {  # the line of /proc/cpuinfo that tells, as each kind of CPU writes it
    "avx2": "flags\t\t: fpu sse4_2 avx avx2 fma",
    "avx512-vnni": "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni",
    "zen4": "flags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16",
    "sapphire-rapids": "flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8",
    "arm-neoverse-n1": "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp",
    "arm-neoverse-v1": "Features\t: fp asimd sve svebf16 i8mm bf16",
}


@pytest.mark.parametrize(
    "cpu, native",
    [
        ("avx2", False),
        ("avx512-vnni", False),
        ("zen4", True),
        ("sapphire-rapids", True),
        ("arm-neoverse-n1", False),
        ("arm-neoverse-v1", True),
        ("no-flags-line", None),
        ("no-cpuinfo", None),
    ],
)
def test_dtype_auto_is_bf16_exactly_where_the_cpu_computes_it(tmp_path, monkeypatch, cpu, native):
    import components.training.parallel as parallel

    cpuinfo = tmp_path / "cpuinfo"
    if cpu != "no-cpuinfo":
        line = CPUINFO.get(cpu, "model name\t: ?")
        cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: x\n{line}\n\nprocessor\t: 1\n{line}\n")
    real = parallel.cpu_has_native_bf16
    assert real(str(cpuinfo)) is native
    monkeypatch.setattr(parallel, "cpu_has_native_bf16", lambda: real(str(cpuinfo)))
    cpu_device = torch.device("cpu")
    bf16, why = parallel.resolve_dtype("auto", cpu_device)
    assert bf16 is bool(native)
    assert why.startswith(f"dtype=auto: {'bf16' if native else 'fp32'}, this CPU")
    # explicit choices are taken as given, whatever the CPU
    assert parallel.resolve_dtype("fp32", cpu_device) == (False, "dtype=fp32")
    assert parallel.resolve_dtype("bf16", cpu_device) == (True, "dtype=bf16")


def test_dtype_auto_on_cuda_follows_the_device(monkeypatch):
    from components.errors import ConfigError
    from components.training.parallel import resolve_dtype

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
        bf16, why = resolve_dtype("auto", cuda, cpu_native=not supported)  # the CPU does not matter
        assert bf16 is supported and "Fake GPU" in why
        assert resolve_dtype("fp32", cuda) == (False, "dtype=fp32")
    with pytest.raises(ConfigError, match="dtype=bf16 but Fake GPU does not support bf16"):
        resolve_dtype("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("bf16", cuda) == (True, "dtype=bf16")
    assert resolve_dtype("auto", torch.device("meta")) == (False, "dtype=auto: fp32 on meta")


@pytest.mark.parametrize("native", [False, True])
def test_the_recipes_log_what_dtype_auto_chose(tmp_path, teacher_dir, corpus_file, monkeypatch, caplog, native):
    from omegaconf import OmegaConf

    import components.training.parallel as parallel
    from recipes.distill_recursive import DistillRecursiveRecipe
    from tests.recipe_helpers import tiny_config

    monkeypatch.setattr(parallel, "cpu_has_native_bf16", lambda: native)
    cfg = tiny_config(tmp_path / "run", teacher_dir, corpus_file, max_steps=1, dtype="auto")
    recipe = DistillRecursiveRecipe(OmegaConf.create(cfg))
    with caplog.at_level("INFO"):
        recipe.setup()
    try:
        assert recipe.bf16 is native
        assert f"Compute dtype: dtype=auto: {'bf16' if native else 'fp32'}, this CPU" in caplog.text
        with recipe.autocast():  # what every forward of the run is wrapped in
            assert torch.is_autocast_enabled("cpu") is native
    finally:
        recipe.cleanup()


def test_the_recipe_warns_about_a_bf16_teacher_on_such_a_cpu(tmp_path, teacher_dir, corpus_file, monkeypatch, caplog):
    import components.training.parallel as distributed
    from tests.recipe_helpers import run_recipe, tiny_config

    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    cfg = tiny_config(
        tmp_path / "run", teacher_dir, corpus_file, max_steps=1, **{"teacher.dtype": "bf16", "data.eval_fraction": 0.0}
    )
    with caplog.at_level("WARNING"):
        run_recipe(cfg)
    assert "teacher.dtype=bf16 on a CPU without bf16 instructions" in caplog.text


def test_init_from_teacher_copies_a_layer_and_factorises_the_embeddings(teacher_dir):
    from components.errors import ConfigError
    from components.models.student import init_from_teacher

    teacher = hf_teacher(str(teacher_dir)).encoder
    h = teacher.config["hidden_size"]
    student = recursive_tiny(
        adapter_placement=None,
        vocab_size=teacher.config["vocab_size"],
        hidden_size=h,
        num_heads=teacher.config["num_heads"],
        intermediate_size=teacher.config["intermediate_size"],
        embedding_size=h // 2,
        max_position_embeddings=teacher.config["max_position_embeddings"],
    )
    done = init_from_teacher(student, teacher, layer=2, embeddings=True)
    assert len(done) == 2
    for k, v in teacher.layers[1].state_dict().items():
        assert torch.equal(student.layer.state_dict()[k], v), k
    # the stacked tables are rebuilt as well as a rank-E factorisation can (Eckart-Young)
    names = ["word_embeddings", "position_embeddings", "token_type_embeddings"]
    theirs = torch.cat([getattr(teacher.embeddings, n).weight for n in names])
    rebuilt = torch.cat([getattr(student.embeddings, n).weight for n in names]) @ student.projector.weight.T
    tail = torch.linalg.svdvals(theirs)[h // 2 :]
    assert torch.linalg.norm(rebuilt - theirs).item() == pytest.approx(tail.square().sum().sqrt().item(), rel=1e-3)
    assert torch.linalg.norm(rebuilt - theirs) < 0.9 * torch.linalg.norm(theirs)
    n = len(teacher.layers)
    with pytest.raises(ConfigError, match=f"the teacher has layers 1..{n}"):
        init_from_teacher(student, teacher, layer=n + 1)
    narrow = recursive_tiny(adapter_placement=None, vocab_size=teacher.config["vocab_size"], hidden_size=h * 2)
    with pytest.raises(ConfigError, match="shapes differ from teacher layer 1"):
        init_from_teacher(narrow, teacher, layer=1)
