"""Export a distilled student as an int8 model for serving, without this library.

    tune run recipes/export_student.py --config configs/export_int8.yaml \
        checkpoint_dir=outputs/tiny_qat/student output_dir=outputs/tiny_qat/int8 [scheme=int8_weight]

Writes, atomically (the folder appears whole or not at all):

    model.onnx     the quantised student for ONNX Runtime CPU serving
    model.pt2      a torch.export program of the quantised student (needs only torch)
    export.json    inputs, outputs, scheme, sizes, and the max difference of both files against
                   the fp32 student on a held-out batch
    tokenizer files

Any student folder this library writes works: one trained with quantisation-aware stages (the
scheme defaults to the one it trained for) or a plain fp32 one (post-training quantisation).
"""

import json
import logging
import sys
from pathlib import Path
from typing import List

from omegaconf import DictConfig

from components.checkpointing import load_student, student_metadata
from components.checkpointing.io import atomic_directory, recover_interrupted_writes
from components.errors import CheckpointError, ExportError, require
from components.quantization import get_scheme
from components.quantization.export import export_quantized, fp32_weight_bytes, heldout_batch
from components.training.config import check_config, config_section, parse
from components.training.run import configure_logging
from components.training.schema import ExportConfig

log = logging.getLogger("export_student")
DEFAULT_SCHEME = "int8_dynamic"


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    recover_interrupted_writes(output_dir.parent)
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ExportError(f"output_dir {output_dir} is a file")
    if (output_dir / "export.json").is_file():
        if not overwrite:
            raise ExportError(f"output_dir {output_dir} already holds an export: pass overwrite=True to replace it")
    elif any(output_dir.iterdir()):
        raise ExportError(f"output_dir {output_dir} holds other files; choose a new or empty folder")


def _heldout_texts(cfg: DictConfig, count: int) -> List[str]:
    if cfg.eval_source is None:
        from components.smoke import stdlib_docstrings

        # the end of the stream: the smoke corpus stops 1.5M characters in
        return list(stdlib_docstrings(max_chars=10**9))[-count:]
    from components.data import load_documents

    with config_section("eval_source"):
        documents = load_documents(cfg.eval_source, text_column=cfg.eval_text_column)
    return documents.select(range(min(count, len(documents))))["text"]


def export(cfg: DictConfig) -> dict:
    cfg = check_config(cfg, ExportConfig)
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module)
    from transformers import AutoTokenizer

    source, output_dir = Path(cfg.checkpoint_dir), Path(cfg.output_dir)
    _check_output_dir(output_dir, cfg.overwrite)
    student = load_student(str(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except Exception as e:
        raise CheckpointError(f"{source} holds no tokenizer the export can ship ({type(e).__name__}: {e})") from e

    trained = student_metadata(str(source)).get("quantization_aware")
    name = cfg.scheme or (trained or {}).get("scheme") or DEFAULT_SCHEME
    group_size = cfg.group_size or (trained or {}).get("group_size")
    with config_section("scheme"):
        scheme = get_scheme(name, group_size)
    if trained and trained.get("scheme") != scheme.name:
        log.warning("The student trained for %s; exporting it as %s (post-training)", trained["scheme"], scheme.name)
    log.info("Exporting %s as %s: %s", source, scheme.name, scheme.runtime)

    texts = _heldout_texts(cfg, cfg.eval_batch_size)
    if len(texts) < 2:
        raise ExportError(f"eval_source {cfg.eval_source} gave {len(texts)} texts; the held-out batch needs 2 or more")
    batch = heldout_batch(tokenizer, texts, cfg.eval_batch_size, min(cfg.eval_max_length, student.config["max_position_embeddings"]))

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
