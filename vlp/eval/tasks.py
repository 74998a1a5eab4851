"""The evaluation-task registry: one :class:`EvalTask` entry per task; :func:`evaluate` and
:func:`vlp.eval.in_training.run_training_eval` dispatch through it.

A task is a function ``run(model, tokenizer, preprocess, data, *, device, batch_size, workers, max_samples,
**options) -> dict`` registered with :func:`register_eval_task`. ``model`` is the bare open_clip model, already
in eval mode; ``options`` are every option of :func:`evaluate` (``classnames``, ``templates``, ``classifier``,
``train_data``, ``test_fraction``, ``seed``, ``k``, ``T``, ``C``, ``ks``) plus any extra keyword, so a task names
the ones it uses and takes ``**_`` for the rest::

    @register_eval_task("mean_norm", needs_text=False)
    def mean_norm(model, tokenizer, preprocess, data, *, device, batch_size, workers, max_samples, **_):
        ...
        return {"mean_norm": value}
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from vlp.eval.data import (CLASSNAMES_FILE, TEMPLATES_FILE, find_classnames, find_dataset_type, find_metadata_file,
                           find_templates, first_sample_keys, is_multilabel_data, labeled_loader,
                           retrieval_loader)
from vlp.eval.multilabel import multilabel_batches, zeroshot_multilabel_eval
from vlp.eval.probe import extract_features, knn_eval, linear_probe, split_train_test
from vlp.eval.retrieval import retrieval_eval
from vlp.eval.zeroshot import build_classifier, load_classifier, unwrap, zeroshot_eval


@dataclass(frozen=True)
class EvalTask:
    """A registered evaluation task.

    ``needs_text``: uses the text tower (and tokenizer); ``shards``: the sample kind it reads from ``data``
    (``labeled``: ``cls`` labels, ``captions``: ``txt``); ``uses_train_data``: takes ``train_data`` shards
    (else splits ``data``); ``aliases``: other accepted spellings of ``name``.
    """
    name: str
    run: Callable[..., dict]
    needs_text: bool = True
    shards: str = "labeled"
    uses_train_data: bool = False
    aliases: tuple[str, ...] = ()
    help: str = ""


EVAL_TASKS: dict[str, EvalTask] = {}


def register_eval_task(name: str, *, needs_text: bool = True, shards: str = "labeled",
                       uses_train_data: bool = False, aliases: tuple[str, ...] = (), help: str = ""):
    """Decorator registering ``run`` as eval task ``name`` (see the module docstring); returns ``run``."""

    def decorator(run: Callable[..., dict]) -> Callable[..., dict]:
        taken = {s for t in EVAL_TASKS.values() for s in (t.name, *t.aliases)} | {"auto"}
        clash = [s for s in (name, *aliases) if s.lower() in taken]
        if clash:
            raise ValueError(f"eval task name {clash[0]!r} is already registered")
        EVAL_TASKS[name] = EvalTask(name, run, needs_text, shards, uses_train_data,
                                    tuple(a.lower() for a in aliases), help)
        return run

    return decorator


def get_eval_task(task: str | None, data=None) -> EvalTask:
    """The task named ``task`` (a name or alias, any case). ``None``/``auto``: from the shards, as clip_benchmark's
    dataset_type: ``dataset_type.txt`` when there is one, else the first sample: several labels (``cls`` ``3,17``
    or ``tags``) -> ``zeroshot_multilabel``, one label (``cls``) -> ``zeroshot``, captions only (``txt`` / ``json``)
    -> ``retrieval``."""
    if task is None or task == "auto":
        kind = find_dataset_type(data) if data is not None else None
        if kind is None and data is not None:
            keys = first_sample_keys(data) or set()
            kind = "retrieval" if "cls" not in keys and keys & {"txt", "json"} else None
            kind = kind or ("multilabel" if is_multilabel_data(data) else None)
        task = "retrieval" if kind and "retrieval" in kind else "zeroshot_multilabel" if kind and "multilabel" in kind \
            else "zeroshot"
    key = str(task).lower()
    for t in EVAL_TASKS.values():
        if key == t.name.lower() or key in t.aliases:
            return t
    raise ValueError(f"unknown eval task {task!r}; known: {', '.join(EVAL_TASKS)} (or auto)")


SHARD_KEYS = {"labeled": ("cls",), "captions": ("txt",), "multilabel": ("cls", "tags")}


def check_shards_fit(entry: EvalTask, data) -> None:
    """Fail at once, naming what is missing, when the first sample of ``data`` lacks what ``entry`` reads
    (retrieval on shards without captions would otherwise run every batch and report NaN)."""
    keys = first_sample_keys(data)
    if entry.shards == "labeled" and keys and is_multilabel_data(data):  # int("3,17") would drop every sample
        raise ValueError(f"eval --task {entry.name}: the samples of {data} carry several labels each; use --task "
                         f"zeroshot_multilabel (mAP), or --task auto")
    need = SHARD_KEYS.get(entry.shards, ())
    if keys is None or not need or any(k in keys for k in need):
        return
    other = "zeroshot" if "cls" in keys else "retrieval" if "txt" in keys else None
    hint = f"; these shards suit --task {other} (or --task auto)" if other and other != entry.name else ""
    raise ValueError(f"eval --task {entry.name}: reads {' or '.join(need)} ({entry.shards}) from each sample, but "
                     f"the first sample of {data} has only {sorted(keys)}{hint}")


def _model_device(model) -> torch.device:
    try:
        return next(unwrap(model).parameters()).device
    except StopIteration:
        return torch.device("cpu")


def evaluate(model, tokenizer, preprocess, task: str, data, *, classnames=None, templates=None, classifier=None,
             batch_size: int = 64, workers: int = 0, max_samples: int | None = None, device=None,
             train_data=None, test_fraction: float = 0.2, seed: int = 0, k: int = 20, T: float = 0.07,
             C: float = 1.0, ks=(1, 5, 10), **options) -> dict:
    """Evaluate ``model`` on shards ``data`` with the registered ``task``; returns the metrics dict.

    - ``zeroshot``: ``classifier`` (a ``[D, C]`` tensor or a saved ``.safetensors``), else one built from
      ``classnames``/``templates`` (found beside the shards when not given) -> ``top1``, ``top5``, ``n``.
    - ``retrieval``: ``image_retrieval_recall@k`` / ``text_retrieval_recall@k`` for ``ks``.
    - ``knn`` / ``linear_probe``: features of ``train_data`` and ``data``, or a ``test_fraction`` split of
      ``data`` -> ``top1``, ``top5``, ``n`` (test samples), ``n_train``.

    ``options``: extra keywords for tasks that take them. Runs under ``torch.no_grad()``; the model is put in
    eval mode and its training mode restored afterwards.
    """
    entry = get_eval_task(task, data)
    check_shards_fit(entry, data)
    if entry.uses_train_data and train_data is not None:
        check_shards_fit(entry, train_data)
    device = torch.device(device) if device is not None else _model_device(model)
    module = unwrap(model)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return entry.run(module, tokenizer, preprocess, data, device=device, batch_size=batch_size,
                             workers=workers, max_samples=max_samples, classnames=classnames,
                             templates=templates, classifier=classifier, train_data=train_data,
                             test_fraction=test_fraction, seed=seed, k=k, T=T, C=C, ks=ks, **options)
    finally:
        module.train(was_training)


# ---------------------------------------------------------------------------------------------- the tasks


@register_eval_task("zeroshot", aliases=("zero-shot", "zero_shot", "zeroshot_classification", "classification"),
                    help="zero-shot classification: top1, top5, mean_per_class_recall")
def run_zeroshot(model, tokenizer, preprocess, data, *, device, batch_size, workers, max_samples, classnames=None,
                 templates=None, classifier=None, default_classnames=None, default_templates=None, **_) -> dict:
    """Top-1/top-5 of a given classifier, else one built from :func:`zeroshot_labels`."""
    if classifier is None:
        names, temps = zeroshot_labels(data, classnames, templates, default_classnames, default_templates)
        weights = build_classifier(model, tokenizer, names, temps, device)
    elif isinstance(classifier, (str, os.PathLike)):
        weights = load_classifier(classifier)[0]
    else:
        weights = classifier
    loader = labeled_loader(data, preprocess, batch_size, workers, max_samples)
    return zeroshot_eval(model, weights, loader, device)


@register_eval_task("zeroshot_multilabel", shards="multilabel",
                    aliases=("multilabel", "zeroshot_multilabel_classification"),
                    help="zero-shot multi-label classification (cls 3,17 or tags): mAP, top1_hit")
def run_zeroshot_multilabel(model, tokenizer, preprocess, data, *, device, batch_size, workers, max_samples,
                            classnames=None, templates=None, classifier=None, default_classnames=None,
                            default_templates=None, **_) -> dict:
    """mAP over classes and top-1 hit rate (:mod:`vlp.eval.multilabel`) of a given or built classifier."""
    names, temps = zeroshot_labels(data, classnames, templates, default_classnames, default_templates)
    if classifier is None:
        weights = build_classifier(model, tokenizer, names, temps, device)
    else:
        weights = load_classifier(classifier)[0] if isinstance(classifier, (str, os.PathLike)) else classifier
    skipped: dict = {}
    batches = multilabel_batches(data, preprocess, names, batch_size, max_samples, skipped)
    return zeroshot_multilabel_eval(model, weights, batches, device, skipped)


def zeroshot_labels(data, classnames=None, templates=None, default_classnames=None, default_templates=None):
    """The class names and templates of a zero-shot classifier, for `vlp eval` and in-training eval alike: those
    given; else the shards' ``classnames.txt`` / ``zeroshot_classification_templates.txt``; else the defaults (in
    training: the run's class names and data.templates); else (templates) open_clip's openai_imagenet."""
    if classnames is None and default_classnames is not None and find_metadata_file(data, CLASSNAMES_FILE) is None:
        classnames = default_classnames
    if templates is None and default_templates is not None and find_metadata_file(data, TEMPLATES_FILE) is None:
        templates = default_templates
    return find_classnames(data, classnames), find_templates(data, templates)


@register_eval_task("retrieval", shards="captions", aliases=("zeroshot_retrieval",),
                    help="image-text retrieval: recall@k both ways")
def run_retrieval(model, tokenizer, preprocess, data, *, device, batch_size, workers, max_samples, ks=(1, 5, 10),
                  **_) -> dict:
    """Image and text retrieval recall@k for ``ks``."""
    loader = retrieval_loader(data, preprocess, batch_size, workers, max_samples)
    return retrieval_eval(model, tokenizer, loader, device, ks)


def probe_features(model, preprocess, data, *, device, batch_size, workers, max_samples, train_data=None,
                   test_fraction: float = 0.2, seed: int = 0, feature: str = "embed"):
    """Image features ``(train_feats, train_labels, test_feats, test_labels)``: of ``train_data`` and ``data``,
    or a ``test_fraction`` split of ``data``; ``feature`` as :func:`vlp.eval.probe.extract_features`."""
    feats, labels = extract_features(model, labeled_loader(data, preprocess, batch_size, workers, max_samples),
                                     device, feature)
    if train_data:
        train_feats, train_labels = extract_features(
            model, labeled_loader(train_data, preprocess, batch_size, workers, max_samples), device, feature)
        return train_feats, train_labels, feats, labels
    return split_train_test(feats, labels, test_fraction, seed)


@register_eval_task("knn", needs_text=False, uses_train_data=True, help="weighted kNN on image features")
def run_knn(model, tokenizer, preprocess, data, *, device, batch_size, workers, max_samples, train_data=None,
            test_fraction: float = 0.2, seed: int = 0, k: int = 20, T: float = 0.07, feature: str = "embed",
            **_) -> dict:
    """Weighted kNN (``k``, temperature ``T``) top-1/top-5 on ``feature`` (embed / pooled); ``n_train``."""
    tr_f, tr_l, te_f, te_l = probe_features(model, preprocess, data, device=device, batch_size=batch_size,
                                            workers=workers, max_samples=max_samples, train_data=train_data,
                                            test_fraction=test_fraction, seed=seed, feature=feature)
    num_classes = int(max(tr_l.max(), te_l.max())) + 1
    metrics = knn_eval(tr_f, tr_l, te_f, te_l, k=k, T=T, num_classes=num_classes)
    metrics["n_train"] = int(tr_f.shape[0])
    return metrics


@register_eval_task("linear_probe", needs_text=False, uses_train_data=True, aliases=("linear-probe", "linear"),
                    help="logistic regression on image features")
def run_linear_probe(model, tokenizer, preprocess, data, *, device, batch_size, workers, max_samples,
                     train_data=None, test_fraction: float = 0.2, seed: int = 0, C: float = 1.0, **_) -> dict:
    """Logistic-regression (``C``) top-1/top-5; ``n_train`` train samples."""
    tr_f, tr_l, te_f, te_l = probe_features(model, preprocess, data, device=device, batch_size=batch_size,
                                            workers=workers, max_samples=max_samples, train_data=train_data,
                                            test_fraction=test_fraction, seed=seed)
    metrics = linear_probe(tr_f, tr_l, te_f, te_l, C=C, seed=seed)
    metrics["n_train"] = int(tr_f.shape[0])
    return metrics
