"""Parity of the fused HSTU attention ops (genrec.model.ops.hstu_attention_*) with
their plain PyTorch reference, values and gradients, and of the reference with the
model's attention. The Triton kernels run on CPU under TRITON_INTERPRET=1 in a
subprocess (the variable must be set before triton is imported, and must not leak
into other tests), and on a GPU at real sizes when there is one.

Tolerances (max abs difference after scaling by the reference's magnitude, see
assert_close calls): float64 1e-10; float32 1e-4; float16 2e-2 against the float32
reference of the same rounded inputs; bfloat16 5e-2 (GPU only: the interpreter's
tl.dot mis-computes bfloat16 operands); on GPU float32 1e-2, as tl.dot rounds
float32 operands to TF32.
"""

import os
import subprocess
import sys

import pytest
import torch

from genrec.model.ops.hstu_attention_cpu import hstu_attention_cpu
from genrec.model.ops.hstu_attention_reference import hstu_attention_reference

# Lengths 0 and 1, lengths around the tiles (32 rows on CPU at these lengths, 32 in Triton), one over N.
LENGTHS = [5, 0, 1, 64, 65, 33, 130, 9]
TARGETS = [2, 0, 1, 10, 65, 1, 7, 3]  # including a sequence that is all candidates
N = 100
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def make_inputs(lengths, heads=2, dqk=8, dv=12, max_seq_len=N, targets=None, dtype=torch.float32,
                device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    T = int(offsets[-1])
    q, k = (torch.randn(T, heads, dqk, generator=g) for _ in range(2))
    v = torch.randn(T, heads, dv, generator=g)
    # Gaps from seconds to years, so that many time buckets are hit.
    timestamps = torch.randint(0, 10**9, (T,), generator=g)
    target_timestamps = timestamps + torch.randint(-10**4, 10**8, (T,), generator=g)
    position_weights = torch.randn(2 * max_seq_len - 1, generator=g)
    time_weights = torch.randn(129, generator=g)
    num_targets = None if targets is None else torch.tensor(targets)
    tensors = [q, k, v, offsets, timestamps, target_timestamps, position_weights, time_weights, num_targets]
    tensors = [None if t is None else t.to(device) for t in tensors]
    for i in (0, 1, 2):
        tensors[i] = tensors[i].to(dtype).requires_grad_()
    for i in (6, 7):  # the tables stay float32 (float64 in the float64 runs), like parameters under autocast
        tensors[i] = tensors[i].to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    q, k, v, offsets, timestamps, target_timestamps, position_weights, time_weights, num_targets = tensors
    return (q, k, v, offsets, timestamps, target_timestamps, position_weights, time_weights, max_seq_len,
            float(max_seq_len), num_targets)


def values_and_grads(fn, args, seed=1):
    out = fn(*args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    differentiable = [args[i] for i in (0, 1, 2, 6, 7)]
    return [out, *torch.autograd.grad(out, differentiable, grad_out)]


def assert_parity(fn, args, reference_args, tolerance):
    names = ["out", "grad_q", "grad_k", "grad_v", "grad_position_weights", "grad_time_weights"]
    for name, got, want in zip(names, values_and_grads(fn, args), values_and_grads(hstu_attention_reference,
                                                                                  reference_args)):
        scale = max(1.0, float(want.detach().abs().max()))  # table gradients are sums of many terms
        torch.testing.assert_close(got.to(want.dtype), want, rtol=0, atol=tolerance * scale, msg=name)


def test_reference_matches_the_model_attention():
    from genrec.model import hstu_attention
    from genrec.model.relative_bias import RelativeBucketedTimeAndPositionBias, relative_bias_index

    q, k, v, offsets, ts, target_ts, _, _, n, norm, _ = make_inputs([5, 0, 1, 100, 37], dtype=torch.float64)
    bias = RelativeBucketedTimeAndPositionBias(N).double()
    rab = bias(relative_bias_index(ts, target_ts, offsets, 100, N))
    want = hstu_attention(q, k, v, rab, offsets, N)
    got = hstu_attention_reference(q, k, v, offsets, ts, target_ts, bias.position_weights, bias.time_weights, n, norm)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_each_candidate_scores_as_if_alone_after_the_history():
    history, candidates = 20, 4
    q, k, v, offsets, ts, target_ts, pw, tw, n, norm, _ = make_inputs([history + candidates], dtype=torch.float64)
    target_ts[history:] = target_ts[history]  # candidates share the request time
    together = hstu_attention_reference(q, k, v, offsets, ts, target_ts, pw, tw, n, norm, torch.tensor([candidates]))
    for c in range(history, history + candidates):
        keep = torch.cat([torch.arange(history), torch.tensor([c])])
        alone = hstu_attention_reference(q[keep], k[keep], v[keep], torch.tensor([0, history + 1]), ts[keep],
                                         target_ts[keep], pw, tw, n, norm)
        torch.testing.assert_close(together[c], alone[-1], rtol=0, atol=1e-12)
        torch.testing.assert_close(together[:history], alone[:history], rtol=0, atol=1e-12)


@pytest.mark.parametrize("targets", [None, TARGETS], ids=["causal", "targets"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_matches_reference(dtype, targets):
    args = make_inputs(LENGTHS, targets=targets, dtype=dtype)
    assert_parity(hstu_attention_cpu, args, args, TOLERANCE[dtype])


def test_cpu_long_users_larger_tiles_and_recomputed_scores(monkeypatch):
    # Over 512 rows the CPU path takes 64-row tiles; with nothing kept from the forward the backward
    # recomputes every tile's scores (what it does for long sequences).
    import genrec.model.ops.hstu_attention_cpu as cpu

    args = make_inputs([530, 3, 70], heads=1, dqk=4, dv=3, max_seq_len=300, dtype=torch.float64)
    assert cpu.tile_rows(530) == 64
    assert_parity(hstu_attention_cpu, args, args, TOLERANCE[torch.float64])
    monkeypatch.setattr(cpu, "SAVED_SCORES_LIMIT", 0)
    for targets in (None, TARGETS):
        args = make_inputs(LENGTHS, targets=targets, dtype=torch.float64)
        assert_parity(hstu_attention_cpu, args, args, TOLERANCE[torch.float64])


def test_cpu_plan_shared_and_inference_path_give_the_same_values():
    from genrec.model.ops.hstu_attention_cpu import AttentionPlan

    q, k, v, offsets, ts, target_ts, pw, tw, n, norm, num_targets = make_inputs(LENGTHS, targets=TARGETS)
    plan = AttentionPlan(offsets, ts, target_ts, n, tw.numel() - 1, num_targets)
    trained = hstu_attention_cpu(q, k, v, offsets, ts, target_ts, pw, tw, n, norm, num_targets)
    with torch.no_grad():  # nothing kept for a backward, SiLU in place
        inferred = hstu_attention_cpu(q, k, v, offsets, ts, target_ts, pw, tw, n, norm, num_targets, plan=plan)
    torch.testing.assert_close(inferred, trained.detach(), rtol=0, atol=0)
    again = hstu_attention_cpu(q, k, v, offsets, ts, target_ts, pw, tw, n, norm, num_targets, plan=plan)
    torch.testing.assert_close(again, trained, rtol=0, atol=0)


def test_cpu_empty_batch():
    args = make_inputs([0, 0])
    out, *grads = values_and_grads(hstu_attention_cpu, args)
    assert out.shape == (0, 2, 12) and all(float(g.abs().sum()) == 0 for g in grads)


def triton_parity(device: str, lengths, dtypes, heads=2, dqk=8, dv=12, max_seq_len=N, tolerance=TOLERANCE):
    from genrec.model.ops.hstu_attention_triton import hstu_attention_triton

    for dtype in dtypes:
        for targets in (None, TARGETS if lengths == LENGTHS else [min(7, n) for n in lengths]):
            args = make_inputs(lengths, heads, dqk, dv, max_seq_len, targets, dtype, device)
            # The reference in float32 on the same rounded inputs (CPU: no half matmul needed).
            reference_args = [a.detach().float().requires_grad_() if i in (0, 1, 2) else a
                              for i, a in enumerate(args)]
            assert_parity(hstu_attention_triton, args, reference_args, tolerance[dtype])


def test_triton_kernels_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_on_gpu():
    lengths = [1024, 0, 1, 777, 1000, 300]
    triton_parity("cuda", lengths, [torch.float32, torch.bfloat16, torch.float16], heads=4, dqk=64, dv=64,
                  max_seq_len=1024, tolerance={**TOLERANCE, torch.float32: 1e-2})


if __name__ == "__main__":  # run by test_triton_kernels_in_the_interpreter, with TRITON_INTERPRET=1
    assert os.environ.get("TRITON_INTERPRET") == "1"
    triton_parity("cpu", LENGTHS, [torch.float32, torch.float16])
