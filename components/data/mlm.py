"""Padding, dynamic MLM masking, and the order in which windows are visited.

Masking is BERT's: each non-special, non-padding token is selected with probability ``p``
(15%); a selected token becomes ``[MASK]`` 80% of the time, a random non-special token 10%,
and stays itself 10%. Labels hold the original token at selected positions and -100 elsewhere.

The random numbers for a whole optimizer step are drawn at once from a generator seeded by
(seed, step), for ``global_batch x max_length`` positions; each micro-batch on each rank reads
its own rows. A window is therefore masked the same way whatever the batch size per device,
the number of devices or the accumulation steps, and a resumed run masks as the original did.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch


@dataclass
class MaskNoise:
    """Uniform draws for ``rows x max_length`` positions."""

    select: torch.Tensor  # [rows, max_length] in [0, 1): position selected if < p
    action: torch.Tensor  # [rows, max_length] in [0, 1): mask / random / keep
    replacement: torch.Tensor  # [rows, max_length] indices into the replacement vocabulary

    def rows(self, start: int, stop: int, length: int) -> "MaskNoise":
        return MaskNoise(
            self.select[start:stop, :length],
            self.action[start:stop, :length],
            self.replacement[start:stop, :length],
        )


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream)."""
    return torch.Generator().manual_seed(hash((seed, step, stream)) & 0x7FFF_FFFF_FFFF_FFFF)


class MLMMasker:
    """Applies BERT's dynamic masking with noise drawn per optimizer step.

    Args:
        tokenizer: the teacher's tokenizer (for the mask token, special tokens and vocab size).
        mlm_probability: share of maskable tokens selected (0.15); 0 masks nothing (for
            distillation on hidden states and attention alone).
        mask_fraction, random_fraction: of the selected, how many become [MASK] / random.
    """

    def __init__(
        self,
        tokenizer,
        mlm_probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
    ):
        if tokenizer.mask_token_id is None:
            raise ValueError("The teacher's tokenizer has no mask token; it cannot be used for MLM")
        if not 0 <= mlm_probability < 1:
            raise ValueError(f"data.mlm_probability must be in [0, 1), got {mlm_probability}")
        self.p = mlm_probability
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.mask_token_id = tokenizer.mask_token_id
        special = sorted(set(tokenizer.all_special_ids))
        self.special_ids = torch.tensor(special, dtype=torch.long)
        vocab = torch.ones(len(tokenizer), dtype=torch.bool)
        vocab[self.special_ids] = False
        self.replacement_ids = vocab.nonzero().squeeze(1)

    def noise(self, rows: int, max_length: int, generator: torch.Generator) -> MaskNoise:
        shape = (rows, max_length)
        return MaskNoise(
            select=torch.rand(shape, generator=generator),
            action=torch.rand(shape, generator=generator),
            replacement=torch.randint(len(self.replacement_ids), shape, generator=generator),
        )

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, noise: MaskNoise):
        """(masked input_ids, labels) for a padded batch and its rows of noise."""
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        selected = maskable & (noise.select < self.p)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
        to_mask = selected & (noise.action < self.mask_fraction)
        to_random = (
            selected & (noise.action >= self.mask_fraction) & (noise.action < self.mask_fraction + self.random_fraction)
        )
        inputs = input_ids.clone()
        inputs[to_mask] = self.mask_token_id
        inputs[to_random] = self.replacement_ids[noise.replacement[to_random]]
        return inputs, labels


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_batch(
    windows: Sequence[Sequence[int]],
    pad_token_id: int,
    pad_to_multiple_of: int = 1,
    max_length: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Right-pad token windows to the longest one, rounded up to ``pad_to_multiple_of`` but
    never beyond ``max_length`` (the models' limit): ``input_ids`` and ``attention_mask``."""
    longest = max(len(w) for w in windows)
    length = round_up(longest, pad_to_multiple_of)
    if max_length is not None:
        length = min(length, max(longest, max_length))
    input_ids = torch.full((len(windows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), length), dtype=torch.long)
    for i, w in enumerate(windows):
        input_ids[i, : len(w)] = torch.as_tensor(w, dtype=torch.long)
        attention_mask[i, : len(w)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class GlobalBatchSampler:
    """Which windows each rank's micro-batches hold, step by step, resumably.

    Each optimizer step consumes the next ``global_batch = micro_batch_size x accumulation_steps
    x world_size`` windows of a permutation drawn per epoch from ``seed``; rank ``r`` takes the
    ``r``-th contiguous share and cuts it into its micro-batches. The last incomplete global
    batch of an epoch is dropped. The position follows from the steps taken (``seek``).
    """

    def __init__(
        self,
        num_windows: int,
        micro_batch_size: int,
        accumulation_steps: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.num_windows = num_windows
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = micro_batch_size * accumulation_steps * world_size
        self.steps_per_epoch = num_windows // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"The corpus has {num_windows} training windows, fewer than one global batch of "
                f"{self.global_batch} (batch_size x gradient_accumulation_steps x world size)"
            )
        self.epoch = 0
        self.step_in_epoch = 0
        self._order = None

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            order = (
                torch.randperm(self.num_windows, generator=step_generator(self.seed, self.epoch, 1))
                if self.shuffle
                else torch.arange(self.num_windows)
            )
            self._order = (self.epoch, order)
        return self._order[1]

    def next_step(self) -> List[List[int]]:
        """This rank's micro-batches (lists of window indices) for the next optimizer step."""
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        start = self.step_in_epoch * self.global_batch
        share = self.global_batch // self.world_size
        mine = self._permutation()[start + self.rank * share : start + (self.rank + 1) * share]
        self.step_in_epoch += 1
        return [mine[i : i + self.micro_batch_size].tolist() for i in range(0, share, self.micro_batch_size)]

    def row_offset(self) -> int:
        """Row of this rank's first window within the global batch (for the mask noise)."""
        return self.rank * (self.global_batch // self.world_size)

    def seek(self, step: int) -> None:
        """Position the sampler after ``step`` optimizer steps (how a run resumes)."""
        self.epoch, self.step_in_epoch = divmod(step, self.steps_per_epoch)
