"""Training-example scores for data pruning: how hard (or how typical) each example is.

Higher is harder everywhere, so "keep hard" keeps the highest scores. The pure cores
(:func:`el2n_from_logits`, :func:`forgetting_counts`, :func:`kmeans`) take tensors; the
registered entries run the short training runs or the encoder they need, streamed in
batches on the configured device, through :func:`score`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..registry import Registry
from .text import LanguageModel, _pairs, ifd, lm_loss
from .training import TrainConfig, check_labelled, labels_of, loader, predict, train

log = logging.getLogger(__name__)

DATA_SCORES: Registry[Callable[[Dataset, "ScoreInputs"], Tensor]] = Registry("data score")
#: scores that need (x, y) items
LABELLED = ("el2n", "grand", "forgetting")
METRICS = ("cosine", "euclidean")


@dataclass(frozen=True)
class ScoreInputs:
    """What a score may use. ``model``: a factory ``() -> nn.Module`` of fresh classifiers, for
    the scores that train short runs (el2n, grand, forgetting); ``train``: those runs'
    settings (epochs, batch size, lr, device, seed); ``runs``: how many runs are averaged;
    ``encoder``: ``x (B, ...) -> (B, D)`` embeddings, for prototypes; ``clusters``: k of
    k-means; ``metric``: ``"cosine"`` or ``"euclidean"`` distance to the centroid; ``lm``:
    the :class:`~prunekit.data.text.LanguageModel` of the text scores; ``progress``: tqdm bars."""

    model: Callable[[], nn.Module] | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    runs: int = 3
    encoder: Callable[[Tensor], Tensor] | None = None
    clusters: int = 10
    metric: str = "cosine"
    lm: LanguageModel | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.runs < 1 or self.clusters < 1:
            raise ConfigError(f"runs {self.runs} and clusters {self.clusters}: both must be at least 1")
        if self.metric not in METRICS:
            raise ConfigError(f"metric {self.metric!r}: use 'cosine' or 'euclidean'")

    def factory(self, name: str) -> Callable[[], nn.Module]:
        if self.model is None:
            raise ConfigError(f"score {name!r} trains short runs: give model=a function returning a fresh "
                              "classifier (e.g. lambda: MyNet())")
        return self.model

    def fresh(self, name: str, r: int) -> nn.Module:
        """A new model for run ``r``, initialised from its own seed (the global generator's
        state is restored afterwards)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.train.seed * 100 + r)
            return self.factory(name)()

    def run(self, r: int) -> TrainConfig:
        t = self.train
        return TrainConfig(t.epochs, t.batch_size, t.lr, t.device, t.seed * 100 + r)


# ---------------------------------------------------------------- pure cores
def el2n_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """EL2N = ‖softmax(f(x)) − onehot(y)‖₂ per example (Paul et al. 2021). (N, C), (N,) -> (N,)"""
    probs = logits.float().softmax(-1)  # (N, C)
    return (probs - F.one_hot(labels.long(), probs.shape[-1]).float()).norm(dim=-1)


def forgetting_counts(correct: Tensor) -> Tensor:
    """Forgetting events per example (Toneva et al. 2019) from (T, N) bool correctness over
    T presentations: the number of correct -> incorrect transitions; an example never
    classified correctly counts as forgotten infinitely often. -> (N,) float32"""
    c = correct.bool()
    events = (c[:-1] & ~c[1:]).sum(0).float()  # (N,)
    return torch.where(c.any(0), events, torch.full_like(events, float("inf")))


def kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding, on ``x``'s device. (N, D) -> centroids (k, D),
    assignment (N,). An emptied cluster keeps its centroid."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"clusters={k} for {n} examples: use between 1 and {n}")
    x = x.float()
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=g)]  # (1, D)
    for _ in range(1, k):
        d2 = torch.cdist(x, centroids).min(1).values.square().cpu()  # (N,)
        if d2.sum() > 0:
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=g)
        else:  # fewer distinct points than clusters
            pick = torch.randint(n, (1,), generator=g)
        centroids = torch.cat([centroids, x[pick.to(x.device)]])
    assign = torch.cdist(x, centroids).argmin(1)  # (N,)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (k, D)
        sizes = torch.bincount(assign, minlength=k).unsqueeze(1)  # (k, 1)
        moved = torch.where(sizes > 0, sums / sizes.clamp_min(1), centroids)
        if torch.allclose(moved, centroids):
            break
        centroids = moved
        assign = torch.cdist(x, centroids).argmin(1)
    return centroids, assign


def prototype_distance(emb: Tensor, k: int, metric: str = "cosine", seed: int = 0) -> Tensor:
    """Distance of each embedding to its k-means centroid (Sorscher et al. 2022): far from
    every prototype = atypical = hard. Cosine clusters the unit-normalised embeddings
    (spherical k-means, as the paper's self-supervised embeddings are compared). (N, D) -> (N,)"""
    if metric == "cosine":
        emb = F.normalize(emb.float(), dim=-1)
        centroids, assign = kmeans(emb, k, seed=seed)
        return 1.0 - (emb * F.normalize(centroids, dim=-1)[assign]).sum(-1)
    centroids, assign = kmeans(emb.float(), k, seed=seed)
    return (emb.float() - centroids[assign]).norm(dim=-1)


def per_example_grad_norms(model: nn.Module, x: Tensor, y: Tensor, chunk: int | None = 64) -> Tensor:
    """‖∇_θ ℓ(f(x_i), y_i)‖₂ over every trainable parameter, per example, via ``torch.func``
    (vmap over grad of a functional call); ``chunk`` examples at a time bound the memory to
    ``chunk`` copies of the gradients. (B, ...), (B,) -> (B,)"""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, xi, yi):
        out = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))  # (1, C)
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk)(params, x, y)  # name -> (B, *param.shape)
    return torch.stack([g.reshape(g.shape[0], -1).float().square().sum(1) for g in grads.values()]).sum(0).sqrt()


# ---------------------------------------------------------------- registered scores
def _bar(it, desc: str, on: bool):
    return tqdm(it, desc=desc, unit="batch", disable=not on, leave=False)


@DATA_SCORES.register("el2n", paper="Paul et al. 2021, Deep Learning on a Data Diet: Finding Important Examples "
                                    "Early in Training (EL2N)")
def el2n(dataset: Dataset, inputs: ScoreInputs) -> Tensor:
    """Error L2 norm after short training runs, averaged."""
    labels, total = labels_of(dataset), 0.0
    for r in range(inputs.runs):
        model = train(inputs.fresh("el2n", r), dataset, inputs.run(r), progress=inputs.progress)
        logits = predict(model, dataset, inputs.train.batch_size, inputs.train.device, inputs.progress)  # (N, C)
        total = total + el2n_from_logits(logits, labels)
    return total / inputs.runs


@DATA_SCORES.register("grand", paper="Paul et al. 2021, Deep Learning on a Data Diet: Finding Important Examples "
                                     "Early in Training (GraNd)")
def grand(dataset: Dataset, inputs: ScoreInputs) -> Tensor:
    """Per-example gradient norm early in training, averaged."""
    device = torch.device(inputs.train.device)
    total = torch.zeros(len(dataset))  # type: ignore[arg-type]
    for r in range(inputs.runs):
        model = train(inputs.fresh("grand", r), dataset, inputs.run(r), progress=inputs.progress).to(device)
        for idx, x, y in _bar(loader(dataset, inputs.train.batch_size, False, 0), "grand", inputs.progress):
            total[idx] += per_example_grad_norms(model, x.to(device), y.to(device).long()).cpu()
    return total / inputs.runs


@DATA_SCORES.register("forgetting", paper="Toneva et al. 2019, An Empirical Study of Example Forgetting during Deep "
                                          "Neural Network Learning (forgetting events)")
def forgetting(dataset: Dataset, inputs: ScoreInputs) -> Tensor:
    """Forgetting events during training, averaged over runs."""
    n, total = len(dataset), 0.0  # type: ignore[arg-type]
    for r in range(inputs.runs):
        seen = torch.zeros(n, dtype=torch.long)
        correct = torch.zeros(inputs.train.epochs, n, dtype=torch.bool)  # (T, N): one presentation per epoch

        def hook(idx: Tensor, logits: Tensor, y: Tensor) -> None:
            # correctness on the minibatch as it is presented, before its update (Toneva et al.)
            correct[seen[idx], idx] = (logits.argmax(-1) == y).cpu()
            seen[idx] += 1

        train(inputs.fresh("forgetting", r), dataset, inputs.run(r), on_batch=hook, progress=inputs.progress)
        total = total + forgetting_counts(correct)
    return total / inputs.runs


@DATA_SCORES.register("prototypes", paper="Sorscher et al. 2022, Beyond Neural Scaling Laws: Beating Power Law "
                                          "Scaling via Data Pruning (self-supervised prototypes)")
def prototypes(dataset: Dataset, inputs: ScoreInputs) -> Tensor:
    """Distance to the nearest k-means centroid of embeddings."""
    if inputs.encoder is None:
        raise ConfigError("score 'prototypes' needs encoder=a function mapping a batch x to (B, D) embeddings "
                          "(any pretrained or self-supervised encoder; a PCA projection of the inputs also works)")
    device = torch.device(inputs.train.device)
    parts = []
    with torch.no_grad():
        for _, x, _ in _bar(loader(dataset, inputs.train.batch_size, False, 0), "embed", inputs.progress):
            parts.append(inputs.encoder(x.to(device)).float().reshape(x.shape[0], -1))  # (B, D)
    return prototype_distance(torch.cat(parts), inputs.clusters, inputs.metric, inputs.train.seed).cpu()


@DATA_SCORES.register("random")
def random(dataset: Dataset, inputs: ScoreInputs) -> Tensor:
    """Uniform random scores (the control every score must beat)."""
    return torch.rand(len(dataset), generator=torch.Generator().manual_seed(inputs.train.seed))  # type: ignore


def _language_model(inputs: ScoreInputs, name: str) -> LanguageModel:
    if inputs.lm is None:
        raise ConfigError(f"score {name!r} needs lm=prunekit.data.LanguageModel(model, tokenizer) (any Hugging Face "
                          "causal LM and its tokenizer)")
    return inputs.lm


@DATA_SCORES.register("lm_loss")
def _lm_loss(texts: Dataset, inputs: ScoreInputs) -> Tensor:
    """Mean token NLL of each text under a causal LM."""
    lm = _language_model(inputs, "lm_loss")
    return lm_loss(lm.model, lm.tokenizer, texts, batch_size=lm.batch_size, max_length=lm.max_length,  # type: ignore
                   progress=inputs.progress)


@DATA_SCORES.register("ifd", paper="Li et al. 2024, From Quantity to Quality: Boosting LLM Performance with "
                                   "Self-Guided Data Selection for Instruction Tuning (IFD)")
def _ifd(pairs: Dataset, inputs: ScoreInputs) -> Tensor:
    """PPL(response | instruction) / PPL(response) per pair."""
    lm = _language_model(inputs, "ifd")
    return ifd(lm.model, lm.tokenizer, _pairs(pairs), batch_size=lm.batch_size, max_length=lm.max_length,
               progress=inputs.progress)


def score(method: str, dataset: Dataset, **inputs) -> Tensor:
    """(N,) float32 scores on the CPU of every example of ``dataset`` by ``method`` (a
    :data:`DATA_SCORES` name, ``prunekit list data_scores``); higher is harder. ``inputs``:
    :class:`ScoreInputs` fields (``model=``, ``train=``, ``runs=``, ``encoder=``, ...).
    ``dataset``: any ``torch.utils.data.Dataset`` (``(x, y)`` items for el2n, grand and
    forgetting), or a sequence of texts (lm_loss) or of (instruction, response) pairs (ifd)."""
    fn = DATA_SCORES.get(method)
    unknown = sorted(set(inputs) - {f.name for f in fields(ScoreInputs)})
    if unknown:
        raise ConfigError(f"unknown score input(s) {', '.join(unknown)}; use: "
                          f"{', '.join(f.name for f in fields(ScoreInputs))}")
    config = ScoreInputs(**inputs)
    if method in LABELLED:
        check_labelled(dataset, f"score {method!r}")
    log.info("scoring %d examples by %s", len(dataset), method)  # type: ignore[arg-type]
    return fn(dataset, config).float()


__all__ = ["DATA_SCORES", "LABELLED", "ScoreInputs", "el2n_from_logits", "forgetting_counts", "kmeans",
           "per_example_grad_norms", "prototype_distance", "score"]
