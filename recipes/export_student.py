"""Export a distilled student as an int8 model for serving, without this library.

    tune run recipes/export_student.py --config configs/export_int8.yaml \
        checkpoint_dir=outputs/tiny_qat/student output_dir=outputs/tiny_qat/int8 [scheme=int8_weight requantize=true]

Writes, atomically (the folder appears whole or not at all), holding the output folder as every
recipe does (``components.training.run.claim_output_dir``: locked, writes confined to it):

    model.onnx     the quantised student for ONNX Runtime CPU serving
    model.pt2      a torch.export program of the quantised student (needs only torch)
    export.json    inputs, outputs, scheme, sizes, and the max difference of both files against
                   the fp32 student on a held-out batch
    tokenizer files

Any student folder this library writes works: one trained with quantisation-aware stages (the
scheme defaults to the one it trained for) or a plain fp32 one (post-training quantisation).
A QAT-trained student exported at another scheme or group size than it trained for is refused,
naming both, before anything is written, unless ``requantize=true`` asks for post-training
re-quantisation (then it exports with a warning).
"""

import itertools
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import DictConfig
from transformers import AutoTokenizer

from components.checkpointing import load_student, student_metadata
from components.checkpointing.student import METADATA_KEY
from components.config import check_config, config_section, parse
from components.data import load_documents
from components.errors import CheckpointError, ConfigError, ExportError, require
from components.io import atomic_directory, recover_interrupted_writes, set_write_root
from components.quantization import get_scheme, Scheme
from components.quantization.export import export_quantized, fp32_weight_bytes, heldout_batch
from components.smoke import stdlib_docstrings
from components.training.run import claim_output_dir, configure_logging
from components.training.schema import ExportConfig

log = logging.getLogger("export_student")
DEFAULT_SCHEME = "int8_dynamic"


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ExportError(f"output_dir {output_dir} is a file")
    if (output_dir / "export.json").is_file():
        if not overwrite:
            raise ExportError(f"output_dir {output_dir} already holds an export: pass overwrite=True to replace it")
    elif any(p.name != ".lock" for p in output_dir.iterdir()):
        raise ExportError(f"output_dir {output_dir} holds other files; choose a new or empty folder")


def _settings(name: str, group_size: Optional[int]) -> str:
    return f"{name} with group_size={group_size}" if group_size else name


def _choose_scheme(cfg: DictConfig, source: Path) -> Tuple[Scheme, Optional[dict]]:
    """(scheme to export at, what the student trained for or ``None``). A QAT-trained student
    exports at the scheme and group size it trained for; asking for others is refused unless
    ``requantize`` is set (post-training re-quantisation, with a warning)."""
    trained = student_metadata(str(source)).get("quantization_aware")
    if trained is not None and not isinstance(trained, dict):
        raise CheckpointError(
            f"{source / 'config.json'}: {METADATA_KEY}.quantization_aware must be a mapping, got {trained!r}"
        )
    name = cfg.scheme or (trained or {}).get("scheme") or DEFAULT_SCHEME
    group_size = cfg.group_size or (trained or {}).get("group_size")
    with config_section("scheme"):
        scheme = get_scheme(name, group_size)
    if not trained:
        return scheme, None
    try:  # the group size it trained with, as the scheme resolves it (None for int8 schemes)
        trained_group = get_scheme(trained.get("scheme"), trained.get("group_size")).group_size
    except (ValueError, TypeError):  # a scheme this version does not know: no match either
        trained_group = trained.get("group_size")
    was, asked = _settings(trained.get("scheme"), trained_group), _settings(scheme.name, scheme.group_size)
    if (trained.get("scheme"), trained_group) == (scheme.name, scheme.group_size):
        return scheme, trained
    keys = ", ".join(f"{k}={cfg[k]}" for k in ("scheme", "group_size") if cfg[k] is not None)
    if not cfg.requantize:
        raise ConfigError(
            f"{keys}: the student in {source} was trained quantisation-aware for {was} "
            f"({source / 'config.json'}: {METADATA_KEY}.quantization_aware), not for {asked}; exporting it at "
            "other settings quantises it post-training and drops what QAT trained it for. Pass requantize=true "
            "to re-quantise it anyway, or leave scheme and group_size null to export it as trained"
        )
    log.warning(
        "requantize=true: the student trained quantisation-aware for %s; exporting it as %s (post-training)", was, asked
    )
    return scheme, trained


def _heldout_texts(cfg: DictConfig, count: int) -> List[str]:
    if cfg.eval_source is None:
        # the end of the stream (the smoke corpus stops 1.5M characters in), read from the end
        return list(itertools.islice(stdlib_docstrings(max_chars=10**9, reverse=True), count))[::-1]
    with config_section("eval_source"):
        documents = load_documents(cfg.eval_source, text_column=cfg.eval_text_column)
    return documents.select(range(min(count, len(documents))))["text"]


def export(cfg: DictConfig) -> dict:
    cfg = check_config(cfg, ExportConfig)
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module)
    source, output_dir = Path(cfg.checkpoint_dir), Path(cfg.output_dir)
    scheme, trained = _choose_scheme(cfg, source)  # refusals first: nothing is written before them
    recover_interrupted_writes(output_dir.parent)  # what a killed export left beside output_dir
    _check_output_dir(output_dir, cfg.overwrite)
    student = load_student(str(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except Exception as e:
        raise CheckpointError(f"{source} holds no tokenizer the export can ship ({type(e).__name__}: {e})") from e

    log.info("Exporting %s as %s: %s", source, scheme.name, scheme.runtime)

    texts = _heldout_texts(cfg, cfg.eval_batch_size)
    if len(texts) < 2:
        raise ExportError(f"eval_source {cfg.eval_source} gave {len(texts)} texts; the held-out batch needs 2 or more")
    batch = heldout_batch(
        tokenizer, texts, cfg.eval_batch_size, min(cfg.eval_max_length, student.config["max_position_embeddings"])
    )

    # the folder is ours (a run's rules: locked, writes confined, leftovers cleaned) until the
    # new export replaces it whole
    lock = claim_output_dir(output_dir)
    try:
        _check_output_dir(output_dir, cfg.overwrite)  # again, now that no other process can write it
        with atomic_directory(output_dir, "export") as tmp:
            report = export_quantized(student, tmp, scheme, batch)
            tokenizer.save_pretrained(str(tmp))
            fp32_bytes = fp32_weight_bytes(student)
            sizes = {f: (tmp / f).stat().st_size for f in ("model.onnx", "model.pt2")}
            report = {
                "student": str(source),
                "scheme": scheme.name,
                "group_size": scheme.group_size,
                "runtime": scheme.runtime,
                "quantization_aware": trained,  # null: post-training quantisation
                **report,
                "bytes": {"fp32_weights": fp32_bytes, **sizes},
                "size_vs_fp32": {f: round(b / fp32_bytes, 4) for f, b in sizes.items()},
            }
            (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        lock.close()
        set_write_root(None)
    diffs = report["max_abs_diff_vs_fp32"]
    log.info(
        "Exported to %s: model.onnx %.2f MB (%.0f%% of fp32), model.pt2 %.2f MB; hidden-state cosine with fp32 %.4f (onnx)",
        output_dir,
        sizes["model.onnx"] / 1e6,
        100 * report["size_vs_fp32"]["model.onnx"],
        sizes["model.pt2"] / 1e6,
        diffs["model.onnx"]["hidden_cosine"],
    )
    return report


@parse
def recipe_main(cfg: DictConfig) -> None:
    configure_logging()
    export(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
