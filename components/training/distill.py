"""What one distillation step and one evaluation do, shared by the single-device and the
distributed recipes (which differ in how counts, metrics and gradients are summed over ranks:
see components.training.parallel)."""

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from components.data.mlm import GlobalBatchSampler, MLMMasker, pad_batch, round_up, step_generator
from components.errors import NonFiniteLossError
from components.losses.distillation import DistillationLoss, LossOutput, segment_means
from components.training.parallel import clip_gradients

# Sums a tensor over ranks (identity on one device).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class MaskedBatch:
    input_ids: torch.Tensor  # after masking
    attention_mask: torch.Tensor
    labels: torch.Tensor  # original token at masked positions, -100 elsewhere
    segment_ids: Optional[torch.Tensor] = None  # packed rows only (see pack_batch)

    def to(self, device: torch.device) -> "MaskedBatch":
        return MaskedBatch(*(None if t is None else t.to(device, non_blocking=True) for t in self.tensors()))

    def tensors(self):
        return self.input_ids, self.attention_mask, self.labels, self.segment_ids

    @property
    def masked_positions(self) -> torch.Tensor:
        return self.labels != -100

    @property
    def num_sequences(self) -> int:
        """Sequences in the batch: the rows holding tokens, or the packed sequences of each row."""
        if self.segment_ids is None:
            return int((self.attention_mask.sum(1) > 0).sum())
        return int(self.segment_ids.max(1).values.sum())


def pack_batch(batch: MaskedBatch, pad_token_id: int) -> MaskedBatch:
    """The same sequences in fewer rows: each padded row's tokens are placed, longest first, in
    the first row with room (first-fit decreasing; rows as long as the batch's). ``segment_ids``
    number the sequences of each row, and the encoders then attend within a sequence and restart
    positions with each, so every token's outputs, and every loss term, are those of the padded
    batch (up to float rounding; MiniALBERT's attention_reduction="element" divides by the row
    length and is refused with packing). For batches of short sentences this removes most padding:
    32 sentences of median length 25 padded to 64 fill about 14 packed rows instead of 32."""
    lengths = batch.attention_mask.sum(1).tolist()
    width = batch.input_ids.shape[1]
    rows: List[List[int]] = []  # the sequences (batch rows) of each packed row
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=batch.input_ids.dtype)
    attention_mask = torch.zeros(shape, dtype=batch.attention_mask.dtype)
    labels = torch.full(shape, -100, dtype=batch.labels.dtype)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for k, i in enumerate(members, start=1):
            n = lengths[i]
            input_ids[r, start : start + n] = batch.input_ids[i, :n]
            labels[r, start : start + n] = batch.labels[i, :n]
            attention_mask[r, start : start + n] = 1
            segment_ids[r, start : start + n] = k
            start += n
    return MaskedBatch(input_ids, attention_mask, labels, segment_ids)


def step_batches(
    windows,
    sampler: GlobalBatchSampler,
    masker: MLMMasker,
    step: int,
    seed: int,
    pad_token_id: int,
    max_length: int,
    pad_to_multiple_of: int = 8,
    pack: bool = False,
) -> List[MaskedBatch]:
    """This rank's masked micro-batches for optimizer step ``step`` (see ``components.data.mlm``),
    each packed (``pack_batch``) when ``pack``; masking happens before packing, so both
    layouts hold the same masked tokens."""
    noise = masker.noise(sampler.global_batch, round_up(max_length, pad_to_multiple_of), step_generator(seed, step))
    batches, row = [], sampler.row_offset()
    for indices in sampler.next_step():
        padded = pad_batch(windows[indices]["input_ids"], pad_token_id, pad_to_multiple_of, max_length)
        length = padded["input_ids"].shape[1]
        inputs, labels = masker(
            padded["input_ids"], padded["attention_mask"], noise.rows(row, row + len(indices), length)
        )
        batch = MaskedBatch(inputs, padded["attention_mask"], labels)
        batches.append(pack_batch(batch, pad_token_id) if pack else batch)
        row += len(indices)
    return batches


def distill_forward(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    loss_fn: DistillationLoss,
    batch: MaskedBatch,
    num_masked: Optional[float] = None,
    num_tokens: Optional[float] = None,
    num_sequences: Optional[float] = None,
) -> LossOutput:
    """Teacher and student forward on one micro-batch, and the loss terms, asking each encoder
    only for what the active terms read."""
    masked = batch.masked_positions
    packed = {} if batch.segment_ids is None else {"segment_ids": batch.segment_ids}
    teacher_out = teacher(
        batch.input_ids,
        batch.attention_mask,
        attention_layers=loss_fn.teacher_attention_layers(),
        logits_mask=masked,
        return_logits=loss_fn.needs_teacher_logits,
        **packed,
    )
    student_out = student(
        batch.input_ids,
        batch.attention_mask,
        attention_layers=loss_fn.student_attention_layers(),
        logits_mask=masked,
        return_logits=loss_fn.needs_student_logits,
        **packed,
    )
    return loss_fn(
        student_out,
        teacher_out,
        batch.labels,
        batch.attention_mask,
        num_masked,
        num_tokens,
        segment_ids=batch.segment_ids,
        num_sequences=num_sequences,
    )


@dataclass
class StepResult:
    terms: Dict[str, float]  # every loss term of the step (summed over ranks), "total" included
    grad_norm: float  # before clipping
    tokens: float  # non-padding tokens of the step, all ranks
    stop: bool  # some rank asked to stop


def distill_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    loss_fn: DistillationLoss,
    batches: Sequence[MaskedBatch],
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    parallel,
    *,
    step: int,
    max_norm: Optional[float] = None,
    autocast=contextlib.nullcontext,
    stop: bool = False,
) -> StepResult:
    """One optimizer step over this rank's micro-batches: what the recipes, the tests and the
    benchmarks all run. Gradients synchronise on the last micro-batch; the loss terms are summed
    over ranks and checked before anything is applied (``NonFiniteLossError`` names the
    1-based ``step + 1``); then clipping at ``max_norm`` (none when ``None``) and the optimizer
    step. ``stop`` (this rank wants to stop) rides along with the loss reduction, so that every
    rank learns whether any asked. ``parallel`` is a SingleDevice or DataParallel."""
    device = parallel.device
    num_masked, num_tokens, num_sequences = count_tokens(batches, parallel.reduce_sum).tolist()
    totals: Dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        parallel.set_gradient_sync(student, i == len(batches) - 1)
        with autocast():
            out = distill_forward(student, teacher, loss_fn, batch.to(device), num_masked, num_tokens, num_sequences)
        (out.total * parallel.loss_scale).backward()
        for name, value in [("total", out.total), *out.terms.items()]:
            totals[name] = totals.get(name, 0.0) + value.detach().float()
    parallel.sync_gradients(params)
    # every rank's terms are shares of the global means: their sum is the step's loss
    names = list(totals)
    summed = parallel.reduce_sum(
        torch.stack([totals[n] for n in names] + [torch.tensor(float(stop), device=device)])
    ).tolist()
    values = dict(zip(names, summed[:-1]))
    check_finite(values["total"], step + 1, "loss", values)
    grad_norm = clip_gradients(params, max_norm or float("inf"))
    check_finite(grad_norm, step + 1, "gradient norm", values)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(values, float(grad_norm), num_tokens, summed[-1] > 0)


def check_finite(value, step: int, what: str, terms: Dict[str, float]) -> None:
    if not math.isfinite(float(value)):
        detail = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise NonFiniteLossError(f"The {what} became {float(value)} at step {step} ({detail})")


class Evaluator:
    """Held-out metrics: the student's MLM loss and accuracy, the teacher's for reference, the
    cosine of each mapped student iteration with its teacher layer, and of the sequences' mean
    last hidden states (``sentence_cosine``, what sentence-embedding users compare). The held-out batches
    are masked once, so every evaluation scores the same predictions."""

    def __init__(
        self,
        windows,
        masker: MLMMasker,
        batch_size: int,
        pad_token_id: int,
        seed: int,
        pad_to_multiple_of: int = 8,
        max_length: Optional[int] = None,
        world_size: int = 1,
        rank: int = 0,
    ):
        self.batches: List[MaskedBatch] = []
        # each rank an equal share (sharded teachers need every rank to run the same batches)
        usable = len(windows) - len(windows) % world_size
        indices = list(range(rank, usable, world_size))
        for b, start in enumerate(range(0, len(indices), batch_size)):
            chunk = indices[start : start + batch_size]
            padded = pad_batch(windows[chunk]["input_ids"], pad_token_id, pad_to_multiple_of, max_length)
            rows, length = padded["input_ids"].shape
            noise = masker.noise(rows, length, step_generator(seed, b * world_size + rank, 2))
            inputs, labels = masker(padded["input_ids"], padded["attention_mask"], noise)
            self.batches.append(MaskedBatch(inputs, padded["attention_mask"], labels))

    @torch.no_grad()
    def __call__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        loss_fn: DistillationLoss,
        device: torch.device,
        autocast,
        reduce: Reduce = no_reduce,
        progress: bool = False,
    ) -> Dict[str, float]:
        """The held-out metrics; ``progress`` shows a bar over the batches."""
        was_training = student.training
        student.eval()
        sums: Dict[str, torch.Tensor] = {}

        def add(name: str, value) -> None:
            sums[name] = sums.get(name, torch.zeros((), dtype=torch.float64, device=device)) + value

        for batch in tqdm(self.batches, desc="eval", leave=False, dynamic_ncols=True, disable=not progress):
            batch = batch.to(device)
            masked = batch.masked_positions
            labels = batch.labels[masked]
            mask = batch.attention_mask.bool()
            with autocast():
                t_out = teacher(batch.input_ids, batch.attention_mask, logits_mask=masked)
                s_out = student(batch.input_ids, batch.attention_mask, logits_mask=masked)
            add("masked", labels.numel())
            add("tokens", mask.sum())
            for who, out in (("student", s_out), ("teacher", t_out)):
                if out.logits is not None:
                    logits = out.logits.float()
                    add(f"{who}_loss", torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                    add(f"{who}_correct", (logits.argmax(-1) == labels).sum())
            for s, t in loss_fn.layer_map:
                student_hidden = loss_fn.project(s_out.hidden_states[s].float(), s)
                cos = torch.nn.functional.cosine_similarity(
                    student_hidden[mask], t_out.hidden_states[t].float()[mask], dim=-1
                )
                add(f"cos_{s}", cos.sum())
            # what sentence-embedding users consume: the mean-pooled last layers
            pooled_s, rows = segment_means(
                loss_fn.project(s_out.hidden_states[-1].float(), len(s_out.hidden_states) - 1), batch.attention_mask
            )
            pooled_t, _ = segment_means(t_out.hidden_states[-1].float(), batch.attention_mask)
            add("sentences", rows.sum())
            add("sentence_cos", torch.nn.functional.cosine_similarity(pooled_s[rows], pooled_t[rows], dim=-1).sum())
        totals = {k: reduce(v).item() for k, v in sorted(sums.items())}
        masked_total, tokens_total = max(totals["masked"], 1), max(totals["tokens"], 1)
        metrics = {}
        for who in ("student", "teacher"):
            if f"{who}_loss" in totals and totals["masked"] > 0:  # (data.mlm_probability=0 masks nothing)
                metrics[f"eval/{who}_mlm_loss"] = totals[f"{who}_loss"] / masked_total
                metrics[f"eval/{who}_mlm_accuracy"] = totals[f"{who}_correct"] / masked_total
        for s, t in loss_fn.layer_map:
            metrics[f"eval/alignment_cosine/student_{s}_teacher_{t}"] = totals[f"cos_{s}"] / tokens_total
        metrics["eval/sentence_cosine"] = totals["sentence_cos"] / max(totals["sentences"], 1)
        student.train(was_training)
        return metrics


def count_tokens(batches: Sequence[MaskedBatch], reduce: Reduce = no_reduce) -> torch.Tensor:
    """[masked tokens, non-padding tokens, sequences] over this step's micro-batches (and ranks)."""
    counts = torch.tensor(
        [
            sum(int(b.masked_positions.sum()) for b in batches),
            sum(int(b.attention_mask.sum()) for b in batches),
            sum(b.num_sequences for b in batches),
        ],
        dtype=torch.float64,
    )
    return reduce(counts)
