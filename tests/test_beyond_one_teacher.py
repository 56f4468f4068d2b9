"""Online (dml), progressive (takd) and multi-teacher (multi_teacher) distillation: the contract's peers,
assistants and teacher ensembles (kdbench.sources), and each loss against hand computations and independent
re-implementations of the references' formulas in float64."""

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.cli import main
from kdbench.config import TrainConfig
from kdbench.errors import KdbenchError
from kdbench.losses import kd_loss
from kdbench.method import METHODS, TeacherMember, validate_config
from kdbench.models import count_params, create_model
from kdbench.sources import TeacherEnsemble
from kdbench.taps import FeatureTaps
from kdbench.tracks import Split, TrackData
from kdbench.train import fit

from conftest import run_suite_once


def build(name, shapes=None, **overrides):
    cls = METHODS.get(name)
    shapes = shapes or {"logits": (3,)}
    return cls(validate_config(cls, overrides), shapes, shapes)


def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


ZA = [[1.0, 2.0, -0.5], [0.3, -1.0, 2.0]]
ZB = [[0.5, 0.0, 1.5], [2.0, 1.0, -1.0]]
ZC = [[-1.0, 0.5, 0.25], [1.0, 1.0, 0.0]]
Y = [1, 2]


# ---------------------------------------------------------------- the contract: taps, ensemble


def test_input_tap_is_the_batch_and_member_taps_are_each_teacher():
    torch.manual_seed(0)
    ensemble = TeacherEnsemble([nn.Linear(3, 4), nn.Linear(3, 4)])
    x = torch.randn(5, 3)
    out = FeatureTaps(ensemble, ("input", "member:0", "member:1"))(x)
    assert out["input"] is x
    torch.testing.assert_close(out["member:1"], ensemble.nets[1](x))
    mean_probs = (F.softmax(ensemble.nets[0](x), 1) + F.softmax(ensemble.nets[1](x), 1)) / 2
    torch.testing.assert_close(out["logits"].exp(), mean_probs)  # Hinton et al.: the mean of the distributions
    with pytest.raises(KdbenchError, match="'member:0' is for teacher ensembles"):
        FeatureTaps(nn.Linear(3, 4), ("member:0",))
    with pytest.raises(KdbenchError, match=r"has 2 members \(use member:0 … member:1\)"):
        FeatureTaps(ensemble, ("member:2",))


# ---------------------------------------------------------------- dml


class _Constant(nn.Module):
    """A peer whose logits are a fixed tensor, a parameter so that gradients can reach it."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.detach().clone())

    def forward(self, x):
        return self.logits


def dml_with(peer_logits, classes=3, **overrides):
    cls = METHODS.get("dml")
    config = validate_config(cls, {"networks": len(peer_logits) + 1, **overrides})
    return cls(config, {"logits": (classes,), "input": (1,)}, {}, peers=[_Constant(z) for z in peer_logits])


def test_dml_matches_hand_computation():
    method = dml_with([torch.tensor(ZB)], kl_weight=0.5)
    terms = method.loss({"logits": torch.tensor(ZA), "input": torch.zeros(2, 1)}, None, torch.tensor(Y), 0.0)
    ce_a = sum(-math.log(softmax(z)[y]) for z, y in zip(ZA, Y)) / 2
    ce_b = sum(-math.log(softmax(z)[y]) for z, y in zip(ZB, Y)) / 2
    kl_a = sum(kl(softmax(b), softmax(a)) for a, b in zip(ZA, ZB)) / 2  # KL(p_peer ‖ p_student)
    kl_b = sum(kl(softmax(a), softmax(b)) for a, b in zip(ZA, ZB)) / 2
    expected = {"ce": ce_a, "mutual": 0.5 * kl_a, "peer_ce": ce_b, "peer_mutual": 0.5 * kl_b}
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(expected, rel=1e-6)


def _dml_reference(logits, y):
    """Paper Eq. 9–10 for K networks, written with explicit probabilities: Σ_k [CE_k + 1/(K−1) Σ_{l≠k} KL(p_l ‖ p_k)],
    each p_l a constant for network k."""
    k = len(logits)
    total = 0
    for i, z in enumerate(logits):
        p = torch.softmax(z, 1)
        ce = -torch.log(p[torch.arange(len(y)), y]).mean()
        mutual = 0
        for j, other in enumerate(logits):
            if j != i:
                q = torch.softmax(other, 1).detach()
                mutual = mutual + (q * (torch.log(q) - torch.log(p))).sum(1).mean()
        total = total + ce + mutual / (k - 1)
    return total


def test_dml_equals_the_reference_in_value_and_gradient_for_three_networks():
    torch.manual_seed(0)
    logits = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 5, (6,))
    method = dml_with(logits[1:], classes=5)
    terms = method.loss({"logits": logits[0], "input": torch.zeros(6, 1)}, None, y, 0.0)
    ours = sum(terms.values())
    peer_logits = [p.logits for p in method.peers]
    ref = _dml_reference([logits[0], *peer_logits], y)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    got = torch.autograd.grad(ours, [logits[0], *peer_logits])
    want = torch.autograd.grad(_dml_reference([logits[0], *peer_logits], y), [logits[0], *peer_logits])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-12)


def tiny_data(n=32):
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randn(n, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g))
    return TrackData(split, split, split, num_classes=10, in_shape=(1, 40))


def test_dml_peers_train_and_are_extra_never_part_of_the_student():
    torch.manual_seed(0)
    student, peer = create_model("cnn1d_w4"), create_model("cnn1d_w4")
    before = [p.detach().clone() for p in peer.parameters()]
    cls = METHODS.get("dml")
    method = cls(cls.Config(), {"logits": (10,), "input": (1, 40)}, {}, peers=[peer])
    fit(student, method, None, tiny_data(), TrainConfig(epochs=1, batch_size=8, lr=0.01), 0)
    assert all(not torch.equal(a, b) for a, b in zip(before, peer.parameters()))  # the peer learned
    assert set(student.state_dict()) == set(create_model("cnn1d_w4").state_dict())
    assert count_params(method) == count_params(peer)  # what the table shows as extra


# ---------------------------------------------------------------- takd


def test_takd_step_is_hinton_kd_and_matches_the_reference_form():
    t, lam = 3.0, 0.7
    terms = build("takd", assistant="cnn1d_w8", temperature=t, ce_weight=1 - lam, kd_weight=lam).loss(
        {"logits": torch.tensor(ZA)}, {"logits": torch.tensor(ZB)}, torch.tensor(Y), 0.0)
    ce = sum(-math.log(softmax(z)[y]) for z, y in zip(ZA, Y)) / 2
    soft = sum(kl(softmax(b, t), softmax(a, t)) for a, b in zip(ZA, ZB)) / 2
    assert terms["ce"].item() == pytest.approx((1 - lam) * ce, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(lam * t * t * soft, rel=1e-6)
    # the reference's nn.KLDivLoss() also averages over the 3 classes: ours is 3× its term
    log_p_s, p_t = F.log_softmax(torch.tensor(ZA) / t, 1), F.softmax(torch.tensor(ZB) / t, 1)
    ref = F.kl_div(log_p_s, p_t, reduction="sum") / p_t.numel()  # nn.KLDivLoss()'s default reduction, 'mean'
    assert terms["kd"].item() == pytest.approx(lam * t * t * 3 * ref.item(), rel=1e-6)


def test_takd_without_an_assistant_is_refused_in_one_line():
    with pytest.raises(KdbenchError, match=r"takd needs a teacher assistant: name its architecture per pair"):
        METHODS.get("takd").assistants(METHODS.get("takd").Config())


# ---------------------------------------------------------------- multi_teacher


def _camkd_reference(zs, zts, y, t, weighting):
    """CA-MKD's loops.py in float64: AVERAGE_LOSS = mean over teachers of the batch-mean KL · T²; CAMKD = Σ of
    per-sample KL · T² weighted by (1 − softmax over teachers of their CE) / (K − 1), over B · K."""
    k, b = len(zts), zs.shape[0]
    per_sample = [(F.kl_div(F.log_softmax(zs / t, 1), F.softmax(zt / t, 1), reduction="none") * t * t).sum(1)
                  for zt in zts]
    if weighting == "equal":
        return torch.stack([p.mean() for p in per_sample]).mean()
    loss_t = torch.stack([F.cross_entropy(zt, y, reduction="none") for zt in zts])
    attention = (1.0 - F.softmax(loss_t, dim=0)) / (k - 1)
    return (attention * torch.stack(per_sample)).sum() / (b * k)


def test_multi_teacher_matches_hand_computation_with_both_weightings():
    t = 2.0
    zs, zts, y = torch.tensor(ZA), [torch.tensor(ZB), torch.tensor(ZC)], torch.tensor(Y)
    method = build("multi_teacher", teachers=[{"seed_offset": 0}, {"seed_offset": 1}], temperature=t,
                   ce_weight=0.0, kd_weight=1.0)
    equal = method.loss({"logits": zs}, {"member:0": zts[0], "member:1": zts[1]}, y, 0.0)["kd"]
    kls = [[kl(softmax(b, t), softmax(a, t)) for a, b in zip(ZA, zt)] for zt in (ZB, ZC)]
    assert equal.item() == pytest.approx(t * t * sum(0.5 * kls[0][i] + 0.5 * kls[1][i] for i in range(2)) / 2,
                                         rel=1e-6)
    method = build("multi_teacher", teachers=[{"seed_offset": 0}, {"seed_offset": 1}], temperature=t,
                   ce_weight=0.0, kd_weight=1.0, weighting="confidence")
    confident = method.loss({"logits": zs}, {"member:0": zts[0], "member:1": zts[1]}, y, 0.0)["kd"]
    expected = 0.0
    for i in range(2):
        ce = [-math.log(softmax(zt[i])[Y[i]]) for zt in (ZB, ZC)]
        w = [1 - math.exp(c) / sum(math.exp(v) for v in ce) for c in ce]  # / (K − 1) = 1
        expected += t * t * (w[0] * kls[0][i] + w[1] * kls[1][i]) / 2
    assert confident.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("weighting", ["equal", "confidence"])
def test_multi_teacher_equals_the_ca_mkd_reference_in_value_and_gradient(weighting):
    torch.manual_seed(1)
    k, t = 3, 4.0
    zs = torch.randn(8, 7, dtype=torch.float64, requires_grad=True)
    zts = [torch.randn(8, 7, dtype=torch.float64) * 2 for _ in range(k)]
    y = torch.randint(0, 7, (8,))
    method = build("multi_teacher", shapes={"logits": (7,)}, temperature=t, ce_weight=0.0, kd_weight=1.0,
                   weighting=weighting)
    ours = method.loss({"logits": zs}, {f"member:{i}": z for i, z in enumerate(zts)}, y, 0.0)["kd"]
    ref = _camkd_reference(zs, zts, y, t, weighting) * (k if weighting == "confidence" else 1)  # its extra 1/K
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.autograd.grad(ours, zs)[0], torch.autograd.grad(ref, zs)[0], rtol=1e-5,
                               atol=1e-12)


def test_multi_teacher_with_identical_teachers_is_vanilla_kd():
    torch.manual_seed(2)
    zs, zt, y = torch.randn(16, 10), torch.randn(16, 10) * 3, torch.randint(0, 10, (16,))
    method = build("multi_teacher", shapes={"logits": (10,)}, teachers=[{}, {}], temperature=4.0,
                   weighting="confidence")
    terms = method.loss({"logits": zs}, {"member:0": zt, "member:1": zt}, y, 0.0)
    torch.testing.assert_close(terms["kd"], 0.9 * kd_loss(zs, zt, 4.0), rtol=1e-5, atol=0)


def test_multi_teacher_config_names_its_members():
    config = METHODS.get("multi_teacher").Config()
    assert config.teachers == (TeacherMember(), TeacherMember(seed_offset=1), TeacherMember(seed_offset=2))
    with pytest.raises(KdbenchError, match="teachers"):
        validate_config(METHODS.get("multi_teacher"), {"teachers": []})


# ---------------------------------------------------------------- through the runner


SUITE = """\
name: tiny-sources
tier: cpu
seeds: [0, 1]
methods:
  vanilla_kd: {}
  takd: {assistant: cnn1d_w8}
  multi_teacher: {teachers: [{seed_offset: 0}, {seed_offset: 0}]}
  dml: {}
measure: {threads: 1, throughput_batch: 16, min_run_time: 0.01}
tracks:
  mnist1d:
    pairs:
      - {teacher: cnn1d_w16, student: cnn1d_w4}
    teacher_train: {epochs: 2, batch_size: 200, lr: 0.01}
    train: {epochs: 2, batch_size: 200, lr: 0.01}
"""


@pytest.fixture(scope="module")
def sources_run(tmp_path_factory, session_home):
    root = run_suite_once(tmp_path_factory.mktemp("sources-run"), SUITE, session_home, "--workers", "1")
    records = {}
    for path in (root / "results").rglob("seed*.json"):
        record = json.loads(path.read_text())
        records[record["method"], record["seed"]] = record
    return root, records


def test_the_assistant_is_trained_once_and_shared_by_the_seeds(sources_run, session_home):
    _, records = sources_run
    (first,), (second,) = records["takd", 0]["source"]["assistants"], records["takd", 1]["source"]["assistants"]
    assert first == second and first["architecture"] == "cnn1d_w8"
    assert first["params"] == count_params(create_model("cnn1d_w8")) and first["train_seconds"] > 0
    assert len(list((session_home / "assistants").glob(f"mnist1d-cnn1d_w8-{first['key'][:16]}.safetensors"))) == 1
    assert records["takd", 0]["metrics"]["teacher_params"] == count_params(create_model("cnn1d_w16"))  # the pair's


def test_identical_teachers_train_as_vanilla_kd(sources_run):
    _, records = sources_run
    ensemble = records["multi_teacher", 0]["source"]["teacher_ensemble"]
    assert [m["seed"] for m in ensemble["members"]] == [0, 0] and ensemble["members"][0]["key"] == \
        records["vanilla_kd", 0]["teacher_sha256"]
    for seed in (0, 1):
        kd = [row["train_kd"] for row in records["vanilla_kd", seed]["history"]]
        multi = [row["train_kd"] for row in records["multi_teacher", seed]["history"]]
        assert multi == pytest.approx(kd, rel=1e-4)


def test_dml_records_its_peer_as_extra(sources_run):
    _, records = sources_run
    metrics = records["dml", 0]["metrics"]
    assert metrics["extra_params"] == metrics["params"]  # one peer of the student's architecture
    assert records["dml", 0]["teacher_outputs"] == {"cached": False, "reason": "the method uses no teacher"}


def test_the_leaderboard_shows_the_ensemble_and_the_assistant(sources_run):
    root, _ = sources_run
    assert main(["leaderboard", "--results-dir", str(root / "results"), "--output", str(root / "board.md")]) == 0
    text = (root / "board.md").read_text()
    assert "- `multi_teacher` distils from an ensemble of 2 teachers (test top-1: cnn1d_w16 seed 0" in text
    assert "- `takd` learns from the assistant `cnn1d_w8`" in text


def test_takd_on_a_pair_without_an_assistant_fails_before_training(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(textwrap.dedent(SUITE).replace("takd: {assistant: cnn1d_w8}", "takd: {}"))
    assert main(["run", "--suite", str(suite), "--method", "takd", "--results-dir", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err
    assert "takd needs a teacher assistant" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_the_python_api_trains_dml_peers_and_refuses_what_needs_a_suite():
    import kdbench

    g = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 1, 40, generator=g), torch.randint(0, 10, (64,), generator=g))
    teacher, student = create_model("cnn1d_w8"), create_model("cnn1d_w4")
    _, report = kdbench.distill(teacher, student, data, method="dml", epochs=1, batch_size=16, log=False,
                                timing={"min_run_time": 0.01})
    assert report.extra_params == count_params(student) and "train_peer_mutual" in report.history[0]
    for method in ("takd", "multi_teacher"):
        with pytest.raises(KdbenchError, match=f"{method} trains its own assistants or teacher ensemble"):
            kdbench.distill(teacher, student, data, method=method, epochs=1, log=False)
