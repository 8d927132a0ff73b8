"""Attune's grouped CPU LoRA kernels give what vLLM's own torch ops give, skip what is zero, and leave tokens
without an adapter alone."""
import pytest
import torch

from serving.vllm_lora import LiveSlots, add_lora_linear, token_runs

torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

SLOTS, RANK, IN, SLICES = 4, 8, 32, (24, 8, 8)  # a packed q/k/v projection


def _stacked(seed: int, dead: set[tuple[int, int]] = frozenset()):
    """A/B weights per slice as vLLM stacks them ([slots, 1, rows, cols]); `dead` (slot, slice) pairs stay zero."""
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, RANK, IN, generator=g, dtype=torch.bfloat16) for _ in SLICES)
    b = tuple(torch.randn(SLOTS, 1, n, RANK, generator=g, dtype=torch.bfloat16) for n in SLICES)
    for slot, s in dead:
        a[s][slot].zero_()
    return a, b


def _stock(y, x, a, b, scale, indices):
    """vLLM's CPU path (add_shrink into a float32 buffer, then add_expand), for tokens that have an adapter."""
    keep = indices >= 0
    out, offset = y.clone(), 0
    for sa, sb, n in zip(a, b, SLICES):
        buf = torch.zeros(int(keep.sum()), RANK, dtype=torch.float32)
        torch_ops.bgmv_shrink(x[keep], sa, buf, indices[keep], scale)
        part = out[keep]
        torch_ops.bgmv_expand_slice(buf, sb, part, indices[keep], offset, n, add_inputs=True)
        out[keep] = part
        offset += n
    return out


@pytest.mark.parametrize("indices", [[0] * 6, [1, 1, 2, 2, 2, 3], [2, -1, -1, 0, 3, 1], [-1] * 4])
def test_grouped_lora_matches_vllm_torch_ops(indices):
    torch.manual_seed(0)
    a, b = _stacked(1)
    x = torch.randn(len(indices), IN, dtype=torch.bfloat16)
    y = torch.randn(len(indices), sum(SLICES), dtype=torch.bfloat16)
    idx = torch.tensor(indices)
    expected = _stock(y, x, a, b, 0.5, idx)
    got = y.clone()
    assert add_lora_linear(got, x, a, b, 0.5, SLICES, token_runs(indices), LiveSlots())
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    assert torch.equal(got[idx < 0], y[idx < 0])  # no adapter, no change


def test_zero_slots_are_skipped_and_reloading_a_slot_is_seen():
    a, b = _stacked(2, dead={(1, 1), (1, 2)})  # slot 1 targets q only, as Attune's adapters do
    live = LiveSlots()
    assert live(a[1]) == [True, False, True, True]
    x, y = torch.randn(3, IN, dtype=torch.bfloat16), torch.zeros(3, sum(SLICES), dtype=torch.bfloat16)
    assert add_lora_linear(y, x, a, b, 1.0, SLICES, token_runs([1, 1, 1]), live)
    assert y[:, :24].abs().sum() > 0 and y[:, 24:].abs().sum() == 0
    a[1][1].normal_()  # vLLM loads another adapter into slot 1: an in-place write
    assert live(a[1])[1]


def test_token_runs_cut_consecutive_slots_and_drop_no_adapter():
    assert token_runs([3, 3, -1, -1, 0, 0, 0, 3]) == [(0, 2, 3), (4, 7, 0), (7, 8, 3)]
    assert token_runs([]) == [] and token_runs([-1, -1]) == []


def test_unexpected_shapes_fall_back_to_vllm():
    a, b = _stacked(3)
    x, y = torch.randn(2, IN, dtype=torch.bfloat16), torch.zeros(2, sum(SLICES), dtype=torch.bfloat16)
    assert not add_lora_linear(y, x, a, b, 1.0, SLICES, token_runs([0, 0, 0]), LiveSlots())  # more tokens than rows
    assert y.abs().sum() == 0
