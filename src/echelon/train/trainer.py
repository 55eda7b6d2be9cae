"""The device plane's compute: K inner AdamW steps on the proximal local objective.

    L_i(theta) + (mu / 2) * ||theta - theta_anchor||^2

In simulation every device shares one model object (one copy of the frozen weights); a device
owns only its trainable vector, its AdamW state and its data stream. Before a local round its
reference is copied into the shared trainable parameters; afterwards they are read back out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from echelon.config import TrainConfig
from echelon.train.data import Corpus
from echelon.train.model import ModelBundle


@dataclass(frozen=True)
class LocalResult:
    """A finished local round: the device's parameters, tokens processed, mean task loss."""

    theta: torch.Tensor
    tokens: int
    loss: float


class DeviceStream:
    """Endless batches of sequence indices from one device's shard, reshuffled every epoch."""

    def __init__(self, indices: np.ndarray, batch: int, rng: np.random.Generator) -> None:
        if len(indices) < batch:
            raise ValueError(f"a shard of {len(indices)} sequences cannot fill a batch of {batch}")
        self._indices, self._batch, self._rng = indices, batch, rng
        self._order = rng.permutation(indices)
        self._pos = 0

    def next(self) -> np.ndarray:
        if self._pos + self._batch > len(self._order):
            self._order, self._pos = self._rng.permutation(self._indices), 0
        out = self._order[self._pos : self._pos + self._batch]
        self._pos += self._batch
        return out


def derived_seed(*parts: int) -> int:
    """A 63-bit seed determined by `parts` (run seed, device index, round, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class LocalTrainer:
    """Runs local rounds for any number of devices on one shared model."""

    def __init__(
        self,
        bundle: ModelBundle,
        corpus: Corpus,
        shards: dict[str, np.ndarray],
        cfg: TrainConfig,
        mu: float,
        seed: int,
    ) -> None:
        self.bundle, self.corpus, self.cfg, self.mu, self.seed = bundle, corpus, cfg, mu, seed
        self._index = {d: i for i, d in enumerate(shards)}
        self._streams = {
            d: DeviceStream(ix, cfg.micro_batch, np.random.default_rng(derived_seed(seed, 1, i)))
            for i, (d, ix) in enumerate(shards.items())
        }
        self._optimizers = {
            d: torch.optim.AdamW(
                bundle.trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True
            )
            for d in shards
        }
        self._rounds = dict.fromkeys(shards, 0)
        self.tokens_per_round = cfg.inner_steps * cfg.grad_accum * cfg.micro_batch * corpus.seq_len

    def local_round(
        self, device: str, reference: torch.Tensor, anchor: torch.Tensor | None = None
    ) -> LocalResult:
        """K inner AdamW steps from `reference`, pulled towards `anchor` (default: the reference)."""
        bundle, cfg = self.bundle, self.cfg
        model, params, opt = bundle.model, bundle.trainable, self._optimizers[device]
        bundle.set_vector(reference)
        anchors = _views(reference if anchor is None else anchor, params) if self.mu > 0 else None
        # Dropout draws from torch's global generator: seed it per (run, device, round).
        torch.manual_seed(derived_seed(self.seed, 2, self._index[device], self._rounds[device]))
        self._rounds[device] += 1
        stream = self._streams[device]
        losses = []
        for _ in range(cfg.inner_steps):
            for _ in range(cfg.grad_accum):
                batch = torch.from_numpy(self.corpus.train[stream.next()])
                loss = model(input_ids=batch, labels=batch).loss
                (loss / cfg.grad_accum).backward()
                losses.append(loss.item())
            if anchors is not None:
                # Gradient of (mu/2)||theta - anchor||^2, added exactly rather than through autograd.
                with torch.no_grad():
                    for p, a in zip(params, anchors, strict=True):
                        p.grad.add_(p - a, alpha=self.mu)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return LocalResult(bundle.get_vector(), self.tokens_per_round, float(np.mean(losses)))

    @torch.no_grad()
    def evaluate(self, theta: torch.Tensor, sequences: int, batch: int) -> float:
        """Mean next-token loss of theta on the first `sequences` validation sequences."""
        self.bundle.set_vector(theta)
        model = self.bundle.model
        model.eval()
        val = self.corpus.val[:sequences]
        total = 0.0
        for i in range(0, len(val), batch):
            chunk = torch.from_numpy(val[i : i + batch])
            total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
        model.train()
        return total / len(val)


def _views(theta: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(theta[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out
