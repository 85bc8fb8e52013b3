"""The plain transformers distillation loop our recipe is checked and measured against.

A student distilled by our recipe is, numerically, what this loop would train: the tests
(tests/test_reference_loop.py) check that the losses and gradients agree, and the speed
benchmark (benchmarks/run.py) times the two side by side.

* Teacher: ``BertForMaskedLM`` (or ``BertModel`` for a teacher without an MLM head), eval,
  no_grad, eager attention, every hidden state and attention map, logits at every position.
* Student: ``AlbertForMaskedLM`` (``AlbertModel`` without a head), one hidden group, train mode,
  eager attention: what our adapter-free recursive student is.
* Loss, written the obvious way on padded batches:
  - ``"minialbert"``: MiniALBERT's ``general_distillation.py`` restated: ``KLDivLoss(mean)``
    for attention (our ``attention_reduction="element"``), ``CosineEmbeddingLoss`` for hidden
    states, ``KLDivLoss(batchmean)`` for the output and the model's own MLM loss;
    ``1 * mlm + 3 * (attention + hidden) + 5 * output``.
  - ``"layers"`` (a teacher without an MLM head): ``3 * (attention + hidden)``, attention as the
    KL of each attention distribution of a non-padding query, averaged (our default
    ``attention_reduction="distribution"``), selected by boolean indexing (cheaper than
    MiniALBERT's ``masked_select`` of repeated masks: the tougher baseline).
* AdamW with biases and LayerNorm weights not decayed (as ``transformers.Trainer`` does),
  ``clip_grad_norm_`` at 1.0.
"""

import warnings
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AlbertForMaskedLM, AlbertModel, BertForMaskedLM, BertModel

MINIALBERT = "minialbert"
LAYERS = "layers"


class ReferenceLoop:
    """Models, optimizer and one ``step()`` of the plain loop on a fixed padded batch.

    Args:
        teacher_dir: a transformers BERT folder; student_dir: an ALBERT folder (our student
            written with ``save_student``, so both sides start from the same weights).
        batch: a padded ``MaskedBatch``.
        loss: ``"minialbert"`` or ``"layers"`` (see the module docstring).
        device: where both models and the batch are put (``"cuda"`` for the GPU benchmarks).
    """

    def __init__(
        self,
        teacher_dir: str,
        student_dir: str,
        batch,
        loss: str,
        lr: float = 5e-4,
        weight_decay: float = 1e-4,
        clip: float = 1.0,
        device: str = "cpu",
    ):
        if loss not in (MINIALBERT, LAYERS):
            raise ValueError(f"loss must be {MINIALBERT!r} or {LAYERS!r}, got {loss!r}")
        heads = loss == MINIALBERT
        no_pooler = {} if heads else {"add_pooling_layer": False}  # a pooler is not distilled
        self.teacher = (
            (BertForMaskedLM if heads else BertModel)
            .from_pretrained(teacher_dir, attn_implementation="eager", **no_pooler)
            .eval()
        )
        self.teacher.requires_grad_(False)
        self.student = (
            (AlbertForMaskedLM if heads else AlbertModel)
            .from_pretrained(student_dir, attn_implementation="eager", **no_pooler)
            .train()
        )
        self.device = torch.device(device)
        self.teacher.to(self.device)
        self.student.to(self.device)
        batch = None if batch is None else batch.to(self.device)
        assert self.student.config.num_hidden_groups == 1
        self.batch, self.kind, self.clip = batch, loss, clip
        n_t, n_s = self.teacher.config.num_hidden_layers, self.student.config.num_hidden_layers
        assert n_t % n_s == 0, "the reference maps student i to teacher (L/N)*i"
        self.stride = n_t // n_s  # 2 for 12 -> 6: teacher index 2*i + 1 as in the original
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if p.ndim > 1]
        no_decay = [p for n, p in named if p.ndim <= 1]
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
        )

    def loss(self) -> Dict[str, torch.Tensor]:
        """``{"total": ..., term: ...}`` on the batch."""
        b = self.batch
        kwargs = dict(
            input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True, output_attentions=True
        )
        s_out = self.student(**kwargs, **({"labels": b.labels} if self.kind == MINIALBERT else {}))
        with torch.no_grad():
            t_out = self.teacher(**kwargs)
        s_att, t_att = s_out.attentions, [a.detach() for a in t_out.attentions]
        s_hid, t_hid = s_out.hidden_states[1:], [h.detach() for h in t_out.hidden_states[1:]]
        if self.kind == MINIALBERT:
            return self._minialbert(b, s_out, t_out, s_att, t_att, s_hid, t_hid)
        mask = b.attention_mask.bool()
        heads = s_att[0].shape[1]
        att = hid = 0.0
        for i in range(len(s_att)):
            t = self.stride * i + self.stride - 1
            # hidden: mean over non-padding tokens of 1 - cos
            s_sel, t_sel = s_hid[i][mask], t_hid[t][mask]
            hid = hid + nn.CosineEmbeddingLoss()(s_sel, t_sel, s_sel.new_ones(s_sel.size(0)))
            # attention: the mean KL of one attention distribution (a non-padding query's, any head)
            rows = mask[:, None, :, None].expand(-1, heads, -1, s_att[i].size(-1))
            s_rows = s_att[i][rows].view(-1, s_att[i].size(-1)) + 1e-12
            t_rows = t_att[t][rows].view(-1, s_att[i].size(-1)) + 1e-12
            att = att + nn.KLDivLoss(reduction="batchmean")(torch.log(s_rows), t_rows)
        return {"total": 3.0 * (att + hid), "hidden": hid, "attention": att}

    def _minialbert(self, b, s_out, t_out, s_att, t_att, s_hid, t_hid) -> Dict[str, torch.Tensor]:
        """MiniALBERT's DistillationWrapper, line for line (masked_select, as it was written)."""
        heads = s_att[0].shape[1]
        mask = b.attention_mask
        att = hid = None
        for i in range(len(s_att)):
            t = self.stride * i + self.stride - 1
            # attention: rows of non-padding queries, every head; KLDivLoss(mean) over elements
            m = mask.unsqueeze(1).repeat(1, heads, 1).unsqueeze(-1).expand_as(s_att[i]).bool()
            s_sel = torch.masked_select(s_att[i], m).view(-1, s_att[i].size(-1)) + 1e-12
            t_sel = torch.masked_select(t_att[t], m).view(-1, t_att[t].size(-1)) + 1e-12
            with warnings.catch_warnings():  # it divides by every element: what MiniALBERT computed
                warnings.filterwarnings("ignore", message="reduction: 'mean' divides")
                a = nn.KLDivLoss(reduction="mean")(torch.log(s_sel), t_sel)
            att = a if att is None else att + a
            # hidden: mean over non-padding tokens of 1 - cos
            m = mask.unsqueeze(-1).expand_as(s_hid[i]).bool()
            dim = s_hid[i].size(-1)
            s_sel = torch.masked_select(s_hid[i], m).view(-1, dim)
            t_sel = torch.masked_select(t_hid[t], m).view(-1, dim)
            h = nn.CosineEmbeddingLoss(reduction="mean")(s_sel, t_sel, s_sel.new(s_sel.size(0)).fill_(1))
            hid = h if hid is None else hid + h
        # output: KL at masked positions, batchmean = per masked position
        s_logits, t_logits = s_out.logits, t_out.logits.detach()
        m = (b.labels > -1).unsqueeze(-1).expand_as(s_logits).bool()
        s_sel = torch.masked_select(s_logits, m).view(-1, s_logits.size(-1))
        t_sel = torch.masked_select(t_logits, m).view(-1, s_logits.size(-1))
        out = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_sel, dim=-1), F.softmax(t_sel, dim=-1))
        total = 1.0 * s_out.loss + 3.0 * (att + hid) + 5.0 * out
        return {"total": total, "mlm": s_out.loss, "output": out, "hidden": hid, "attention": att}

    bf16 = False  # the forward under bf16 autocast (what the recipe's dtype=bf16 does)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def step(self) -> float:
        with self.autocast():
            terms = self.loss()
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(terms["total"].detach())
