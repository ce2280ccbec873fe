"""Hand-computed checks of the graph's core: facets, the union-find, the elementwise rule."""
import torch
from torch import nn

from prunekit.structural import build_graph
from prunekit.structural.facets import UnionFind, compress, full, varying


def test_facets_compress_and_materialise():
    f = torch.tensor([[3, 4, 5]]).expand(2, 3)  # constant along dim 0
    c = compress(f)
    assert c.shape == (1, 3) and varying(c) == (1,)
    assert compress(torch.full((2, 2), -1)) is None  # no units at all
    assert full(torch.tensor([7, 8]), (2, 2)).tolist() == [[7, 8], [7, 8]]


def test_union_find_components_ignore_unlabelled_and_skipped_kinds():
    uf = UnionFind()
    uf.new(6)
    uf.couple(torch.tensor([0, 1, -1]), torch.tensor([1, 2, 5]))  # -1: no edge to 5
    uf.couple(torch.tensor([3]), torch.tensor([4]), kind="kv")
    assert uf.roots().tolist() == [0, 0, 0, 3, 3, 5]
    assert uf.roots(skip=frozenset({"kv"})).tolist() == [0, 0, 0, 3, 4, 5]
    uf.couple_all(torch.tensor([[5, 3], [-1, 0]]))
    assert set(uf.roots().tolist()) == {0}


class _Gated(nn.Module):
    """x -> a (16) -> relu -> * scale(16, shared weight) -> b: the shared per-channel weight
    couples channels one to one; a residual add couples a's output with the input proj."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 2)
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x):
        h = self.inp(x)
        return self.b(h + self.scale * torch.relu(self.a(h)))


def test_residual_and_elementwise_parameter_coupling():
    graph = build_graph(_Gated(), torch.randn(3, 4))
    (group,) = graph.groups  # one residual stream: inp rows, a rows+cols, scale, b cols
    assert len(group) == 16
    unit = {(m.param, m.dim): m.index for m in group.units[5]}
    assert unit == {("inp.weight", 0): (5,), ("inp.bias", 0): (5,), ("a.weight", 0): (5,), ("a.weight", 1): (5,),
                    ("a.bias", 0): (5,), ("scale", 0): (5,), ("b.weight", 1): (5,)}
