"""CRD against a tiny example worked out in plain Python, an independent float64 re-implementation of
RepDistiller's ``CRDLoss`` / ``ContrastMemory`` / ``ContrastLoss`` (same fixed negatives), and its memory-bank, Z
and sampling rules."""

import math
from collections import Counter

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.losses import kd_loss
from kdbench.method import METHODS, validate_config
from kdbench.models import create_model
from kdbench.taps import probe_shapes

from conftest import CRD_PAIRS, method_module, zoo_step

EPS = 1e-7


def build(n=5, s_dim=3, t_dim=3, classes=4, **overrides):
    cls = METHODS.get("crd")
    config = validate_config(cls, overrides)
    s_shapes = {"logits": (classes,), "embedding": (s_dim,), "index": (n,)}
    t_shapes = {"logits": (classes,), "embedding": (t_dim,)}
    return cls(config, s_shapes, t_shapes).double()


def fix_negatives(method, negatives):
    method.draw_negatives = lambda index, target: torch.as_tensor(negatives)


def identity_heads(method):
    with torch.no_grad():
        for head in (method.embed_s, method.embed_t):
            head.weight.copy_(torch.eye(*head.weight.shape, dtype=torch.float64))
            head.bias.zero_()


def taps(f_s, f_t, index, logits=None, t_logits=None):
    b = len(index)
    logits = torch.zeros(b, 4, dtype=torch.float64) if logits is None else logits
    t_logits = torch.zeros(b, 4, dtype=torch.float64) if t_logits is None else t_logits
    student = {"logits": logits, "embedding": f_s, "index": torch.as_tensor(index)}
    return student, {"logits": t_logits, "embedding": f_t}


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def hand_nce(anchors, bank, rows, tau, n, z=None):
    """ContrastLoss on exp(<bank[j], anchor>/τ)/Z in plain Python; Z = n · mean(exp) of this batch unless given."""
    exps = [[math.exp(dot(bank[j], a) / tau) for j in r] for a, r in zip(anchors, rows)]
    if z is None:
        z = n * sum(map(sum, exps)) / sum(map(len, exps))
    k = len(rows[0]) - 1
    c = k / n
    total = 0.0
    for row in exps:
        p = [e / z for e in row]
        total += math.log(p[0] / (p[0] + c + EPS)) + sum(math.log(c / (q + c + EPS)) for q in p[1:])
    return -total / len(rows), z


def hand_ce(logits, target):
    return sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, target)) / len(target)


# --- a tiny bank: N = 5, K = 2, feat 3, fixed negatives

BANK_S = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0], [0.0, 0.6, -0.8]]
BANK_T = [[0.0, 0.0, 1.0], [0.8, 0.0, 0.6], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.6, 0.0, 0.8]]
F_S = [[1.0, 2.0, 2.0], [3.0, 0.0, -4.0]]
F_T = [[2.0, -1.0, 2.0], [0.0, 3.0, 4.0]]
INDEX, NEGATIVES = [1, 3], [[0, 4], [2, 0]]


def tiny(**overrides):
    method = build(feat_dim=3, **overrides)
    identity_heads(method)
    with torch.no_grad():
        method.memory_s.copy_(torch.tensor(BANK_S, dtype=torch.float64))
        method.memory_t.copy_(torch.tensor(BANK_T, dtype=torch.float64))
    fix_negatives(method, NEGATIVES)
    return method


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_hand_computed_nce_loss(tau):
    method = tiny(nce_t=tau, crd_weight=0.8)
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 0.0, -2.0]], dtype=torch.float64)
    student, teacher = taps(torch.tensor(F_S, dtype=torch.float64), torch.tensor(F_T, dtype=torch.float64), INDEX,
                            logits)
    terms = method.loss(student, teacher, torch.tensor([2, 0]), 0.0)
    assert set(terms) == {"ce", "crd"}
    rows = [[i, *neg] for i, neg in zip(INDEX, NEGATIVES)]
    e_s, e_t = [unit(v) for v in F_S], [unit(v) for v in F_T]
    loss_s, z_s = hand_nce(e_s, BANK_T, rows, tau, 5)  # student anchors, teacher bank
    loss_t, z_t = hand_nce(e_t, BANK_S, rows, tau, 5)  # teacher anchors, student bank
    assert terms["crd"].item() == pytest.approx(0.8 * (loss_s + loss_t), rel=1e-9)
    assert terms["ce"].item() == pytest.approx(hand_ce(logits.tolist(), [2, 0]), rel=1e-9)
    assert method.z.tolist() == pytest.approx([z_s, z_t], rel=1e-9)


def test_worked_example_with_orthogonal_bank():
    # Every bank row orthogonal to every embedding: all scores 0, exp = 1, Z = N · 1 = 5, P = 1/5; K/N = 2/5.
    # Per sample: log((1/5) / (3/5)) + 2 · log((2/5) / (3/5)) = −ln 3 − 2 ln(3/2) = −ln(27/4); two anchors.
    method = tiny(crd_weight=1.0)
    with torch.no_grad():
        method.memory_s.zero_()
        method.memory_t.zero_()
        method.memory_s[:, 2] = 1.0
        method.memory_t[:, 2] = 1.0
    f = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    terms = method.loss(*taps(f, f, INDEX), torch.tensor([0, 1]), 0.0)
    assert terms["crd"].item() == pytest.approx(2 * math.log(27 / 4), rel=1e-6)  # 3.819085
    assert method.z.tolist() == pytest.approx([5.0, 5.0])


@pytest.mark.parametrize("momentum", [0.5, 0.0, 0.9])
def test_memory_update_by_hand(momentum):
    method = tiny(nce_m=momentum)
    student, teacher = taps(torch.tensor(F_S, dtype=torch.float64), torch.tensor(F_T, dtype=torch.float64), INDEX)
    method.loss(student, teacher, torch.tensor([2, 0]), 0.0)
    # the loss read the banks as they were; they move after the step
    assert method.memory_s.tolist() == BANK_S and method.memory_t.tolist() == BANK_T
    method.on_step_end(0.0)
    for bank, old, feats in ((method.memory_s, BANK_S, F_S), (method.memory_t, BANK_T, F_T)):
        expected = [row[:] for row in old]
        for i, f in zip(INDEX, feats):
            expected[i] = unit([momentum * o + (1 - momentum) * e for o, e in zip(old[i], unit(f))])
        torch.testing.assert_close(bank, torch.tensor(expected, dtype=torch.float64))
    method.on_step_end(0.0)  # nothing pending: no second update
    assert method.memory_s[INDEX[0]].tolist() == pytest.approx(
        unit([momentum * o + (1 - momentum) * e for o, e in zip(BANK_S[1], unit(F_S[0]))]))


def test_pending_update_is_applied_by_the_next_loss():
    first, second = tiny(), tiny()
    for method in (first, second):
        student, teacher = taps(torch.tensor(F_S, dtype=torch.float64), torch.tensor(F_T, dtype=torch.float64), INDEX)
        method.loss(student, teacher, torch.tensor([2, 0]), 0.0)
    first.on_step_end(0.0)
    f2 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    a = first.loss(*taps(f2, f2, [0, 4]), torch.tensor([1, 1]), 0.0)
    b = second.loss(*taps(f2, f2, [0, 4]), torch.tensor([1, 1]), 0.0)  # no on_step_end: applied first
    assert a["crd"].item() == pytest.approx(b["crd"].item(), rel=1e-12)


def test_z_is_set_once_then_fixed():
    method = tiny()
    assert method.z.tolist() == [-1.0, -1.0]
    f1_s, f1_t = torch.tensor(F_S, dtype=torch.float64), torch.tensor(F_T, dtype=torch.float64)
    method.loss(*taps(f1_s, f1_t, INDEX), torch.tensor([2, 0]), 0.0)
    z = method.z.clone()
    method.on_step_end(0.0)
    bank_s, bank_t = method.memory_s.tolist(), method.memory_t.tolist()
    f2_s = torch.tensor([[0.0, 1.0, 1.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    f2_t = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    fix_negatives(method, [[3, 1], [4, 4]])
    terms = method.loss(*taps(f2_s, f2_t, [0, 2]), torch.tensor([1, 3]), 0.0)
    assert torch.equal(method.z, z)
    rows = [[0, 3, 1], [2, 4, 4]]
    loss_s, _ = hand_nce([unit(v) for v in f2_s.tolist()], bank_t, rows, 0.07, 5, z=z[0].item())
    loss_t, _ = hand_nce([unit(v) for v in f2_t.tolist()], bank_s, rows, 0.07, 5, z=z[1].item())
    assert terms["crd"].item() == pytest.approx(0.8 * (loss_s + loss_t), rel=1e-9)
    # and it differs from what a Z re-estimated on this batch would give
    assert terms["crd"].item() != pytest.approx(0.8 * hand_nce([unit(v) for v in f2_s.tolist()], bank_t, rows, 0.07,
                                                               5)[0], rel=1e-3)


def test_resumed_state_gives_the_same_loss():
    """Banks, Z and labels are in the state dict: a method rebuilt from it continues exactly."""
    torch.manual_seed(0)
    first = build(n=20, s_dim=6, t_dim=7)
    g = torch.Generator().manual_seed(1)
    batch = lambda: taps(torch.randn(4, 6, generator=g, dtype=torch.float64),  # noqa: E731
                         torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randperm(20, generator=g)[:4])
    first.loss(*batch(), torch.tensor([0, 1, 2, 3]), 0.0)
    first.on_step_end(0.0)
    torch.manual_seed(5)
    second = build(n=20, s_dim=6, t_dim=7)
    second.load_state_dict(first.state_dict())
    student, teacher = batch()
    losses = []
    for method in (first, second):
        torch.manual_seed(3)  # the same negatives
        losses.append(method.loss(student, teacher, torch.tensor([3, 2, 1, 0]), 0.0)["crd"].item())
    assert losses[0] == losses[1]


# --- an independent re-implementation of RepDistiller's CRD (crd/criterion.py, crd/memory.py), float64


def ref_embed(x, weight, bias):
    x = x.view(x.shape[0], -1) @ weight.T + bias
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


def ref_contrast_loss(x, n_data):
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + EPS)).log()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + EPS)).log()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


def ref_crd(f_s, f_t, heads, memory_v1, memory_v2, y, idx, params):
    """CRDLoss.forward with ContrastMemory.forward; returns the loss, Z and the updated banks (copies)."""
    k, t, z_v1, z_v2, momentum = params
    v1, v2 = ref_embed(f_s, *heads[0]), ref_embed(f_t, *heads[1])
    bsz, (n, d) = v1.size(0), memory_v1.shape
    w1 = torch.index_select(memory_v1, 0, idx.view(-1)).detach().view(bsz, k + 1, d)
    out_v2 = torch.exp(torch.div(torch.bmm(w1, v2.view(bsz, d, 1)), t))
    w2 = torch.index_select(memory_v2, 0, idx.view(-1)).detach().view(bsz, k + 1, d)
    out_v1 = torch.exp(torch.div(torch.bmm(w2, v1.view(bsz, d, 1)), t))
    if z_v1 < 0:
        z_v1 = (out_v1.mean() * n).item()
    if z_v2 < 0:
        z_v2 = (out_v2.mean() * n).item()
    out_v1, out_v2 = torch.div(out_v1, z_v1), torch.div(out_v2, z_v2)
    banks = []
    with torch.no_grad():
        for memory, v in ((memory_v1, v1), (memory_v2, v2)):
            pos = torch.index_select(memory, 0, y.view(-1)).mul(momentum).add(torch.mul(v, 1 - momentum))
            banks.append(memory.clone().index_copy(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5))))
    loss = ref_contrast_loss(out_v1, n) + ref_contrast_loss(out_v2, n)
    return loss.squeeze(), (z_v1, z_v2), banks


@pytest.mark.parametrize("seed, tau, momentum", [(0, 0.07, 0.5), (1, 0.2, 0.9), (2, 0.07, 0.0)])
def test_matches_reference_value_and_gradient(seed, tau, momentum):
    n, k, b, s_dim, t_dim, d = 40, 9, 6, 7, 5, 4
    torch.manual_seed(seed)
    method = build(n=n, s_dim=s_dim, t_dim=t_dim, feat_dim=d, nce_k=k, nce_t=tau, nce_m=momentum, crd_weight=1.0)
    g = torch.Generator().manual_seed(100 + seed)
    bank_s, bank_t = method.memory_s.clone(), method.memory_t.clone()
    heads = [(m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_())
             for m in (method.embed_s, method.embed_t)]
    z = (-1.0, -1.0)
    for step in range(2):  # the first step sets Z, the second uses it and the updated banks
        index = torch.randperm(n, generator=g)[:b]
        negatives = torch.randint(0, n, (b, k), generator=g)
        negatives = torch.where(negatives == index[:, None], (negatives + 1) % n, negatives)
        f_s = torch.randn(b, s_dim, generator=g, dtype=torch.float64, requires_grad=True)
        f_t = torch.randn(b, t_dim, generator=g, dtype=torch.float64)
        fix_negatives(method, negatives)
        terms = method.loss(*taps(f_s, f_t, index), torch.zeros(b, dtype=torch.long), 0.0)
        params = list(method.embed_s.parameters()) + list(method.embed_t.parameters())
        grads = torch.autograd.grad(terms["crd"], [f_s, *params])
        method.on_step_end(0.0)

        f_s_ref = f_s.detach().clone().requires_grad_()
        idx = torch.cat([index[:, None], negatives], 1)
        loss, z, (bank_s, bank_t) = ref_crd(f_s_ref, f_t, heads, bank_s, bank_t, index, idx, (k, tau, *z, momentum))
        ref_grads = torch.autograd.grad(loss, [f_s_ref, *heads[0], *heads[1]])

        assert terms["crd"].item() == pytest.approx(loss.item(), rel=1e-5)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)
        assert method.z.tolist() == pytest.approx(list(z), rel=1e-9)
        torch.testing.assert_close(method.memory_s, bank_s, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(method.memory_t, bank_t, rtol=1e-9, atol=1e-12)


# --- negatives, K, buffers


def test_bank_scores_backward_is_the_gradient_of_its_forward():
    # rows with repeats (a row drawn twice for one sample, one row for several samples): each counts once per draw
    g = torch.Generator().manual_seed(4)
    anchor = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(7, 5, generator=g, dtype=torch.float64)
    rows = torch.tensor([[0, 3, 3, 6], [1, 0, 5, 2], [2, 6, 0, 0]])
    scores = method_module("crd")._BankScores.apply(anchor, bank, rows)
    torch.testing.assert_close(scores, torch.einsum("bkd,bd->bk", bank[rows], anchor), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda a: method_module("crd")._BankScores.apply(a, bank, rows), (anchor,))


def test_log_add_exp_is_logaddexp_without_overflow():
    x = torch.cat([torch.linspace(-30, 30, 601), torch.tensor([-1e4, -100.0, 100.0, 1e4])]).double()
    for c in (math.log(1024 / 10_000 + EPS), 0.0, 5.0):
        ours = method_module("crd")._log_add_exp(x, c)
        torch.testing.assert_close(ours, torch.logaddexp(x, torch.tensor(c, dtype=torch.float64)), rtol=1e-15, atol=1e-15)
    assert torch.isfinite(method_module("crd")._log_add_exp(x.float(), 0.0)).all()


def test_k_is_bounded_by_the_training_split():
    assert build(n=5).k == 4  # default nce_k 16384 > N − 1
    assert build(n=5, nce_k=3).k == 3
    assert build(n=100000, nce_k=16384).k == 16384
    torch.manual_seed(0)
    method = build(n=5, negatives="other_samples")
    negatives = method.draw_negatives(torch.tensor([0, 4]), torch.tensor([0, 0]))
    assert negatives.shape == (2, 4) and negatives.dtype == torch.long
    with pytest.raises(KdbenchError, match="crd: needs at least 2 training samples"):
        build(n=1)


@pytest.mark.parametrize("negatives", ["other_classes", "other_samples"])
def test_negatives_are_uniform_over_the_other_rows(negatives):
    torch.manual_seed(0)
    method = build(n=5, negatives=negatives)  # no labels known yet: every other row is eligible
    index = torch.arange(5)
    counts = Counter()
    for _ in range(1000):
        for i, row in zip(index.tolist(), method.draw_negatives(index, torch.zeros(5, dtype=torch.long)).tolist()):
            counts.update((i, j) for j in row)
    for i in range(5):
        assert counts[(i, i)] == 0  # the positive is never a negative
        for j in set(range(5)) - {i}:
            assert 900 < counts[(i, j)] < 1100  # 4000 draws over 4 rows: 1000 ± 3.5 σ


def test_other_classes_skips_rows_of_the_anchor_class():
    torch.manual_seed(0)
    method = build(n=6)
    method.labels.copy_(torch.tensor([0, 0, 1, 1, 2, -1]))  # row 5 not seen yet
    drawn = Counter(method.draw_negatives(torch.tensor([0] * 200), torch.tensor([0] * 200)).flatten().tolist())
    assert set(drawn) == {2, 3, 4, 5}  # never row 0 (itself) nor row 1 (same class); unseen row 5 allowed
    method = build(n=6, negatives="other_samples")
    method.labels.copy_(torch.tensor([0, 0, 1, 1, 2, -1]))
    drawn = Counter(method.draw_negatives(torch.tensor([0] * 200), torch.tensor([0] * 200)).flatten().tolist())
    assert set(drawn) == {1, 2, 3, 4, 5}


def test_other_classes_gives_up_when_every_row_is_of_the_class():
    torch.manual_seed(0)
    method = build(n=3)
    method.labels.fill_(7)
    negatives = method.draw_negatives(torch.tensor([1, 2]), torch.tensor([7, 7]))
    assert negatives.shape == (2, 2) and not (negatives == torch.tensor([[1], [2]])).any()


def test_loss_records_labels_and_draws_with_the_global_rng():
    method = build(n=8)
    f = torch.randn(3, 3, dtype=torch.float64)
    method.loss(*taps(f, f, [1, 3, 6]), torch.tensor([2, 0, 2]), 0.0)
    assert method.labels.tolist() == [-1, 2, -1, 0, -1, -1, 2, -1]
    draws = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        draws.append(method.draw_negatives(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_banks_are_buffers_not_parameters():
    method = build(n=10, s_dim=6, t_dim=9, feat_dim=4)
    state = method.state_dict()
    assert {"memory_s", "memory_t", "z", "labels"} <= set(state)
    assert state["memory_s"].shape == state["memory_t"].shape == (10, 4)
    names = {name for name, _ in method.named_parameters()}
    assert names == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
    assert method.embed_s.weight.shape == (4, 6) and method.embed_t.weight.shape == (4, 9)
    stdv = 1 / math.sqrt(4 / 3)
    assert method.memory_s.abs().max() <= stdv and method.memory_t.abs().max() <= stdv
    assert not torch.equal(method.memory_s, method.memory_t)
    assert method.memory_s.dtype == torch.float64  # .double() moved them with the module
    assert sum(p.numel() for p in method.parameters()) == 4 * 6 + 4 + 4 * 9 + 4


# --- config


def test_weights_and_kd_term():
    method = tiny(crd_weight=0.8, ce_weight=0.5)
    f_s, f_t = torch.tensor(F_S, dtype=torch.float64), torch.tensor(F_T, dtype=torch.float64)
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 0.0, -2.0]], dtype=torch.float64)
    t_logits = logits.flip(1) * 2
    base = method.loss(*taps(f_s, f_t, INDEX, logits, t_logits), torch.tensor([2, 0]), 0.0)
    assert set(base) == {"ce", "crd"}
    assert base["ce"].item() == pytest.approx(0.5 * hand_ce(logits.tolist(), [2, 0]), rel=1e-9)
    method = tiny(crd_weight=2.0, kd_weight=0.9, temperature=3.0)
    terms = method.loss(*taps(f_s, f_t, INDEX, logits, t_logits), torch.tensor([2, 0]), 0.0)
    assert terms["crd"].item() == pytest.approx(base["crd"].item() / 0.8 * 2.0, rel=1e-9)
    assert terms["kd"].item() == pytest.approx(0.9 * kd_loss(logits, t_logits, 3.0).item(), rel=1e-9)


def test_defaults_are_repdistiller():
    c = METHODS.get("crd").Config()
    assert (c.feat_dim, c.nce_k, c.nce_t, c.nce_m) == (128, 16384, 0.07, 0.5)
    assert (c.crd_weight, c.ce_weight, c.kd_weight, c.temperature) == (0.8, 1.0, 0.0, 4.0)
    assert c.negatives == "other_classes"


@pytest.mark.parametrize(
    "field, value",
    [("crd_weight", -1.0), ("ce_weight", -0.1), ("kd_weight", -2.0), ("temperature", 0.0), ("feat_dim", 0),
     ("nce_k", 0), ("nce_t", 0.0), ("nce_m", 1.0), ("nce_m", -0.1), ("negatives", "same_class"), ("beta", 1.0)],
)
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(KdbenchError, match=f"method crd: {field}"):
        validate_config(METHODS.get("crd"), {field: value})


def test_embedding_must_be_a_vector():
    cls = METHODS.get("crd")
    with pytest.raises(KdbenchError, match="crd: the student's embedding tap has shape"):
        cls(cls.Config(), {"embedding": (3, 4), "index": (10,)}, {"embedding": (5,)})


# --- the CRD zoo (CIFAR-100 models)


@pytest.mark.parametrize("teacher_name, student_name", CRD_PAIRS)
def test_builds_and_steps_on_the_crd_zoo(teacher_name, student_name):
    # the teacher's taps have no 'index', so the index given to them is not used (the test gave none before)
    run = zoo_step("crd", teacher_name, student_name, [5, 99], index=[7, 41], train_size=50, progress=0.0)
    student, method, terms, index = run.student, run.method, run.terms, run.index
    assert method.k == 49 and method.memory_s.shape == (50, 128)
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert method.embed_s.weight.grad.abs().sum() > 0 and method.embed_t.weight.grad.abs().sum() > 0
    method.on_step_end(0.0)
    assert torch.allclose(method.memory_s[index].norm(dim=1), torch.ones(2))


# --- training loop: the banks, Z and labels are part of the checkpoint


def test_interrupted_training_resumes_to_the_same_state(tmp_path):
    from kdbench.config import TrainConfig
    from kdbench.tracks import Split, TrackData
    from kdbench.train import fit

    g = torch.Generator().manual_seed(0)
    split = Split(torch.randn(32, 1, 40, generator=g), torch.randint(0, 10, (32,), generator=g))
    data = TrackData(split, split, split, num_classes=10, in_shape=(1, 40))
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.01)
    torch.manual_seed(0)
    teacher = create_model("cnn1d_w8").eval()

    def models(seed):
        torch.manual_seed(seed)
        student = create_model("cnn1d_w4")
        cls = METHODS.get("crd")
        s_taps, t_taps = cls.taps(cls.Config())
        x = split.x[:2]
        return student, cls(cls.Config(), probe_shapes(student, s_taps, x, 32), probe_shapes(teacher, t_taps, x, 32))

    uninterrupted, method = models(0)
    expected = fit(uninterrupted, method, teacher, data, cfg, seed=3)
    assert (method.z > 0).all() and (method.labels == split.y).all()

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(*models(0), teacher, data, cfg, seed=3, on_epoch=stop_after_two, checkpoint=checkpoint)
    resumed, resumed_method = models(1)  # other initial weights and banks: everything must come from the checkpoint
    assert fit(resumed, resumed_method, teacher, data, cfg, seed=3, checkpoint=checkpoint) == expected
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for name, value in method.state_dict().items():
        assert torch.equal(resumed_method.state_dict()[name], value), name
