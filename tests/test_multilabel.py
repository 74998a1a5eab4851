"""Weak multi-label supervision (Mahajan et al. 2018, "Exploring the Limits of Weakly Supervised Pretraining"):
the multi-label sample format, the `vlp shards tags` writer and `vlp shards verify`, the softmax-over-normalized-
k-hot and BCE losses, class-balanced 1/sqrt(frequency) resampling of tags, label noise, and a real training run."""
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_config
from vlp.config import SourceConfig, config_from_dict
from vlp.data.format import parse_sample
from vlp.data.mixing import make_loader, padded_labels
from vlp.data.sources import Source, acceptance
from vlp.objectives.multilabel import (MultiLabelObjective, bce_multilabel_loss, mean_average_precision, multi_hot,
                                       precision_at_1, softmax_multilabel_loss)
from vlp.shards.readers import write_tags
from vlp.shards.write import write_samples

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EXTRA = ["even", "odd", "small", "large"]


def digit_tags(y: int) -> list[str]:
    """A digit's weak labels: its name, its parity, small (< 5) or large."""
    return [DIGITS[y], EXTRA[y % 2], EXTRA[2 + (y >= 5)]]


def write_digit_tag_list(folder: Path, n: int | None = None) -> Path:
    """The demo's digits (scikit-learn) as JPEG files plus a ``vlp shards tags`` list ``IMAGE<TAB>tag,tag,tag``."""
    from vlp.demo import digit_jpeg, split_digits

    digits, test, labeled, paired, unlabeled = split_digits(0)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in (labeled + paired + unlabeled)[:n]:
        (folder / f"d{i:05d}.jpg").write_bytes(digit_jpeg(digits.data[i]))
        lines.append(f"d{i:05d}.jpg\t{','.join(digit_tags(int(digits.target[i])))}")
    (folder / "tags.tsv").write_text("\n".join(lines) + "\n")
    (folder / "classes.txt").write_text("\n".join(DIGITS + EXTRA) + "\n")
    return folder / "tags.tsv"


def vlp(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def tag_shards(tmp_path_factory) -> Path:
    """The digits as multi-label shards, written by `vlp shards tags` (a real subprocess)."""
    root = tmp_path_factory.mktemp("tags")
    tsv = write_digit_tag_list(root / "images")
    proc = vlp("shards", "tags", "--list", tsv, root / "shards", "--classnames", root / "images" / "classes.txt",
               "--maxcount", 400)
    assert proc.returncode == 0, proc.stderr
    assert "14 classes" in proc.stdout
    return root / "shards"


# ---------------------------------------------------------------------------------------------- the losses


def test_softmax_loss_is_the_papers_cross_entropy_with_the_normalized_k_hot_target():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0]])
    labels = torch.tensor([[0, 2, -1], [1, 2, 3], [3, -1, -1]])
    target = multi_hot(labels, 4)
    assert target.tolist() == [[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 1]]
    # by hand: p = softmax(z); row loss = -sum_c (1/k) log p_c over the k labels of the row; mean over rows
    rows = []
    for z, ids in ((logits[0], [0, 2]), (logits[1], [1, 2, 3]), (logits[2], [3])):
        logp = [float(z[c]) - math.log(sum(math.exp(float(v)) for v in z)) for c in range(4)]
        rows.append(-sum(logp[c] for c in ids) / len(ids))
    expected = sum(rows) / 3
    assert softmax_multilabel_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    # the 1-hot case is plain cross-entropy
    assert softmax_multilabel_loss(logits, multi_hot(torch.tensor([2, 0, 1]), 4)).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([2, 0, 1])).item(), abs=1e-6)
    # BCE: per-class sigmoid binary cross-entropy on the k-hot vector, mean over rows and classes
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    bce = [-(t * math.log(sig(float(z))) + (1 - t) * math.log(1 - sig(float(z))))
           for zr, tr in zip(logits, target) for z, t in zip(zr, tr.tolist())]
    assert bce_multilabel_loss(logits, target).item() == pytest.approx(sum(bce) / len(bce), abs=1e-6)
    assert precision_at_1(logits, target).item() == pytest.approx(2 / 3)  # row 2's argmax (0, a tie) is not 3


def test_objective_reads_batch_labels_and_mean_average_precision_by_hand():
    obj = MultiLabelObjective(MultiLabelObjective.Config(loss="softmax"))

    class B(dict):
        labels = torch.tensor([[0, 2], [1, -1], [-1, -1]])

    batch = B(label=torch.tensor([0, 1, -1]))
    logits = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 0.0], [9.0, 9.0, 9.0]])  # the last row is not labeled
    loss, m = obj({"class_logits": logits}, batch)
    assert loss.item() == pytest.approx(softmax_multilabel_loss(logits[:2], multi_hot(B.labels[:2], 3)).item())
    assert m["p@1"].item() == 1.0
    # class 0 positives {0}: ranks [row0, row1] -> AP 1; class 1 positives {1}: ranking row1 first -> 1;
    # class 2 positives {0}: scores [1, 0] -> 1. A swap makes class 1's AP 1/2.
    t = multi_hot(B.labels[:2], 3)
    assert mean_average_precision(logits[:2], t) == 1.0
    assert mean_average_precision(torch.tensor([[0.0, 3.0, 1.0], [0.0, 2.0, 0.0]]), t) == pytest.approx((1 + .5 + 1) / 3)


# ---------------------------------------------------------------------------------------------- the format


def test_multilabel_samples_parse_and_bad_ones_say_why():
    names = DIGITS + EXTRA
    p = lambda **kw: parse_sample({"jpg": b"x", **{k: v.encode() for k, v in kw.items()}}, "labeled", names)  # noqa
    assert p(cls="3,11, 12")["labels"] == [3, 11, 12] and p(cls="3 11")["label"] == 3
    assert p(tags="three\nodd, small")["labels"] == [3, 11, 12]
    assert p(cls="3", tags="odd")["labels"] == [3, 11]
    assert p(cls="3") == {"image": b"x", "text": None, "label": 3}  # single label: as it always was
    assert str(p(cls="3,3")).startswith("duplicate label")
    assert str(p(cls="3", tags="three")).startswith("duplicate label")
    assert str(p(cls="3,14")).startswith("label out of range")
    assert str(p(tags="three,prime")).startswith("unknown label: tags 'prime'")
    assert str(p(tags=" , \n")).startswith("no label")
    assert str(parse_sample({"jpg": b"x", "tags": b"odd"}, "labeled")).startswith("unknown label")  # no class names
    rows = [{"label": 3, "labels": [3, 11, 12]}, {"label": 5}, {"label": -1}]
    assert padded_labels(rows).tolist() == [[3, 11, 12], [5, -1, -1], [-1, -1, -1]]
    assert padded_labels([{"label": 5}]) is None


# ---------------------------------------------------------------------------------------------- writer and verify


def test_writer_output_is_judged_clean_and_broken_sets_are_not(tag_shards, tmp_path):
    files = sorted(tag_shards.glob("*.tar"))
    assert len(files) >= 3
    counts = json.loads((tag_shards / "class_counts.json").read_text())
    n = sum(json.loads((tag_shards / "sizes.json").read_text()).values())
    assert sum(counts.values()) == 3 * n and counts["10"] + counts["11"] == n  # every tag counted; even + odd
    proc = vlp("shards", "verify", tag_shards)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok: {n}" in proc.stdout and "kind: labeled" in proc.stdout

    # tampered class file: the counts no longer match the labels in the shards
    bad_counts = tmp_path / "counts"
    bad_counts.mkdir()
    for f in [*files, tag_shards / "sizes.json", tag_shards / "classnames.txt"]:
        (bad_counts / f.name).write_bytes(f.read_bytes())
    (bad_counts / "class_counts.json").write_text(json.dumps({**counts, "0": counts["0"] + 1}))
    proc = vlp("shards", "verify", bad_counts)
    assert proc.returncode == 1 and "class_counts.json: 1 class(es) counted differently" in proc.stdout

    # bad samples: a duplicate id, an id out of range, an unknown tag, a duplicate via a tag
    image = next(tag_shards.parent.glob("images/*.jpg")).read_bytes()
    bad = tmp_path / "bad"
    write_samples([{"__key__": "a", "jpg": image, "cls": "1,2"}, {"__key__": "b", "jpg": image, "cls": "1,1"},
                   {"__key__": "c", "jpg": image, "cls": "1,14"}, {"__key__": "d", "jpg": image, "tags": "one,prime"},
                   {"__key__": "e", "jpg": image, "cls": "1", "tags": "one"}], bad)
    (bad / "classnames.txt").write_text("\n".join(DIGITS + EXTRA) + "\n")
    proc = vlp("shards", "verify", bad)
    assert proc.returncode == 1
    assert "ok: 1" in proc.stdout and "bad: 4" in proc.stdout
    assert "duplicate label=2" in proc.stdout and "label out of range=1" in proc.stdout
    assert "unknown label=1" in proc.stdout and "'prime'" in proc.stdout


def test_writer_skips_lines_it_cannot_label_and_lists_them(tmp_path):
    tsv = write_digit_tag_list(tmp_path / "images", n=6)
    lines = tsv.read_text().splitlines()
    first = lines[0].split("\t")[0]
    lines += [f"{first}\tthree,prime", "missing.jpg\tone", f"{first}\t", f"{first}\tone,one,odd"]
    tsv.write_text("\n".join(lines) + "\n")
    result = write_tags(tsv, tmp_path / "out", classnames=tmp_path / "images" / "classes.txt", shuffle_seed=None)
    assert result["num_samples"] == 7 and result["num_skipped"] == 3
    reasons = " ".join(r for _, r in result["skipped"])
    assert "unknown tag(s) ['prime']" in reasons and "missing image file" in reasons and "no tag" in reasons
    src = Source(SourceConfig(kind="labeled", shards=str(tmp_path / "out" / "*.tar")))
    recs = list(src.records(0, resampled=False, epochs=1))
    assert recs[-1]["labels"] == [1, 11]  # a repeated tag counts once
    assert src.bad.total == 0
    no_tab = tmp_path / "bad.tsv"
    no_tab.write_text("a.jpg one\n")
    proc = vlp("shards", "tags", "--list", no_tab, tmp_path / "x")
    assert proc.returncode == 2 and "bad.tsv:1: want IMAGE<TAB>" in proc.stderr
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").glob("*.tar"))


# ---------------------------------------------------------------------------------------------- resampling


def test_sqrt_resampling_of_tags_matches_the_formula_on_a_skewed_set(tmp_path):
    """Mahajan et al. resample hashtags by 1/sqrt(frequency): a record is kept with the mean of its tags' weights
    n_t^(-1/2) / max_t n_t^(-1/2), so tag t appears sum over its records of that mean times per epoch."""
    images = tmp_path / "images"
    write_digit_tag_list(images, n=1)
    jpg = next(images.glob("*.jpg")).name
    skew = {"head": 400, "mid": 100, "tail": 25}
    lines = [f"{jpg}\t{t}" for t, n in skew.items() for _ in range(n)] + [f"{jpg}\thead,tail"] * 20
    (images / "skew.tsv").write_text("\n".join(lines) + "\n")
    write_tags(images / "skew.tsv", tmp_path / "skew", maxcount=200)
    names = (tmp_path / "skew" / "classnames.txt").read_text().split()
    counts = {names[int(k)]: v for k, v in json.loads((tmp_path / "skew" / "class_counts.json").read_text()).items()}
    assert counts == {"head": 420, "mid": 100, "tail": 45}
    w = {t: n ** -0.5 for t, n in counts.items()}
    top = max(w.values())
    keep = lambda tags: sum(w[t] / top for t in tags) / len(tags)  # noqa: E731
    records = [[t] for t, n in skew.items() for _ in range(n)] + [["head", "tail"]] * 20
    expected = Counter()
    for tags in records:
        for t in tags:
            expected[t] += keep(tags)

    src = Source(SourceConfig(kind="labeled", shards=str(tmp_path / "skew" / "*.tar"), balance="sqrt"))
    epochs = 30
    seen = Counter()
    keys = []
    for r in src.records(7, resampled=False, epochs=epochs):
        seen.update(names[c] for c in r.get("labels", [r["label"]]))
        keys.append(r["key"])
    for t in skew:
        assert seen[t] / epochs == pytest.approx(expected[t], rel=0.06), (t, seen[t] / epochs, expected[t])
    assert acceptance(src.accept, {"label": 0, "labels": [0, 2]}) == pytest.approx(
        (src.accept[0] + src.accept[2]) / 2)
    # deterministic given the seed, different for another seed
    again = [r["key"] for r in Source(src.cfg).records(7, resampled=False, epochs=epochs)]
    other = [r["key"] for r in Source(src.cfg).records(8, resampled=False, epochs=epochs)]
    assert again == keys and other != keys


# ---------------------------------------------------------------------------------------------- noise


def test_label_noise_replaces_the_configured_fraction_the_same_way_everywhere(tag_shards, tmp_path):
    spec = str(tag_shards / "*.tar")
    clean = {r["key"]: r["labels"] for r in Source(SourceConfig(kind="labeled", shards=spec)).records(
        0, resampled=False, epochs=1)}
    noisy_src = Source(SourceConfig(kind="labeled", shards=spec, noise=0.2))
    noisy = {r["key"]: r for r in noisy_src.records(0, resampled=False, epochs=1)}
    assert noisy.keys() == clean.keys()
    total = sum(len(v) for v in clean.values())
    changed = sum(a != b for k in clean for a, b in zip(clean[k], noisy[k]["labels"]))
    # each label is replaced with probability 0.2 (binomial: sd ~ 0.006 at ~4,500 labels)
    assert changed / total == pytest.approx(0.2, abs=0.03)
    for k, r in noisy.items():
        assert len(set(r["labels"])) == len(r["labels"]) == 3 and r["label"] == r["labels"][0]
        assert all(0 <= c < 14 for c in r["labels"])
    # the same labels in two workers' split of the shards, in another seed's order, and after a "resume"
    split = {}
    for w in range(2):
        src = Source(SourceConfig(kind="labeled", shards=spec, noise=0.2))
        split.update({r["key"]: r["labels"] for r in src.records(0, 0, 1, w, 2, resampled=False, epochs=1,
                                                                  shuffle_buffer=50)})
    assert split == {k: r["labels"] for k, r in noisy.items()}
    second_epoch = list(noisy_src.records(0, resampled=False, epochs=2))[len(noisy):]
    assert all(r["labels"] == noisy[r["key"]]["labels"] for r in second_epoch)
    other_seed = {r["key"]: r["labels"] for r in Source(noisy_src.cfg).records(1, resampled=False, epochs=1)}
    assert other_seed != {k: r["labels"] for k, r in noisy.items()}
    nonames = tmp_path / "nonames"
    nonames.mkdir()
    tar = next(tag_shards.glob("*.tar"))
    (nonames / tar.name).write_bytes(tar.read_bytes())
    with pytest.raises(ValueError, match="noise=0.2 needs class names"):
        Source(SourceConfig(kind="labeled", shards=str(nonames / "*.tar"), noise=0.2))


# ---------------------------------------------------------------------------------------------- training


def test_multilabel_run_trains_and_evaluates(tag_shards, demo_data, tmp_path):
    """The real trainer on the written multi-label shards (softmax loss, sqrt resampling, 10% noise); its loss on
    a real batch is the paper's formula; kNN eval on the demo's held-out digits; the head's mAP on the tag set."""
    cfg = run_config(
        demo_data, tmp_path / "run",
        model={"name": "vlp-test-vit", "mask_ratio": 0.0},
        data={"sources": [{"name": "tags", "kind": "labeled", "shards": str(tag_shards / "*.tar"),
                           "balance": "sqrt", "noise": 0.1}],
              "batch": {"labeled": 16}, "workers": 1, "shuffle_buffer": 100},
        optim={"lr": 3e-3, "warmup_steps": 2},
        train={"steps": 12, "log_every": 4, "save_every": 100, "progress": False},
        eval={"knn": {"shards": str(demo_data / "test" / "*.tar"), "k": 5, "max_samples": 200}})
    cfg["objectives"] = {"multilabel": {"weight": 1.0, "loss": "softmax"}}
    from vlp.train import Trainer

    trainer = Trainer(config_from_dict(cfg))
    assert trainer.task.num_classes == 14
    batch, _ = next(iter(make_loader(trainer.dataset, 0)))
    assert batch.labels.shape == (16, 3) and (batch.labels >= 0).all()
    loss, metrics = trainer.compute_loss(batch, 0)
    logits = trainer.task.student(batch)["class_logits"]
    assert metrics["loss/multilabel"].item() == pytest.approx(
        softmax_multilabel_loss(logits, multi_hot(batch.labels, 14)).item(), abs=1e-5)
    result = trainer.fit()
    assert result["step"] == 12 and math.isfinite(result["loss/multilabel"]) and "multilabel/p@1" in result
    trainer.evaluate()
    assert 0.0 <= trainer.eval_metrics["knn/top1"] <= 1.0
    # the trained head on the tag set: mAP over the 14 classes
    student = trainer.task.student.eval()
    with torch.no_grad():
        logits = student(batch)["class_logits"]
    assert 0.0 < mean_average_precision(logits, multi_hot(batch.labels, 14)) <= 1.0
    trainer.accelerator.end_training()
    with pytest.raises(Exception, match="drop objectives.supervised"):
        config_from_dict({**cfg, "objectives": {"multilabel": {"weight": 1.0}, "supervised": {"weight": 1.0}}})


def test_supervised_objective_says_it_trains_multilabel_rows_on_their_first_label(caplog):
    from vlp.objectives.supervised import SupervisedObjective

    class B(dict):
        labels = torch.tensor([[0, 2], [1, -1]])

    logits = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    with caplog.at_level("WARNING"):
        loss, _ = SupervisedObjective()({"class_logits": logits}, B(label=torch.tensor([0, 1])))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([0, 1])).item())
    assert "first label only; objectives.multilabel" in caplog.text


def test_noisy_multilabel_batches_resume_exactly(tag_shards):
    """A resumed stream (start_batch) rebuilds the fresh run's later batches, noisy labels included."""
    import torchvision.transforms as T

    from vlp.config import DataConfig
    from vlp.data.mixing import MixedBatches

    data = DataConfig(sources=[SourceConfig(kind="labeled", shards=str(tag_shards / "*.tar"), noise=0.3,
                                            balance="sqrt")], batch={"labeled": 6}, workers=0, shuffle_buffer=20)
    make = lambda: MixedBatches(data, T.Compose([T.Resize(16), T.ToTensor()]),  # noqa: E731
                                lambda texts: torch.zeros(len(texts), 4, dtype=torch.long), seed=3)
    fresh = iter(make())
    batches = [next(fresh)[0] for _ in range(4)]
    assert all(b.labels.shape == (6, 3) for b in batches)
    resumed = make()
    resumed.start_batch = 2
    it = iter(resumed)
    for want in batches[2:]:
        got = next(it)[0]
        assert torch.equal(got.labels, want.labels) and torch.equal(got.label, want.label)
        assert torch.equal(got.image, want.image)
