"""Preference training for a grid of LoRA adapters that share one base model (issue 13).

TRL's DPOTrainer, per adapter and per step, runs all 30 decoder layers forward, backward through the LoRA layers,
and the language-model head over every position; before training it runs the reference model over every pair.
When LoRA covers only the upper layers (the shipped recipe: the top 10 of 30), the lower layers are frozen and
identical for every adapter and for the reference. So, once per unique (prompt, reply) sequence of the whole grid:

- one forward pass of the base model gives both the reference log-probability of the reply and the hidden state
  entering the first LoRA layer (captured with a pre-hook), kept in memory and on disk;

and each training step runs only the upper layers from that hidden state, with the head applied to the reply's
positions only. The loss is `alignment.losses.modpo_loss` (DPO: margin 0, w_k 1; joint DPO: a per-pair weight).
`tests/alignment/test_fast_pref.py` checks that the log-probabilities equal a full forward pass of the same model.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.losses import modpo_loss, weighted_mean


@dataclass
class Encoded:
    ids: torch.Tensor  # [T] token ids of prompt + reply (truncated to max_length)
    start: int  # index of the reply's first token


@dataclass
class SequenceCache:
    """Per unique sequence (keyed by `key(prompt, completion)`): its tokens, the hidden state entering layer
    `layer` ([T, hidden], float32) and the reference model's log-probability of the reply."""

    layer: int
    max_length: int
    encoded: dict[str, Encoded] = field(default_factory=dict)
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    ref_logp: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"layer": self.layer, "max_length": self.max_length, "seconds": self.seconds,
                    "encoded": {k: (e.ids, e.start) for k, e in self.encoded.items()},
                    "hidden": self.hidden, "ref_logp": self.ref_logp}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "SequenceCache":
        d = torch.load(path, weights_only=True)
        return cls(d["layer"], d["max_length"], {k: Encoded(ids, int(s)) for k, (ids, s) in d["encoded"].items()},
                   d["hidden"], d["ref_logp"], d["seconds"])


def key(prompt: list[dict], completion: list[dict]) -> str:
    return hashlib.sha256(json.dumps([prompt, completion], sort_keys=True).encode()).hexdigest()[:24]


def encode(tok, prompt: list[dict], completion: list[dict], max_length: int) -> Encoded | None:
    """Chat-template tokens of prompt + reply and where the reply starts; None when the prompt alone leaves fewer
    than 8 tokens of reply within max_length."""
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently with and without the reply")
    head_ids = tok(head, add_special_tokens=False)["input_ids"]
    tail_ids = tok(full[len(head):], add_special_tokens=False)["input_ids"]
    if len(head_ids) + 8 > max_length or not tail_ids:
        return None
    ids = (head_ids + tail_ids)[:max_length]
    return Encoded(torch.tensor(ids, dtype=torch.long), len(head_ids))


def first_lora_layer(layers_to_transform: list[int] | None) -> int:
    return min(layers_to_transform) if layers_to_transform else 0


def _decoder(model):
    """The decoder (LlamaModel-like, with .layers, .norm) and the head of a causal LM, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.lm_head


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [T_i, ...] tensors to one batch, with the attention mask."""
    n = max(s.shape[0] for s in seqs)
    out = seqs[0].new_zeros((len(seqs), n, *seqs[0].shape[1:]))
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :s.shape[0]] = s
        mask[i, :s.shape[0]] = 1
    return out, mask


def _reply_logps(last_hidden: torch.Tensor, lm_head, encs: list[Encoded]) -> torch.Tensor:
    """Sum over each reply's tokens of log p(token | everything before), the head applied to those positions only."""
    rows, pos, targets, owner = [], [], [], []
    for i, e in enumerate(encs):
        t = torch.arange(e.start, e.ids.shape[0])
        rows.append(torch.full_like(t, i))
        pos.append(t - 1)
        targets.append(e.ids[e.start:])
        owner.append(torch.full_like(t, i))
    rows, pos, targets, owner = (torch.cat(x) for x in (rows, pos, targets, owner))
    logits = lm_head(last_hidden[rows, pos]).float()
    token_logp = torch.gather(torch.log_softmax(logits, dim=-1), 1, targets[:, None])[:, 0]
    return torch.zeros(len(encs), dtype=token_logp.dtype).index_add(0, owner, token_logp)


class _UpperOnly:
    """Within the block, the decoder runs only its layers from `layer` up (its input: a cached hidden state)."""

    def __init__(self, decoder, layer: int):
        self.decoder, self.layer, self.full = decoder, layer, decoder.layers

    def __enter__(self):
        self.decoder.layers = torch.nn.ModuleList(list(self.full)[self.layer:])
        return self

    def __exit__(self, *exc):
        self.decoder.layers = self.full


def upper_logps(model, cache: SequenceCache, keys: list[str]) -> torch.Tensor:
    """Reply log-probs of `keys` under `model`, running only the layers from cache.layer up."""
    decoder, head = _decoder(model)
    encs = [cache.encoded[k] for k in keys]
    hidden, mask = _pad([cache.hidden[k] for k in keys])
    with _UpperOnly(decoder, cache.layer):
        out = decoder(inputs_embeds=hidden, attention_mask=mask, use_cache=False)
    return _reply_logps(out.last_hidden_state, head, encs)


def full_logps(model, encs: list[Encoded]) -> torch.Tensor:
    """Reply log-probs from a full forward pass (what the cache must reproduce; used by the tests)."""
    decoder, head = _decoder(model)
    ids, mask = _pad([e.ids for e in encs])
    out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    return _reply_logps(out.last_hidden_state, head, encs)


def chosen_nll(logps: torch.Tensor, cache: SequenceCache, keys: list[str]) -> torch.Tensor:
    """Negative log-likelihood per reply token of each sequence (its summed reply log-prob over its reply length):
    the RPO term (`TrainArgs.rpo_alpha`), so that a long chosen reply weighs no more than a short one."""
    n = torch.tensor([max(1, len(cache.encoded[k].ids) - cache.encoded[k].start) for k in keys], dtype=logps.dtype)
    return -logps / n


@torch.inference_mode()
def build_cache(base_model: str, tok, sequences: list[tuple[list[dict], list[dict]]], layer: int,
                max_length: int, *, batch_size: int = 8, log=print, cache: SequenceCache | None = None
                ) -> SequenceCache:
    """Encode every sequence not yet in `cache` and run the base model over it once (longest first, so padding
    stays small): reference log-prob of the reply, and the input of decoder layer `layer`."""
    from transformers import AutoModelForCausalLM

    cache = cache or SequenceCache(layer, max_length)
    if (cache.layer, cache.max_length) != (layer, max_length):
        raise ValueError(f"cache built for layer {cache.layer}, max_length {cache.max_length}; asked for {layer}, "
                         f"{max_length}")
    todo: dict[str, Encoded] = {}
    for prompt, completion in sequences:
        k = key(prompt, completion)
        if k in cache.encoded or k in todo:
            continue
        enc = encode(tok, prompt, completion, max_length)
        if enc is not None:
            todo[k] = enc
    if not todo:
        return cache
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    decoder, head = _decoder(model)
    captured: list[torch.Tensor] = []
    hook = decoder.layers[layer].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    order = sorted(todo, key=lambda k: -todo[k].ids.shape[0])
    try:
        for i in range(0, len(order), batch_size):
            keys = order[i:i + batch_size]
            encs = [todo[k] for k in keys]
            captured.clear()
            ids, mask = _pad([e.ids for e in encs])
            out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            logps = _reply_logps(out.last_hidden_state, head, encs)
            for j, k in enumerate(keys):
                cache.encoded[k] = encs[j]
                cache.hidden[k] = captured[0][j, :encs[j].ids.shape[0]].clone()
                cache.ref_logp[k] = float(logps[j])
            if (i // batch_size) % 25 == 0:
                log(f"sequence cache: {min(i + batch_size, len(order))}/{len(order)}")
    finally:
        hook.remove()
    cache.seconds += time.perf_counter() - t0
    return cache


def load_initial_weights(model, folder: Path, lora_config) -> int:
    """Start a fresh PEFT model from a trained adapter's LoRA weights (an iteration on new pairs). The adapter must
    have the recipe's LoRA shape (rank, alpha, modules, layers); returns how many tensors were loaded."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from adapters.registry import PEFT_FILES, lora_spec_from_config, read_lora_config

    if not all((folder / f).is_file() for f in PEFT_FILES):
        raise FileNotFoundError(f"init_from {folder}: no PEFT adapter there ({', '.join(PEFT_FILES)})")
    weights = folder / "adapter_model.safetensors"

    def shape(cfg: dict) -> dict:
        return {**lora_spec_from_config(cfg), "layers_to_transform": sorted(cfg.get("layers_to_transform") or [])}

    got, want = shape(read_lora_config(folder)), shape(lora_config.to_dict())
    if got != want:
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        raise ValueError(f"init_from {folder}: its LoRA shape differs from the recipe's (adapter, recipe): {diff}")
    state = {k: v.to(torch.float32) for k, v in load_file(str(weights)).items()}
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ValueError(f"init_from {folder}: {len(result.unexpected_keys)} tensors match no LoRA module "
                         f"(first: {result.unexpected_keys[0]})")
    lora_params = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    if len(state) != lora_params:
        raise ValueError(f"init_from {folder}: {len(state)} tensors for {lora_params} LoRA parameters")
    return len(state)


def train_adapter(base_model: str, cache: SequenceCache, pairs: list[dict], args, out_dir: Path, *,
                  init_from: Path | None = None, log=print) -> dict:
    """Train one LoRA adapter (args: alignment.trainers.TrainArgs) on pairs {chosen_key, rejected_key, margin,
    w_primary, weight} whose sequences are in `cache`; save it as a PEFT folder. Pairs with a sequence the cache
    dropped (too long a prompt) are skipped and counted. `init_from`: a trained adapter to start from (the reference
    stays the base model)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    if first_lora_layer(args.layers_to_transform) != cache.layer:
        raise ValueError(f"the cache starts at layer {cache.layer} but LoRA starts at "
                         f"{first_lora_layer(args.layers_to_transform)}")
    usable = [p for p in pairs if p["chosen_key"] in cache.hidden and p["rejected_key"] in cache.hidden]
    if not usable:
        raise ValueError("no pair has both sequences in the cache")
    torch.manual_seed(args.seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32),
                           args.lora_config())
    if init_from is not None:
        log(f"starting from {init_from} ({load_initial_weights(model, init_from, args.lora_config())} tensors)")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    rng = random.Random(args.seed)
    n_steps = int(len(usable) * args.epochs / args.batch_size + 0.999)
    if args.max_steps > 0:
        n_steps = min(n_steps, args.max_steps)
    order: list[dict] = []
    losses, accs = [], []
    t0 = time.perf_counter()
    for step in range(n_steps):
        while len(order) < args.batch_size:
            epoch = usable[:]
            rng.shuffle(epoch)
            order += epoch
        batch, order = order[:args.batch_size], order[args.batch_size:]
        keys = [p["chosen_key"] for p in batch] + [p["rejected_key"] for p in batch]
        logps = upper_logps(model, cache, keys)
        ref = torch.tensor([cache.ref_logp[k] for k in keys])
        ratio = logps - ref
        chosen, rejected = ratio[:len(batch)], ratio[len(batch):]
        col = {c: torch.tensor([float(p.get(c, d)) for p in batch]) for c, d in
               (("margin", 0.0), ("w_primary", 1.0), ("weight", 1.0))}
        loss = weighted_mean(modpo_loss(chosen, rejected, col["margin"], col["w_primary"], args.beta), col["weight"])
        if args.rpo_alpha > 0:
            loss = loss + args.rpo_alpha * weighted_mean(chosen_nll(logps[:len(batch)], cache, keys[:len(batch)]),
                                                         col["weight"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        accs.append(float((chosen > rejected).float().mean()))
        if step % 20 == 0 or step == n_steps - 1:
            log(f"step {step + 1}/{n_steps} loss {losses[-1]:.4f} (mean of last 20 "
                f"{sum(losses[-20:]) / len(losses[-20:]):.4f}) chosen>rejected {sum(accs[-20:]) / len(accs[-20:]):.2f}")
    seconds = time.perf_counter() - t0
    model.save_pretrained(str(out_dir), safe_serialization=True)
    pair_epochs = n_steps * args.batch_size
    return {"steps": n_steps, "pairs": len(usable), "skipped_pairs": len(pairs) - len(usable),
            "pair_epochs": pair_epochs, "seconds": round(seconds, 2),
            "seconds_per_pair_epoch": round(seconds / max(1, pair_epochs), 4),
            "train_loss": round(sum(losses) / len(losses), 4),
            "final_loss_last20": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "final_accuracy_last20": round(sum(accs[-20:]) / len(accs[-20:]), 3)}
