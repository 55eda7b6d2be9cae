"""The device plane's compute: K inner AdamW steps on the proximal local objective.

    L_i(theta) + (mu / 2) * ||theta - theta_anchor||^2

In simulation every device shares one model object (one copy of the frozen weights); a device
owns only its trainable vector, its AdamW state, its learning-rate schedule position and its
data stream. Before a local round its reference is copied into the shared trainable parameters;
afterwards they are read back out.

What a user of the paper's setup expects of the inner loop (all off by default): gradient
clipping to a global L2 norm, linear warmup then cosine decay of the learning rate (per device,
counted in its own inner steps), bfloat16 autocast of the forward pass where the device supports
it, and gradient checkpointing.
"""

from __future__ import annotations

import logging
import math
import re
from contextlib import nullcontext

import numpy as np
import torch

from echelon.config import TrainConfig
from echelon.errors import ConfigError
from echelon.sansio import LocalResult
from echelon.train.data import Corpus
from echelon.train.model import ModelBundle

log = logging.getLogger(__name__)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


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


def layer_fragments(bundle: ModelBundle, fragments: int) -> list[tuple[int, int]]:
    """Streaming DiLoCo's fragments (Douillard et al. 2025): transformer layer l belongs to
    fragment l mod P (strided), parameters outside the layers (embeddings, final norm, head) to
    fragment 0. Reorders the bundle's trainable parameters so that each fragment is one
    contiguous range of theta, and returns the ranges."""
    layers = [_LAYER.search(n) for n in bundle.names]
    index = [int(m.group(1)) % fragments if m else 0 for m in layers]
    count = len({int(m.group(1)) for m in layers if m})
    if count < fragments:
        raise ConfigError(
            f"echelon.streaming.fragments is {fragments} but the model's trainable parameters span {count} "
            "layer(s): a fragment is a set of whole layers; lower echelon.streaming.fragments"
        )
    order = sorted(range(len(index)), key=lambda i: index[i])  # stable: layer order within a fragment
    bundle.names = [bundle.names[i] for i in order]
    bundle.trainable = [bundle.trainable[i] for i in order]
    bounds, lo = [], 0
    for f in range(fragments):
        size = sum(bundle.trainable[i].numel() for i in range(len(order)) if index[order[i]] == f)
        bounds.append((lo, lo + size))
        lo += size
    return bounds


def learning_rate(cfg: TrainConfig, step: int, decay_steps: int | None) -> float:
    """The inner learning rate at a device's inner step `step` (from 0): linear warmup over
    warmup_steps, then constant or cosine decay to min_lr_ratio * lr at decay_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or decay_steps is None:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


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
        decay_steps: int | None = None,
    ) -> None:
        """`decay_steps`: the cosine schedule's length in inner steps per device (train.decay_steps,
        or derived from the token budget by the caller)."""
        self.bundle, self.corpus, self.cfg, self.mu, self.seed = bundle, corpus, cfg, mu, seed
        self.decay_steps = cfg.decay_steps or decay_steps
        self._steps = dict.fromkeys(shards, 0)
        self._autocast = self._autocast_context(cfg)
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input gradients (LoRA freezes the embeddings).
            bundle.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._index = {d: i for i, d in enumerate(shards)}
        self._streams = {
            d: DeviceStream(ix, cfg.micro_batch, np.random.default_rng(derived_seed(seed, 1, i)))
            for i, (d, ix) in enumerate(shards.items())
        }
        self._optimizers = {d: bundle.inner_optimizer(bundle.trainable, cfg) for d in shards}
        self._rounds = dict.fromkeys(shards, 0)
        self.tokens_per_round = cfg.inner_steps * cfg.grad_accum * cfg.micro_batch * corpus.seq_len

    def local_round(
        self, device: str, reference: torch.Tensor, anchor: torch.Tensor | None = None
    ) -> LocalResult:
        """K inner AdamW steps from `reference`, pulled towards `anchor` (default: the reference)."""
        cfg, opt, stream = self.cfg, self._optimizers[device], self._streams[device]
        self.bundle.set_vector(reference)
        anchor = reference if anchor is None else anchor
        # Dropout draws from torch's global generator: seed it per (run, device, round).
        torch.manual_seed(derived_seed(self.seed, 2, self._index[device], self._rounds[device]))
        self._rounds[device] += 1
        losses = []
        for _ in range(cfg.inner_steps):
            losses.append(self.accumulate_gradients([stream.next() for _ in range(cfg.grad_accum)], anchor))
            self._step(device, opt)
        return LocalResult(self.bundle.get_vector(), self.tokens_per_round, float(np.mean(losses)))

    def _step(self, device: str, opt: torch.optim.Optimizer) -> None:
        """One inner optimiser step: clip the gradient, set the scheduled learning rate, step."""
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.bundle.trainable, self.cfg.grad_clip, foreach=True)
        for group in opt.param_groups:
            group["lr"] = learning_rate(self.cfg, self._steps[device], self.decay_steps)
        self._steps[device] += 1
        opt.step()
        opt.zero_grad(set_to_none=True)

    @staticmethod
    def _autocast_context(cfg: TrainConfig):
        """bfloat16 autocast of the forward pass when asked for and the device supports it."""
        if cfg.precision != "bfloat16":
            return nullcontext
        device = "cpu"  # the trainer keeps the model where build_model put it: on the CPU
        if not torch.amp.is_autocast_available(device):
            log.warning(
                "train.precision bfloat16: autocast is not available on %s; training in float32", device
            )
            return nullcontext
        return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)

    def accumulate_gradients(self, batches: list[np.ndarray], anchor: torch.Tensor) -> float:
        """Add to `.grad` the gradient of the local objective on `batches`; returns the mean task loss.

        Task loss: mean next-token cross-entropy over the batches. Proximal term: its exact
        gradient mu * (theta - anchor) is added once, rather than through autograd.
        """
        model, params = self.bundle.model, self.bundle.trainable
        total = 0.0
        for idx in batches:
            batch = torch.from_numpy(self.corpus.train[idx]).long()
            with self._autocast():
                loss = self.bundle.task_loss(model, batch).float()
            (loss / len(batches)).backward()
            total += loss.item()
        if self.mu > 0:
            with torch.no_grad():
                # mu * (theta - anchor), exactly 0 at the anchor (mu*theta - mu*anchor would round).
                distance = torch._foreach_sub(params, _views(anchor, params))
                torch._foreach_add_([p.grad for p in params], distance, alpha=self.mu)
        return total / len(batches)

    def initial_state(self) -> torch.Tensor:
        """The state the planes exchange at the start: the trainable parameters theta."""
        return self.bundle.get_vector()

    def close(self) -> None:
        """Release what local rounds hold outside this process (nothing here; see PlannedTrainer)."""

    def model_part(self, state: torch.Tensor) -> torch.Tensor:
        """The model parameters within an exchanged state."""
        return state

    @torch.no_grad()
    def evaluate(self, state: torch.Tensor, sequences: int, batch: int) -> float:
        """Mean next-token loss of the state's model on the first `sequences` validation sequences."""
        self.bundle.set_vector(self.model_part(state))
        model = self.bundle.model
        model.eval()
        val = self.corpus.val[:sequences]
        total = 0.0
        for i in range(0, len(val), batch):
            chunk = torch.from_numpy(val[i : i + batch]).long()
            total += self.bundle.task_loss(model, chunk).item() * len(chunk)
        model.train()
        return total / len(val)


def _views(theta: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(theta[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


class ScaffoldTrainer(LocalTrainer):
    """SCAFFOLD local rounds (see `echelon.train.scaffold`): plain SGD steps on drift-corrected
    gradients. The exchanged state is theta (+) c; each device keeps its own c_i."""

    def __init__(
        self,
        bundle: ModelBundle,
        corpus: Corpus,
        shards: dict[str, np.ndarray],
        cfg: TrainConfig,
        mu: float,
        seed: int,
        decay_steps: int | None = None,
    ) -> None:
        super().__init__(bundle, corpus, shards, cfg, mu, seed, decay_steps)
        self._optimizers = {d: torch.optim.SGD(bundle.trainable, lr=cfg.lr) for d in shards}
        self._controls = {d: torch.zeros(bundle.dim) for d in shards}

    def initial_state(self) -> torch.Tensor:
        return torch.cat([self.bundle.get_vector(), torch.zeros(self.bundle.dim)])

    def model_part(self, state: torch.Tensor) -> torch.Tensor:
        return state[: self.bundle.dim]

    def local_round(
        self, device: str, reference: torch.Tensor, anchor: torch.Tensor | None = None
    ) -> LocalResult:
        from echelon.train.scaffold import control_update, corrected_gradient

        cfg, opt, stream, params = (
            self.cfg,
            self._optimizers[device],
            self._streams[device],
            self.bundle.trainable,
        )
        d = self.bundle.dim
        x, c, c_i = reference[:d], reference[d:], self._controls[device]
        self.bundle.set_vector(x)
        torch.manual_seed(derived_seed(self.seed, 2, self._index[device], self._rounds[device]))
        self._rounds[device] += 1
        losses = []
        for _ in range(cfg.inner_steps):
            losses.append(self.accumulate_gradients([stream.next() for _ in range(cfg.grad_accum)], x))
            with torch.no_grad():
                grad = torch.cat([p.grad.reshape(-1) for p in params])
                for p, g in zip(params, _views(corrected_gradient(grad, c, c_i), params), strict=True):
                    p.grad.copy_(g)
            self._step(device, opt)
        y = self.bundle.get_vector()
        c_i_new = control_update(c_i, c, x, y, cfg.inner_steps, cfg.lr)
        self._controls[device] = c_i_new
        # Delta against the reference (x, c) is (y - x, c_i+ - c_i), as SCAFFOLD sends.
        state = torch.cat([y, c + (c_i_new - c_i)])
        return LocalResult(state, self.tokens_per_round, float(np.mean(losses)))
