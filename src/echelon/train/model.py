"""Models via transformers and peft: the built-in `tiny` Llama preset, a local checkpoint, or a
module of the caller's own (`own_model`, through the Python API).

Nothing is ever downloaded: a checkpoint is a local directory (`local_files_only=True`), and the
tiny preset is a randomly initialised Llama with a byte-level tokenizer built in memory.

The trainable parameters (LoRA adapters, or all weights) are handled as one flat float32 vector
theta, in a fixed order. That is the unit the planes exchange: references, deltas, aggregates.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from echelon.config import ModelConfig, TrainConfig
from echelon.errors import UserError
from echelon.train.presets import TINY_LLAMA

# peft calls a transformers API that transformers 5 deprecates; the warning is not the user's to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then <s>, </s>, <pad>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # ByteLevel maps each byte to a printable character (GPT-2's map); id = the byte's value.
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


class TaskLoss(Protocol):
    """The task loss of `model` on a batch of token ids (long, [sequences, seq_len]): a scalar
    tensor to differentiate. Local rounds add the proximal term to it; evaluation averages it."""

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor: ...


class InnerOptimizer(Protocol):
    """The optimiser of a device's inner steps over `params`, built once per device from the run
    file's `train` section (its `lr` is the starting rate; the schedule sets each group's "lr"
    before every step, and clipping happens before `step()`)."""

    def __call__(self, params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer: ...


def adamw(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The paper's inner optimiser: AdamW with the run file's betas and weight decay."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, as a Hugging Face causal LM computes it from its labels."""
    return model(input_ids=batch, labels=batch).loss


@dataclass
class ModelBundle:
    """A causal LM, its tokenizer, the flat view of its trainable parameters, its task loss and
    the optimiser of its inner steps."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerFast
    config: ModelConfig
    names: list[str]
    trainable: list[nn.Parameter]
    task_loss: TaskLoss = causal_lm_loss
    inner_optimizer: InnerOptimizer = adamw

    @property
    def dim(self) -> int:
        """Number of trainable parameters, the length of theta."""
        return sum(p.numel() for p in self.trainable)

    def get_vector(self) -> torch.Tensor:
        """theta: the trainable parameters as a new flat float32 tensor."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.trainable])

    @torch.no_grad()
    def set_vector(self, theta: torch.Tensor) -> None:
        """Copy theta into the trainable parameters in place."""
        offset = 0
        for p in self.trainable:
            n = p.numel()
            p.copy_(theta[offset : offset + n].view_as(p))
            offset += n
        if offset != theta.numel():
            raise ValueError(f"theta has {theta.numel()} elements, the model {offset}")

    def save(self, out_dir: Path, theta: torch.Tensor) -> Path:
        """Write theta as a loadable artefact; returns its directory.

        LoRA: a peft adapter directory (`PeftModel.from_pretrained(base, dir)` loads it), next to
        the base model it was trained on when that base is the in-memory tiny preset.
        Full: a transformers checkpoint directory with safetensors weights and the tokenizer.
        """
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no per-shard progress bars inside our own progress display
        self.set_vector(theta)
        if self.config.trainable == "lora":
            base_path = self.config.path
            if base_path is None:
                base_path = out_dir / "base"
                base = self.model.get_base_model()
                # Save the frozen base without the adapter layers: load it afresh from the state.
                plain = LlamaForCausalLM(base.config)
                plain.load_state_dict(_without_lora(base.state_dict()), strict=True)
                plain.save_pretrained(base_path)
                self.tokenizer.save_pretrained(base_path)
            adapter = out_dir / "adapter"
            self.model.save_pretrained(adapter)
            cfg_path = adapter / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = str(Path(base_path).resolve())
            cfg_path.write_text(json.dumps(cfg, indent=2))
            return adapter
        model_dir = out_dir / "model"
        if not hasattr(self.model, "save_pretrained"):  # a module of the caller's own
            from safetensors.torch import save_file

            model_dir.mkdir(exist_ok=True)
            state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, model_dir / "model.safetensors")
            self.tokenizer.save_pretrained(model_dir)
            return model_dir
        self.model.save_pretrained(model_dir)
        self.tokenizer.save_pretrained(model_dir)
        return model_dir


def _without_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def build_model(cfg: ModelConfig, seed: int) -> ModelBundle:
    """Build the model and tokenizer that `cfg` names, with its trainable parameters selected."""
    torch.manual_seed(seed)
    if cfg.path is None:
        model: nn.Module = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, attn_implementation="eager"))
        tokenizer = byte_tokenizer()
    else:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise UserError(
                f"model.path: {path} is not a Hugging Face checkpoint directory (no config.json); "
                "give a local directory saved with save_pretrained, or use `preset: tiny`"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"model.path: cannot load {path}: {e}") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.train()
    if cfg.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise UserError(f"model.lora.target_modules: {e}") from None
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return ModelBundle(model, tokenizer, cfg, [n for n, _ in named], [p for _, p in named])


def own_model(
    module: nn.Module,
    cfg: ModelConfig,
    task_loss: TaskLoss = causal_lm_loss,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> ModelBundle:
    """The caller's `module` as a bundle: theta is its parameters that require a gradient (all of
    them, `model.trainable: full`), texts are tokenised with `tokenizer` (default: the tiny
    preset's byte-level tokenizer, ids 0..259), and `task_loss` scores a batch (default: the
    module is called as a Hugging Face causal LM)."""
    if cfg.trainable != "full":
        raise UserError(
            "model.trainable: a module of your own trains its parameters that require a gradient; "
            "set `trainable: full` (LoRA adapters are made only for Hugging Face checkpoints)"
        )
    module.train()
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise UserError("the model has no parameter that requires a gradient: nothing to train")
    tok = tokenizer or byte_tokenizer()
    return ModelBundle(module, tok, cfg, [n for n, _ in named], [p for _, p in named], task_loss)
