"""The sst2 track end to end on tiny local data: GLUE SST-2 tsv files and a tiny BERT saved with save_pretrained
under <data-root>/pretrained/bert-base-uncased (no downloads). The tiny teacher has 12 layers of width 32, so the
student has 6, as in the real pair, and the sst2 suites' method settings apply unchanged."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kdbench.cli import main
from kdbench.taps import MASK, FeatureTaps, probe_shapes
from kdbench.errors import KdbenchError
from kdbench.method import METHODS, validate_config
from kdbench.models import create_model
from kdbench.sources import construct, stand_in_source
from kdbench.suite import load_suite
from kdbench.tracks import load_track
from kdbench.models.bert import MAX_LENGTH

POSITIVE = [
    'a "charming" and often affecting journey .',
    "the film 's best moments are funny , warm and true .",
    "it 's a wonderful , moving story",
    '" a gem " , says everyone , and they are right',
    "great acting , great music , great fun .",
    "one of the best films of the year",
    "smart , funny and good",
    "a warm , funny , engaging film .",
    "the cast is wonderful",
    "moving and true , it 's a joy",
    "funny from start to end",
    "a good film with a good heart .",
    "engaging , smart , and often very funny",
    "it 's a joy to watch",
    "a true gem of a film",
    "the music is great and the story is moving",
    "wonderful",
    "best of the year , a joy",
    "good fun , good acting",
    "a smart film , and a warm one",
    "null",
    "warm and engaging from start to end",
    "the story is a joy .",
    "a funny , moving film",
]
NEGATIVE = [
    "a dull , lifeless film .",
    'the "plot" is a mess , and the acting is bad',
    "it 's boring and far too long",
    "bad acting , bad music , bad film .",
    "one of the worst films of the year",
    "dull and stupid",
    "a mess from start to end",
    "the cast is wasted",
    "boring , long and dull",
    "it 's a bad joke",
    "the worst story , the worst film",
    "too long and too dull .",
    "a stupid , boring mess",
    '" a mess " is the word',
    "lifeless acting and a dull story",
    "bad",
    "far too boring to watch",
    "a waste of a good cast",
    "the music is bad and the story is worse",
    "wasted time , a dull film",
    "NA",
    "stupid and long",
    "the film is a mess .",
    "a bad , boring film",
]
DEV = [
    ('a "wonderful" film , funny and warm', 1), ("the best , a gem", 1), ("a joy from start to end", 1),
    ("smart and moving .", 1), ("good music", 1), ("funny , true , engaging", 1), ("it 's great", 1),
    ("a warm story", 1), ("a dull mess , too long", 0), ('the "acting" is bad', 0), ("boring film .", 0),
    ("the worst", 0), ("lifeless and stupid", 0), ("a waste of time", 0), ("bad , bad , bad", 0), ("too dull", 0),
]
LAYERS, HIDDEN, HEADS = 12, 32, 2


def write_glue(folder, rows) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows["train"]))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows["dev"]))


def write_tiny_bert(folder) -> None:
    """A tiny BERT and its tokenizer (vocabulary: the words of the sentences) in save_pretrained form."""
    from transformers import BertConfig, BertModel, BertTokenizer

    sentences = POSITIVE + NEGATIVE + [s for s, _ in DEV]
    words = sorted({w for s in sentences for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(vocab=str(vocab)).save_pretrained(folder)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=37, max_position_embeddings=MAX_LENGTH)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train = [(s, 1) for s in POSITIVE] + [(s, 0) for s in NEGATIVE]
    write_glue(root / "SST-2", {"train": train[::2] + train[1::2], "dev": DEV})
    write_tiny_bert(root / "pretrained" / "bert-base-uncased")
    return root


@pytest.fixture(scope="module")
def data(root, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # datasets' cache under an isolated home (module scope)
        mp.setenv("KDBENCH_HOME", str(tmp_path_factory.mktemp("home")))
        return load_track("sst2", root)


@pytest.fixture(scope="module")
def pair(root, data):
    torch.manual_seed(0)
    teacher = create_model("bert_base", data.num_classes, data.in_shape, root)
    student = create_model("bert_base_6l", data.num_classes, data.in_shape, root)
    return teacher.eval(), student


# --- the track


def test_splits_shapes_and_stratification(data):
    n = len(POSITIVE) + len(NEGATIVE)
    assert (len(data.train), len(data.val), len(data.test)) == (n - math.ceil(0.1 * n), math.ceil(0.1 * n), len(DEV))
    assert data.in_shape == (2, MAX_LENGTH) and data.num_classes == 2
    for split in (data.train, data.val, data.test):
        assert split.x.dtype == torch.long and split.x.shape[1:] == (2, MAX_LENGTH)
        mask = split.x[:, 1]
        assert set(mask.unique().tolist()) == {0, 1} and torch.all(mask[:, 0] == 1)
        assert torch.all(split.x[:, 0][mask == 0] == 0)  # [PAD] is id 0 where the mask is 0
    assert abs(data.val.y.tolist().count(0) - data.val.y.tolist().count(1)) <= 1  # stratified (5 of 48: 2 / 3)
    assert torch.equal(data.test.y, torch.tensor([y for _, y in DEV]))
    d = data.description
    assert d["max_length"] == MAX_LENGTH and d["val_seed"] == 0
    assert set(d["files"]) == {"SST-2/train.tsv", "SST-2/dev.tsv"}
    assert all(len(h) == 64 for h in [*d["files"].values(), *d["tokenizer_files"].values()])


def test_quotes_and_words_like_null_survive(root, data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "pretrained" / "bert-base-uncased")
    decoded = [tokenizer.decode(x[0][x[1] == 1], skip_special_tokens=True) for x in data.test.x[:1]]
    assert decoded[0].startswith('a " wonderful " film')
    every = [tokenizer.decode(x[0][x[1] == 1], skip_special_tokens=True)
             for x in torch.cat([data.train.x, data.val.x])]
    assert {"null", "na"} <= set(every)  # not parsed as missing values


def test_the_same_files_give_the_same_data(root, data):
    again = load_track("sst2", root)
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.val.y, data.val.y)
    assert again.description == data.description


# --- the models


def test_student_starts_from_every_other_teacher_layer(pair):
    teacher, student = (m.hf for m in pair)
    assert teacher.config.num_hidden_layers == LAYERS and student.config.num_hidden_layers == LAYERS // 2
    t_layers, s_layers = teacher.bert.encoder.layer, student.bert.encoder.layer
    for j, i in enumerate(range(0, LAYERS, 2)):
        for (name, s), (_, t) in zip(s_layers[j].state_dict().items(), t_layers[i].state_dict().items()):
            assert torch.equal(s, t), f"student layer {j} {name} differs from teacher layer {i}"
    assert not torch.equal(s_layers[1].attention.self.query.weight, t_layers[1].attention.self.query.weight)
    for part in ("bert.embeddings", "bert.pooler"):
        s_part, t_part = student.get_submodule(part).state_dict(), teacher.get_submodule(part).state_dict()
        assert all(torch.equal(v, t_part[k]) for k, v in s_part.items())


def test_forward_ignores_padding(pair, data):
    teacher, _ = pair
    x = data.test.x[:2].clone()
    with torch.no_grad():
        before = teacher(x)
        x[:, 0][x[:, 1] == 0] = 7  # other ids at padded positions change nothing
        assert torch.allclose(teacher(x), before, atol=1e-5)


def test_random_init_is_full_size_and_probes_shapes():
    from kdbench.models import count_params

    teacher = create_model("bert_base", random_init=True)
    assert count_params(teacher) == 109_483_778  # bert-base-uncased (109,482,240) + a 2-class head
    assert count_params(create_model("bert_base_6l", random_init=True)) == 66_956_546
    assert next(teacher.parameters()).device.type == "meta"  # shapes without 110 M initialised weights
    sample = torch.zeros(2, 2, MAX_LENGTH, dtype=torch.long, device="meta")
    shapes = probe_shapes(teacher, ["logits", "hidden:11", "attn:0"], sample)
    assert shapes == {"logits": (2,), "hidden:11": (MAX_LENGTH, 768), "attn:0": (12, MAX_LENGTH, MAX_LENGTH),
                      MASK: (MAX_LENGTH,)}


# --- taps


def test_hidden_and_attention_taps(pair, data):
    teacher, student = pair
    x = data.train.x[:3]
    out = FeatureTaps(teacher, ["hidden:0", "stage:-1", "attn:2", "attn:-1"])(x)
    assert out["hidden:0"].shape == (3, MAX_LENGTH, HIDDEN) and out["stage:-1"].shape == (3, MAX_LENGTH, HIDDEN)
    assert torch.equal(out[MASK], x[:, 1])
    attn = out["attn:2"]
    assert attn.shape == (3, HEADS, MAX_LENGTH, MAX_LENGTH)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, HEADS, MAX_LENGTH))
    assert torch.all(attn.masked_select(x[:, 1, None, None, :] == 0) == 0)  # no attention to padding
    student.train()  # attention dropout active: the tap still holds distributions (before dropout)
    s_out = FeatureTaps(student, ["attn:-1", "hidden:5"])(x)
    torch.testing.assert_close(s_out["attn:-1"].sum(-1), torch.ones(3, HEADS, MAX_LENGTH))
    with pytest.raises(Exception, match="has 6 layers"):
        FeatureTaps(student, ["attn:6"])


# --- the attention-map variant of attention transfer (MiniLM)


def test_attention_kl_against_a_hand_computed_value():
    """One sentence of 2 real tokens + 1 padding, 1 head: KL(teacher ‖ student) per real query row, averaged."""
    cls = METHODS.get("attention_transfer")
    config = validate_config(cls, {"maps": "attention", "beta": 2.0, "ce_weight": 0.0})
    assert config.stages == (-1,)
    shapes = {"logits": (2,), "attn:-1": (1, 3, 3), MASK: (3,)}
    method = cls(config, shapes, shapes)
    teacher = torch.tensor([[[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.3, 0.3, 0.4]]]])
    student = torch.tensor([[[[0.25, 0.75, 0.0], [0.5, 0.5, 0.0], [0.9, 0.05, 0.05]]]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    logits = torch.zeros(1, 2)
    terms = method.loss({"logits": logits, "attn:-1": student, MASK: mask},
                        {"logits": logits, "attn:-1": teacher, MASK: mask}, torch.tensor([1]), 0.0)
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = 0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5)
    assert terms["at"].item() == pytest.approx(2.0 * (row0 + row1) / 2, rel=1e-6)
    terms["at"].backward()
    assert torch.all(torch.isfinite(student.grad)) and torch.all(student.grad[0, 0, 2] == 0)  # padded query: no grad


def test_activation_attention_on_hidden_states_leaves_padding_out():
    cls = METHODS.get("attention_transfer")
    method = cls(validate_config(cls, {"stages": [-1]}), *[{"logits": (2,), "stage:-1": (3, 2), MASK: (3,)}] * 2)
    h_s = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]]])
    h_t = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [-5.0, 3.0]]])
    mask, logits = torch.tensor([[1, 1, 0]]), torch.zeros(1, 2)
    terms = method.loss({"logits": logits, "stage:-1": h_s, MASK: mask},
                        {"logits": logits, "stage:-1": h_t, MASK: mask}, torch.tensor([0]), 0.0)
    q_s = torch.tensor([1.0, 2.0]) / math.sqrt(5)  # mean of squares over hidden units, real tokens, L2-normalised
    q_t = torch.tensor([2.0, 1.0]) / math.sqrt(5)
    assert terms["at"].item() == pytest.approx(1000 * ((q_s - q_t) ** 2).mean().item(), rel=1e-6)


# --- every method on the tiny pair, with the suite's settings


# Methods that must work on a transformer (the others may refuse, in one line naming the method).
TAKE_A_STEP_ON_TOKENS = {"baseline", "vanilla_kd", "vanilla_kd+ls", "fitnets", "attention_transfer", "adversarial", "dml",
                         "self_distillation", "multi_teacher"}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_takes_a_step_on_hidden_states(name, pair, data, root):
    teacher, student = pair
    suite = load_suite("sst2")
    cls = METHODS.get(name)
    config = validate_config(cls, suite.tracks["sst2"].methods.get(name, {}))
    s_taps, t_taps = cls.taps(config)
    x, y, index = data.train.x[:4], data.train.y[:4], torch.arange(4)
    model = lambda arch: create_model(arch, data.num_classes, data.in_shape, root)  # noqa: E731
    try:
        teacher = stand_in_source(cls, config, teacher, lambda arch: model(arch or "bert_base"))
        method = construct(cls, config, probe_shapes(student, s_taps, x, len(data.train)),
                           probe_shapes(teacher, t_taps, x, len(data.train)), lambda: model("bert_base_6l"))
    except KdbenchError as exc:  # a method that needs feature maps (or a teacher assistant) says so in one line
        assert name in str(exc) and "\n" not in str(exc) and name not in TAKE_A_STEP_ON_TOKENS
        return
    student.train()
    with torch.no_grad():  # as the trainer
        t_out = FeatureTaps(teacher, t_taps)(x, index) if cls.needs_teacher else None
    terms = method.loss(FeatureTaps(student, s_taps)(x, index), t_out, y, 0.5)
    total = sum(terms.values())
    assert torch.isfinite(total)
    student.zero_grad()
    total.backward()
    assert student.hf.bert.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_padding_does_not_change_the_feature_losses(pair, data):
    """Hidden states and attention at padded positions (changed here by other token ids there) are left out."""
    teacher, student = pair
    suite = load_suite("sst2")
    x = data.test.x[:3]
    x2 = x.clone()
    x2[:, 0][x2[:, 1] == 0] = 9
    student.eval()
    for name in ("fitnets", "attention_transfer", "self_distillation", "sp", "nst", "vid"):
        cls = METHODS.get(name)
        config = validate_config(cls, suite.tracks["sst2"].methods.get(name, {}))
        s_taps, t_taps = cls.taps(config)
        torch.manual_seed(0)
        method = cls(config, probe_shapes(student, s_taps, x), probe_shapes(teacher, t_taps, x)).eval()
        with torch.no_grad():
            losses = [method.loss(FeatureTaps(student, s_taps)(v), FeatureTaps(teacher, t_taps)(v) if cls.needs_teacher
                                  else None, data.test.y[:3], 0.0) for v in (x, x2)]
        for key in losses[0]:
            assert losses[0][key].item() == pytest.approx(losses[1][key].item(), rel=1e-4, abs=1e-6), (name, key)


# --- the smoke suite through the command line, and its errors


def test_smoke_suite_end_to_end(root, tmp_path):
    from kdbench.records import load_records

    assert main(["run", "--suite", "sst2-smoke", "--data-root", str(root), "--results-dir", str(tmp_path / "r")]) == 0
    records = [rec for _, rec in load_records(tmp_path / "r")]
    suite = load_suite("sst2-smoke")
    assert sorted(r.method for r in records) == sorted(set(METHODS.names()) - set(suite.excluded))
    assert "review_kd" in suite.excluded
    assert all(r.status == "finished" and r.track == "sst2" and r.metrics.epochs == 1 for r in records)
    config = records[0].config
    assert config["data"]["limit"] == {"test": 32, "train": 64, "val": 32}
    assert config["data"]["max_length"] == MAX_LENGTH
    assert set(config["pretrained"]) == {"bert_base", "bert_base_6l"}
    assert all(r.metrics.params < r.model_dump()["metrics"]["teacher_params"] for r in records)


@pytest.mark.parametrize("remove", ["SST-2/dev.tsv", "pretrained/bert-base-uncased"])
def test_missing_files_are_one_line_naming_the_path(root, tmp_path, capsys, remove):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    target = copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    code = main(["run", "--suite", "sst2-smoke", "--data-root", str(copy), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(target) in err, err
    assert ("--download" in err) if remove.startswith("SST-2") else ("save_pretrained" in err)


def test_no_data_root_is_one_line(capsys, tmp_path):
    assert main(["run", "--suite", "sst2-smoke", "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data-root" in err
