"""Run under torchrun: load a teacher sharded over the ranks and compare it with the full one.

Prints one JSON line per rank: parameters held locally, total, and the largest output difference.
"""

import json
import sys

import torch

from components.checkpointing import hf_teacher
from components.training.parallel import DataParallel

parallel = DataParallel("cpu")
folder = sys.argv[1]
sharded = hf_teacher(folder, shard=parallel.shard_teacher)
full = hf_teacher(folder)
g = torch.Generator().manual_seed(parallel.rank)
ids = torch.randint(5, 300, (2 + parallel.rank, 16), generator=g)
mask = torch.ones_like(ids)
mask[0, 10:] = 0
a = sharded(ids, mask, attention_layers={2}, logits_mask=mask.bool())
b = full(ids, mask, attention_layers={2}, logits_mask=mask.bool())
diff = max(
    [(x - y)[mask.bool()].abs().max().item() for x, y in zip(a.hidden_states, b.hidden_states)]
    + [(a.logits - b.logits).abs().max().item(), (a.attentions[2] - b.attentions[2]).abs().max().item()]
)
local = sum(p.to_local().numel() for p in sharded.parameters())

from components.models import recursive_tiny  # noqa: E402

student = recursive_tiny(vocab_size=300)
student_total = sum(p.numel() for p in student.parameters())
parallel.shard_student(student)
student_local = sum(p.to_local().numel() for p in student.parameters())
line = json.dumps(
    {
        "rank": parallel.rank,
        "local": local,
        "total": sum(p.numel() for p in full.parameters()),
        "diff": diff,
        "student_local": student_local,
        "student_total": student_total,
    }
)
sys.stdout.write(line + "\n")  # one write of under 4 KiB: the two ranks' lines cannot interleave
sys.stdout.flush()
parallel.close()
