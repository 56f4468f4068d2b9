"""Each method's loss against a plain PyTorch implementation of the same formula (``nox -s perf``).

For every registered method (variants ``<name>+<tag>`` run the same code and are left out), on the MNIST-1D CPU-tier
shapes (teacher cnn1d_w32, student cnn1d_w8, batch 100, training split of 10,000 for the ``index`` tap), with the
method's default config except takd's assistant (cnn1d_w16, the cpu suite's for this pair) and crd's nce_k = 1024
(the cpu suite's setting, K ≤ N − 1 with N = 10,000). The tap dicts are computed once and the student's are detached
leaves, so a call is the loss's forward plus its backward to the student taps and the method's own parameters.

``plain_<name>`` writes the formula of the method file's docstring out as its reference code does (RepDistiller,
mdistiller, DIST_KD, ...), calling the built method's own trainable submodules (regressors, heads, fusion modules,
discriminator, peers) and, for crd, its memory banks and Z. Each is first checked to give kdbench's total loss and
the same gradients on the student taps; then both are timed in paired rounds in one benchmark per method, the order
alternating per round, and ``extra_info`` records each round's time per call (the report gives the median
per-round ratio plain / ours, ≥ 1.0: kdbench's loss is at least as fast, with its 95 % interval) and how many ops
of one call of ours would make the host wait for a GPU (host syncs, counted by the profiler). Nothing here asserts
a time. No method is skipped.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from kdbench.losses import summed
from kdbench.method import METHODS
from kdbench.models import create_model
from kdbench.sources import construct, stand_in_source
from kdbench.taps import EMBEDDING, INDEX, INPUT, FeatureTaps, probe_shapes

TEACHER, STUDENT, BATCH, TRAIN_SIZE = "cnn1d_w32", "cnn1d_w8", 100, 10_000
CONFIG = {"takd": {"assistant": "cnn1d_w16"}, "crd": {"nce_k": 1024}}
PROGRESS = 0.5  # past every warm-up ramp
ROUNDS, CALLS, WARMUP_CALLS = 30, 20, 5
SEED = 1  # torch's global RNG before each compared call (crd's negatives are drawn from it)
NAMES = [name for name in METHODS.names() if "+" not in name]
# ops that wait for the device on a GPU: a value read back to Python (.item(), `if tensor`) or a data-dependent
# shape (boolean indexing); the profiler sees them on any device
HOST_SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")


pytestmark = pytest.mark.usefixtures("one_thread")  # benchmarks/conftest.py


def build(name: str):
    """(method, student taps as detached leaves, teacher taps or None, labels), all seeded."""
    torch.manual_seed(0)
    cls = METHODS.get(name)
    config = cls.Config(**CONFIG.get(name, {}))
    teacher, student = create_model(TEACHER), create_model(STUDENT)
    x, y, index = torch.randn(BATCH, 1, 40), torch.arange(BATCH) % 10, torch.arange(BATCH)
    s_taps, t_taps = cls.taps(config)
    teacher = stand_in_source(cls, config, teacher, lambda arch: create_model(arch or TEACHER)).eval()
    method = construct(cls, config, probe_shapes(student, s_taps, x, TRAIN_SIZE),
                       probe_shapes(teacher, t_taps, x, TRAIN_SIZE), lambda: create_model(STUDENT))
    with torch.no_grad():
        s_out = FeatureTaps(student, s_taps)(x, index)
        t_out = FeatureTaps(teacher, t_taps)(x, index) if cls.needs_teacher else None
    s_out = {k: v.detach().requires_grad_(v.is_floating_point() and k != INPUT) for k, v in s_out.items()}
    return method, s_out, t_out, y


def stage_taps(method) -> list[str]:
    return [f"stage:{i}" for i in method.config.stages]


def kd(z_s, z_t, temperature):
    """Hinton KD as RepDistiller's ``DistillKL``: T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch-averaged."""
    return F.kl_div(F.log_softmax(z_s / temperature, 1), F.softmax(z_t / temperature, 1),
                    reduction="batchmean") * temperature**2


def plain_baseline(s, t, y, method):
    """CE(z_s, y) (methods/baseline.py)."""
    return F.cross_entropy(s["logits"], y)


def plain_vanilla_kd(s, t, y, method):
    """ce_weight · CE + kd_weight · T² · KL (methods/vanilla_kd.py; RepDistiller ``DistillKL``)."""
    c = method.config
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.kd_weight * kd(s["logits"], t["logits"], c.temperature)


plain_takd = plain_vanilla_kd  # methods/takd.py: vanilla KD from the assistant's logits


def plain_attention_transfer(s, t, y, method):
    """ce_weight · CE + beta · Σ_stages mean (Q_s − Q_t)², Q = normalize(mean_c A^p) (methods/attention_transfer.py;
    RepDistiller ``Attention.at``/``at_loss``; the maps have equal sizes here, so no pooling)."""
    c = method.config

    def at(f):
        return F.normalize(f.pow(c.p).mean(1).view(f.size(0), -1))

    at_loss = sum((at(s[tap]) - at(t[tap])).pow(2).mean() for tap in stage_taps(method))
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.beta * at_loss


def plain_fitnets(s, t, y, method):
    """ce_weight · CE + hint_weight · Σ_i MSE(r_i(F_s^i), F_t^i), the method's regressors r_i (methods/fitnets.py;
    RepDistiller ``HintLoss``; kd_weight 0 by default: no KD term)."""
    c = method.config
    hint = sum(F.mse_loss(r(s[tap]), t[tap]) for r, tap in zip(method.regressors, stage_taps(method)))
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.hint_weight * hint


def plain_nst(s, t, y, method):
    """ce_weight · CE + beta · Σ_stages MMD² with the polynomial kernel of L2-normalised channel rows
    (methods/nst.py; RepDistiller ``NSTLoss.nst_loss``/``poly_kernel``, full_loss)."""
    c = method.config

    def poly(a, b):
        return ((a.unsqueeze(1) * b.unsqueeze(2)).sum(-1) + c.offset).pow(c.degree)

    mmd = 0
    for tap in stage_taps(method):
        f_s = F.normalize(s[tap].view(BATCH, s[tap].shape[1], -1), dim=2)
        f_t = F.normalize(t[tap].view(BATCH, t[tap].shape[1], -1), dim=2)
        mmd = mmd + poly(f_t, f_t).mean() + poly(f_s, f_s).mean() - 2 * poly(f_s, f_t).mean()
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.beta * mmd


def plain_sp(s, t, y, method):
    """ce_weight · CE + beta · Σ_l ‖normalize(G_t) − normalize(G_s)‖²_F / b², G = Q Qᵀ (methods/sp.py; RepDistiller
    ``Similarity.similarity_loss``)."""
    c = method.config
    loss = 0
    for tap in stage_taps(method):
        f_s, f_t = s[tap].view(BATCH, -1), t[tap].view(BATCH, -1)
        g_diff = F.normalize(torch.mm(f_t, f_t.t())) - F.normalize(torch.mm(f_s, f_s.t()))
        loss = loss + (g_diff * g_diff).sum() / (BATCH * BATCH)
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.beta * loss


def plain_pkt(s, t, y, method):
    """ce_weight · CE + beta · mean P_t log((P_t + ε)/(P_s + ε)) of row-normalised cosine kernels (methods/pkt.py;
    RepDistiller ``PKT.cosine_similarity_loss``, without its NaN zeroing, as kdbench)."""
    c, eps = method.config, 1e-7

    def probabilities(f):
        f = f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + eps)
        k = (torch.mm(f, f.t()) + 1.0) / 2.0
        return k / torch.sum(k, dim=1, keepdim=True)

    p_s, p_t = probabilities(s[EMBEDDING]), probabilities(t[EMBEDDING])
    pkt = torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.beta * pkt


def plain_rkd(s, t, y, method):
    """ce_weight · CE + distance_weight · L_D + angle_weight · L_A, smooth-L1 over normalised pairwise distances and
    triplet angles (methods/rkd.py; RepDistiller ``RKDLoss.forward``/``pdist``)."""
    c = method.config

    def pdist(e):
        square = e.pow(2).sum(1)
        d = (square.unsqueeze(1) + square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        d[range(len(e)), range(len(e))] = 0
        return d / d[d > 0].mean()

    def angles(e):
        unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(unit, unit.transpose(1, 2)).view(-1)

    f_s, f_t = s[EMBEDDING], t[EMBEDDING]
    loss_d = F.smooth_l1_loss(pdist(f_s), pdist(f_t))
    loss_a = F.smooth_l1_loss(angles(f_s), angles(f_t))
    return (c.ce_weight * F.cross_entropy(s["logits"], y) + c.distance_weight * loss_d
            + c.angle_weight * loss_a)


def plain_dkd(s, t, y, method):
    """ce_weight · CE + ramp · (alpha · TCKD + beta · NCKD) (methods/dkd.py; mdistiller ``dkd_loss`` with its
    −1000 target mask)."""
    c, temp = method.config, method.config.temperature
    z_s, z_t = s["logits"], t["logits"]
    gt = torch.zeros_like(z_s).scatter_(1, y.unsqueeze(1), 1).bool()
    p_s, p_t = F.softmax(z_s / temp, dim=1), F.softmax(z_t / temp, dim=1)

    def binary(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * ~gt).sum(1, keepdim=True)], dim=1)

    tckd = F.kl_div(torch.log(binary(p_s)), binary(p_t), reduction="sum") * temp**2 / len(y)
    nckd = F.kl_div(F.log_softmax(z_s / temp - 1000.0 * gt, dim=1), F.softmax(z_t / temp - 1000.0 * gt, dim=1),
                    reduction="sum") * temp**2 / len(y)
    ramp = min(PROGRESS / c.warmup_fraction, 1.0)
    return c.ce_weight * F.cross_entropy(z_s, y) + ramp * (c.alpha * tckd + c.beta * nckd)


def plain_dist(s, t, y, method):
    """ce_weight · CE + beta · τ²(1 − inter) + gamma · τ²(1 − intra), Pearson correlations of softened predictions
    (methods/dist.py; DIST_KD ``DIST``, ``pearson_correlation``)."""
    c, tau = method.config, method.config.temperature

    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1)
        return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()

    y_s, y_t = (s["logits"] / tau).softmax(dim=1), (t["logits"] / tau).softmax(dim=1)
    inter, intra = tau**2 * (1 - pearson(y_s, y_t)), tau**2 * (1 - pearson(y_s.t(), y_t.t()))
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.beta * inter + c.gamma * intra


def plain_vid(s, t, y, method):
    """ce_weight · CE + beta · Σ_stages mean ½(log σ² + (μ(s) − t)²/σ²), σ² = log(1 + e^α) + eps, the method's
    regressors μ and α (methods/vid.py; RepDistiller ``VIDLoss.forward``)."""
    c = method.config
    nll = 0
    for regressor, tap in zip(method.regressors, stage_taps(method)):
        var = (torch.log(1.0 + torch.exp(regressor.log_scale)) + c.eps).view(1, -1, 1)
        nll = nll + torch.mean(0.5 * ((regressor.mean(s[tap]) - t[tap]) ** 2 / var + torch.log(var)))
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.beta * nll


def plain_adversarial(s, t, y, method):
    """ce_weight · CE + l1_weight · mean|z_s − z_t| + adv_weight · BCE(D([z_s, onehot(y)]), 1), the method's
    discriminator D (methods/adversarial.py, default conditional D; kd_weight 0 by default: no KD term)."""
    c = method.config
    z_s, z_t = s["logits"], t["logits"]
    d_s = method.adversary(torch.cat([z_s, F.one_hot(y, z_s.shape[1]).float()], dim=1)).squeeze(1)
    loss = (c.ce_weight * F.cross_entropy(z_s, y) + c.l1_weight * (z_s - z_t).abs().mean()
            + c.adv_weight * F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s)))
    return loss + c.kd_weight * kd(z_s, z_t, c.temperature) if c.kd_weight > 0 else loss


def plain_multi_teacher(s, t, y, method):
    """ce_weight · CE + kd_weight · T² · mean_k KL(p_k ‖ p_s), equal weights (methods/multi_teacher.py, default
    weighting; CA-MKD ``AVERAGE_LOSS``)."""
    c = method.config
    k = len(c.teachers)
    soft = sum(kd(s["logits"], t[f"member:{i}"], c.temperature) for i in range(k)) / k
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.kd_weight * soft


def plain_dml(s, t, y, method):
    """Σ_k CE(z_k, y) + kl_weight/(K − 1) · Σ_{l≠k} KL(p_l ‖ p_k), the others detached, with the method's peers
    (methods/dml.py; the paper's Eq. 9–10)."""
    c = method.config
    logits = [s["logits"], *(peer(s[INPUT]) for peer in method.peers)]
    loss = 0
    for i, z in enumerate(logits):
        log_p = F.log_softmax(z, dim=1)
        kl = sum(F.kl_div(log_p, F.softmax(o.detach(), dim=1), reduction="batchmean")
                 for j, o in enumerate(logits) if j != i)
        loss = loss + F.cross_entropy(z, y) + c.kl_weight * kl / (len(logits) - 1)
    return loss


def plain_self_distillation(s, t, y, method):
    """(1 − α) CE(z_C) + Σ_i [(1 − α) CE(q_i) + α T² KL(sg z_C ‖ q_i) + λ Σ (F_i − sg F_C)²], F_C = GAP(stage:-1)
    on these models, the method's heads and classifiers (methods/self_distillation.py; pytorch-be-your-own-teacher
    ``train.py``)."""
    c = method.config
    z_deep = s["logits"]
    deep = s["stage:-1"].mean(2).detach()
    loss = (1 - c.alpha) * F.cross_entropy(z_deep, y)
    for tap, head, classifier in zip(stage_taps(method), method.bottlenecks, method.classifiers):
        feature = head(s[tap])
        logits = classifier(feature)
        loss = (loss + (1 - c.alpha) * F.cross_entropy(logits, y) + c.alpha * kd(logits, z_deep.detach(), c.temperature)
                + c.hint_weight * (feature - deep).pow(2).sum())
    return loss


def plain_review_kd(s, t, y, method):
    """ce_weight · CE + review_weight · ramp · Σ_i HCL(G_i, F_t^i), the ABFs' convolutions from the method, fusion
    and HCL written out (methods/review_kd.py; mdistiller ``ABF.forward``, ``ReviewKD.forward_train``,
    ``hcl_loss``)."""
    c = method.config
    levels = stage_taps(method)
    f_s = [s[tap] for tap in levels] + [s[EMBEDDING].unsqueeze(2)]
    f_t = [t[tap] for tap in levels] + [t[EMBEDDING].unsqueeze(2)]
    outputs, residual = [], None
    for abf, x, teacher_feature in reversed(list(zip(method.abfs, f_s, f_t))):
        x = abf.conv1(x)
        if residual is not None:
            residual = F.interpolate(residual, size=x.shape[-1], mode="nearest")
            z = abf.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, 0:1] + residual * z[:, 1:2]
        if x.shape[-1] != teacher_feature.shape[-1]:
            x = F.interpolate(x, size=teacher_feature.shape[-1], mode="nearest")
        outputs.insert(0, abf.conv2(x))
        residual = x
    hcl = 0
    for g, f in zip(outputs, f_t):
        loss, weight, total = F.mse_loss(g, f), 1.0, 1.0
        for k in c.hcl_levels:
            if k >= g.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool1d(g, k), F.adaptive_avg_pool1d(f, k))
            total += weight
        hcl = hcl + loss / total
    ramp = min(PROGRESS / c.warmup_fraction, 1.0)
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.review_weight * ramp * hcl


def plain_crd(s, t, y, method):
    """ce_weight · CE + crd_weight · (L_NCE(P^s) + L_NCE(P^t)), P = exp(⟨M[j], e⟩/τ)/Z over the positive and K
    negatives of other classes, then the banks' momentum update (methods/crd.py; RepDistiller ``Embed``,
    ``ContrastMemory`` (rows gathered, bmm), ``ContrastLoss``). The heads, banks, Z and seen labels are the
    method's state; the negatives are drawn from torch's global RNG with the same calls as kdbench's
    ``draw_negatives``, so both draw the same rows after the same seed."""
    c, n, k, eps = method.config, method.n_data, method.k, 1e-7
    index = s[INDEX]
    e_s = F.normalize(method.embed_s(s[EMBEDDING]), dim=1)
    e_t = F.normalize(method.embed_t(t[EMBEDDING]), dim=1)
    with torch.no_grad():
        method.labels[index] = y
        negatives = torch.randint(0, n - 1, (BATCH, k))
        negatives += (negatives >= index[:, None]).long()  # never the sample's own row
        for _ in range(64):  # redraw negatives of the anchor's class
            same = method.labels[negatives] == y[:, None]
            if not same.any():
                break
            redrawn = torch.randint(0, n - 1, (int(same.sum()),))
            negatives[same] = redrawn + (redrawn >= index[:, None].expand_as(negatives)[same]).long()
    rows = torch.cat([index[:, None], negatives], dim=1)
    noise = k / n

    def nce(anchor, bank, z):
        p = torch.exp(torch.bmm(bank[rows], anchor.unsqueeze(2)).squeeze(2) / c.nce_t) / z
        log_d1 = torch.log(p[:, 0] / (p[:, 0] + noise + eps))
        log_d0 = torch.log(noise / (p[:, 1:] + noise + eps))
        return -(log_d1.sum() + log_d0.sum()) / BATCH

    crd = nce(e_s, method.memory_t, method.z[0]) + nce(e_t, method.memory_s, method.z[1])
    with torch.no_grad():
        for bank, e in ((method.memory_s, e_s), (method.memory_t, e_t)):
            bank[index] = F.normalize(bank[index] * c.nce_m + e * (1 - c.nce_m), dim=1)
    return c.ce_weight * F.cross_entropy(s["logits"], y) + c.crd_weight * crd


PLAIN = {name[len("plain_"):]: fn for name, fn in globals().items() if name.startswith("plain_")}


def test_every_method_has_a_plain_formula():
    missing = sorted(set(NAMES) - set(PLAIN))
    assert not missing, f"no plain formula for {missing}: add plain_<name> functions to {__file__}"


@pytest.mark.parametrize("name", NAMES)
def test_loss_against_plain_formula(benchmark, name):
    """The same loss and gradients, then paired rounds of CALLS calls (forward + backward) of each."""
    if name not in PLAIN:
        pytest.fail(f"no plain formula for {name}: add plain_{name}(s, t, y, method) to {__file__}", pytrace=False)
    method, s_out, t_out, y = build(name)
    leaves = [v for v in s_out.values() if v.requires_grad]
    calls = {"ours": lambda: summed(method.loss(s_out, t_out, y, PROGRESS).values()),  # as kdbench.train
             "plain": lambda: PLAIN[name](s_out, t_out, y, method)}

    def step(call):
        for leaf in leaves:
            leaf.grad = None
        method.zero_grad(set_to_none=True)
        loss = call()
        loss.backward()
        return loss.detach()

    # ours first: crd's plain formula reads the Z that kdbench's first call sets; neither calls on_step_end, so the
    # banks seen by plain are those ours saw (ours applies its update at the start of its next call)
    checked = {}
    for key, call in calls.items():
        torch.manual_seed(SEED)
        checked[key] = step(call), [leaf.grad for leaf in leaves]
    torch.testing.assert_close(checked["plain"][0], checked["ours"][0], rtol=1e-4, atol=0)
    for plain_grad, ours_grad in zip(checked["plain"][1], checked["ours"][1]):
        if ours_grad is None:  # a tap this loss does not read
            assert plain_grad is None
        else:
            torch.testing.assert_close(plain_grad, ours_grad, rtol=1e-4, atol=1e-5 * ours_grad.abs().max().item())

    times = {key: [] for key in calls}

    def paired_rounds():
        for r in range(ROUNDS):
            for key in list(calls)[:: 1 if r % 2 == 0 else -1]:
                start = time.perf_counter()
                for _ in range(CALLS):
                    step(calls[key])
                times[key].append((time.perf_counter() - start) / CALLS)

    for _ in range(WARMUP_CALLS):
        for call in calls.values():
            step(call)
    benchmark.group = "loss vs plain formula"
    benchmark.pedantic(paired_rounds, rounds=1)
    benchmark.extra_info.update(method=name, seconds_per_call=times, host_syncs=host_syncs(lambda: step(calls["ours"])))


def host_syncs(call) -> int:
    """How many ops of one call would make the host wait for a GPU."""
    with torch.profiler.profile() as profile:
        call()
    return sum(event.count for event in profile.key_averages() if event.key in HOST_SYNCS)
