"""The crisis detector's model: all-MiniLM-L6-v2 fine-tuned with LoRA and a linear head that reads a patient's
recent turns and says how likely they signal risk of self-harm (the risk taxonomy of
alignment/corpus/crisis/GUIDELINES.md). The serving side pairs it with regex rules as a second layer
(serving.safety.CrisisDetector); training is in alignment.crisis_training.

A saved detector is a small folder: config.json (format attune-crisis/1, threshold included), head.safetensors
and lora.safetensors; the encoder is never copied."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from alignment.basemodel import autocast_bf16
from alignment.reward import DEFAULT_ENCODER, resolve_encoder

FORMAT = "attune-crisis/1"
BUCKET = 32
"""Texts are padded to a multiple of this many tokens by their own length, so a text's score does not depend on
the other texts of its batch."""


@dataclass
class CrisisConfig:
    encoder: str = DEFAULT_ENCODER
    max_length: int = 128
    """Tokens of one window; longer windows lose their oldest text (left truncation), never the newest turn."""
    lora_rank: int = 32
    lora_alpha: int = 64
    lora_targets: tuple[str, ...] = ("query", "key", "value", "dense")
    bf16: bool = True
    """bfloat16 autocast where the hardware computes bf16 (a GPU, AVX512-BF16 / AMX / aarch64 bf16: about 1.5-2x
    faster there); float32 on a CPU without it, which would emulate bf16 (alignment.basemodel.autocast_bf16)."""
    window_turns: int = 3
    """Patient turns the detector reads: each of the last `window_turns` alone, and all of them joined."""
    threshold: float = 0.5
    """Risk probability at or above which a window is a crisis (calibrated on the val split for recall)."""
    near_threshold: float = 0.25
    """At or above this (and below `threshold`) a message is near the line: the safety path answers it."""

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        if not 0.0 <= self.near_threshold <= self.threshold <= 1.0:
            raise ValueError(f"thresholds must satisfy 0 <= near_threshold ({self.near_threshold}) <= threshold "
                             f"({self.threshold}) <= 1")
        if self.window_turns < 1 or self.max_length < 16:
            raise ValueError("window_turns must be >= 1 and max_length >= 16")


class CrisisClassifier:
    """P(risk) for patient text: a turn, or a window of turns joined as serving.safety.window_texts joins them."""

    def __init__(self, config: CrisisConfig | None = None, *, device: str | None = None, meta: dict | None = None):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel, AutoTokenizer

        self.config = config or CrisisConfig()
        self.meta = dict(meta or {})
        self.device = torch.device(device or "cpu")
        path = resolve_encoder(self.config.encoder)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.truncation_side = "left"
        encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
        for p in encoder.parameters():
            p.requires_grad_(False)
        if self.config.lora_rank:
            encoder = get_peft_model(encoder, LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.lora_alpha,
                                                         lora_dropout=0.1, target_modules=list(self.config.lora_targets)))
        self.encoder = encoder.to(self.device).eval()
        self.head = nn.Linear(encoder.config.hidden_size, 1).to(self.device)
        self.bf16_autocast = autocast_bf16(self.device.type)
        """Whether a config asking for bf16 gets torch autocast to it: by default only where the hardware computes
        bf16 (elsewhere emulated, several times slower); set it to compare the two numerics."""

    # ------------------------------------------------------------ forward
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """[N] risk logits, with gradients when the modules are in train mode."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.config.max_length)
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(enc["input_ids"]):
            groups.setdefault(-(-len(ids) // BUCKET) * BUCKET, []).append(i)
        out = torch.empty(len(texts), device=self.device)
        bf16 = self.config.bf16 and self.bf16_autocast
        for length, idx in groups.items():
            batch = self.tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc.keys()}, padding="max_length",
                                       max_length=length, return_tensors="pt").to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                hidden = self.encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[torch.tensor(idx, device=self.device)] = self.head(pooled)[:, 0]
        return out

    @torch.inference_mode()
    def prob(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """[N] probability of risk per text."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        parts = [np.zeros(0, dtype=np.float32)]
        for i in range(0, len(texts), batch_size):
            parts.append(torch.sigmoid(self.logits(texts[i:i + batch_size])).float().cpu().numpy())
        return np.concatenate(parts)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  path / "head.safetensors")
        if self.config.lora_rank:
            state = get_peft_model_state_dict(self.encoder)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path / "lora.safetensors")
        self.save_config(path)

    def save_config(self, path: str | Path) -> None:
        """config.json alone (thresholds and meta): what a recalibration changes; the weights stay as they are."""
        body = {"format": FORMAT, "config": asdict(self.config), "meta": self.meta}
        (Path(path) / "config.json").write_text(json.dumps(body, indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> "CrisisClassifier":
        from safetensors.torch import load_file

        path = Path(path)
        cfg = path / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"{cfg} not found: is {path} a saved crisis detector? Train one with "
                                    "`attune crisis train`")
        body = json.loads(cfg.read_text())
        if body.get("format") != FORMAT:
            raise ValueError(f"{cfg}: format {body.get('format')!r}, expected {FORMAT!r}")
        model = cls(CrisisConfig(**body["config"]), device=device, meta=body.get("meta"))
        model.head.load_state_dict(load_file(path / "head.safetensors", device=str(model.device)))
        if model.config.lora_rank:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model.encoder, load_file(path / "lora.safetensors",
                                                                        device=str(model.device)))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{path}/lora.safetensors: unexpected keys {result.unexpected_keys[:3]}")
        model.encoder.eval()
        model.head.eval()
        return model

